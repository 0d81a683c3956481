"""Teacher generation: what is stored is what the teacher says about the
loader's own replay; torchrun and resumed runs give the same file."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ffcv.loader import OrderOption

from conftest import needs_shared
from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile

pytestmark = needs_shared
ARGS = ['--samples', '3', '--chunk', '3', '--batch-size', '8', '--workers', '2', '--seed', '5']


def run_cli(args, **kw):
    return subprocess.run([sys.executable, '-m', 'ffcv_dr.cli', 'reinforce', *args, *ARGS],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope='module')
def one_process(small_images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('one') / 'small.beton')
    done = run_cli([small_images, out])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def same_content(a: str, b: str):
    fa, fb = BetonFile(a), BetonFile(b)
    assert len(fa) == len(fb) and fa.recipe == fb.recipe
    for i in range(len(fa)):
        assert fa.label(i) == fb.label(i) and np.array_equal(fa.jpeg(i), fb.jpeg(i))
        assert fa.records(i).tobytes() == fb.records(i).tobytes()
        assert fa.topk(i).tobytes() == fb.topk(i).tobytes()


TEACHER_RERUN = """
import sys, numpy as np, torch
from ffcv_dr.teachers import load_teacher
torch.set_num_threads(2)
batch = np.load(sys.argv[1])
probs = load_teacher('bundled:efficientnet_lite0').probs(torch.from_numpy(batch['images']), 8)
np.save(sys.argv[2], probs.numpy())
"""


def test_stored_topk_is_the_teacher_on_the_loaders_replay(one_process, tmp_path):
    """The teacher reruns in a fresh process on the loader's images, in batches of
    the generation's shape (--batch-size 8): see ``Teacher.probs``."""
    f = BetonFile(one_process)
    assert f.recipe.num_samples == 3 and f.recipe.ra_ops == 2 and f.recipe.erase
    loader = Loader(one_process, batch_size=12, num_workers=2, order=OrderOption.SEQUENTIAL,
                    reinforcement_index=True, labels=True, drop_last=False)
    batches = [[t.clone() for t in batch] for _ in range(2) for batch in loader]
    images, labels, js = (torch.cat([b[k] for b in batches]).numpy() for k in (0, 2, 3))
    np.savez(tmp_path / 'replay.npz', images=images)
    done = subprocess.run([sys.executable, '-c', TEACHER_RERUN, str(tmp_path / 'replay.npz'),
                           str(tmp_path / 'probs.npy')], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    probs = np.load(tmp_path / 'probs.npy')
    worst, right = 0.0, 0
    for n, (j, label) in enumerate(zip(js, labels)):
        top = f.topk(n % 12)[j]
        worst = max(worst, float(np.abs(probs[n][top['cls']] - top['prob'].astype(np.float32)).max()))
        right += int(top['cls'][np.argmax(top['prob'])] == label)
    assert worst <= 2e-3, worst
    assert right >= 12  # a real teacher: its top-1 is mostly the ImageNet label


def test_torchrun_two_processes_give_the_same_file(one_process, small_images, tmp_path):
    out = str(tmp_path / 'two.beton')
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29517', '-m', 'ffcv_dr.cli', 'reinforce',
                           small_images, out, *ARGS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    same_content(one_process, out)
    assert not os.path.exists(out + '.parts')


def test_killed_run_resumes_without_redoing_chunks(one_process, small_images, tmp_path):
    out = str(tmp_path / 'resumed.beton')
    parts = out + '.parts'
    proc = subprocess.Popen([sys.executable, '-m', 'ffcv_dr.cli', 'reinforce', small_images, out,
                             *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            os.path.isdir(parts) and any(n.endswith('.npz') and 'tmp' not in n for n in os.listdir(parts))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(n for n in os.listdir(parts) if n.startswith('chunk_') and n.endswith('.npz')
                      and 'tmp' not in n)
    assert 1 <= len(finished) < 4 and not os.path.exists(out)
    done = run_cli([small_images, out])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'resuming, {len(finished)} of 4 chunks already done' in done.stdout
    same_content(one_process, out)
    assert not os.path.exists(parts)


def test_inspect_draws_the_chosen_replays(one_process, tmp_path):
    from PIL import Image
    from ffcv_dr.cli import main
    png = str(tmp_path / 'grid.png')
    assert main(['inspect', one_process, '--out', png, '--index', '0', '--index', '7',
                 '--samples', '3']) == 0
    grid = Image.open(png)
    assert grid.width > grid.height  # two rows of three replays
    assert main(['inspect', one_process, '--out', png, '--index', '12']) == 1  # outside 0..11
