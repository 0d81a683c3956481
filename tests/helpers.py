"""Helpers shared by the tests."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float('inf') if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def link_mldr_copy(dst, src):
    """A reinforced_data folder of symlinks to ``src``, so single files can be replaced."""
    os.makedirs(dst)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


def write_targz(path, members) -> str:
    """A .tar.gz of (name, bytes) members, as ml-dr's archives are downloaded."""
    with tarfile.open(path, 'w:gz') as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_torch_file(path, obj):
    """Replace ``path`` with ``obj`` saved exactly as ml-dr does (torch.save)."""
    if os.path.lexists(path):
        os.remove(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, 'wb') as f:
        f.write(buf.getvalue())


def read_mldr(path):
    """An ml-dr file (a reinforcement or the config), read as convert reads it."""
    from ffcv_dr.mldr import CONFIG_LIMITS, load_pickle
    with open(path, 'rb') as f:
        return load_pickle(f.read(), path, CONFIG_LIMITS)


def on_small_disk(disk, size: str, args, patch: str = ''):
    """Run ``ffcv-dr ARGS`` with a tmpfs of ``size`` mounted at ``disk`` in a
    private mount namespace (gone with the process): a disk that really fills
    up. ``patch``: Python run first. Returns (standard error, exit code, what
    the disk holds at the end); skips where mounting is not allowed."""
    import pytest
    if not shutil.which('unshare'):
        pytest.skip('needs unshare(1) to mount a small disk')
    code = f'import sys\n{patch}\nimport ffcv_dr.cli as cli\nsys.exit(cli.main(sys.argv[1:]))'
    script = (f'mount -t tmpfs -o size={size} ffcv-dr-test-disk {disk} || exit 77; '
              f'"{sys.executable}" -c "$0" "$@" 1>&2; echo $?; ls -A {disk}')
    proc = subprocess.run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script, code,
                           *map(str, args)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.skip(f'cannot mount a small disk here: {proc.stderr.strip()[-300:]}')
    exit_code, *left = proc.stdout.split()
    return proc.stderr, int(exit_code), left


TEACHER_RERUN = """
import json, sys, numpy as np, torch
from ffcv_dr.teachers import load_teacher
torch.set_num_threads(2)
teacher = json.loads(sys.argv[3])
batch = np.load(sys.argv[1])
probs = load_teacher(**teacher).probs(torch.from_numpy(batch['images']), 8)
np.save(sys.argv[2], probs.numpy())
"""


def teacher_on_replay(beton, tmp_path, **teacher):
    """(worst |stored - rerun| over the stored top-k, top-1 == label count, the
    replayed (image, j) pairs) for two epochs of the loader. The teacher
    (``load_teacher``'s arguments; default the bundled one) reruns in a fresh
    process on the loader's images, in batches of the generation's shape
    (--batch-size 8): see ``Teacher.probs``."""
    from ffcv.loader import OrderOption
    from ffcv_dr import Loader
    from ffcv_dr.beton import BetonFile
    f = BetonFile(beton)
    n = len(f)
    loader = Loader(beton, batch_size=n, num_workers=2, order=OrderOption.SEQUENTIAL,
                    reinforcement_index=True, labels=True, drop_last=False)
    batches = [[t.clone() for t in batch] for _ in range(2) for batch in loader]
    images, labels, js = (torch.cat([b[k] for b in batches]).numpy() for k in (0, 2, 3))
    np.savez(tmp_path / 'replay.npz', images=images)
    done = subprocess.run([sys.executable, '-c', TEACHER_RERUN, str(tmp_path / 'replay.npz'),
                           str(tmp_path / 'probs.npy'),
                           json.dumps({'spec': 'bundled:efficientnet_lite0', **teacher})],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    probs = np.load(tmp_path / 'probs.npy')
    worst, right = 0.0, 0
    for k, (j, label) in enumerate(zip(js, labels)):
        top = f.topk(k % n)[j]
        worst = max(worst, float(np.abs(probs[k][top['cls']] - top['prob'].astype(np.float32)).max()))
        right += int(top['cls'][np.argmax(top['prob'])] == label)
    return worst, right, [(k % n, int(j)) for k, j in enumerate(js)]


def same_content(a: str, b: str):
    """The same images, labels, records and top-k, sample by sample, and the
    same bytes: the writer lays samples out by index, whoever encodes them."""
    import filecmp
    from ffcv_dr.beton import BetonFile
    fa, fb = BetonFile(a), BetonFile(b)
    assert len(fa) == len(fb) and fa.recipe == fb.recipe
    for i in range(len(fa)):
        assert fa.label(i) == fb.label(i) and np.array_equal(fa.payload(i), fb.payload(i))
        assert fa.records(i).tobytes() == fb.records(i).tobytes()
        assert fa.topk(i).tobytes() == fb.topk(i).tobytes()
    assert filecmp.cmp(a, b, shallow=False), f'{a} and {b} hold the same samples in other bytes'


def killed_after_a_chunk(args, output) -> list:
    """Run ``python -m ffcv_dr.cli ARGS`` and SIGKILL it once a chunk of
    ``output`` is finished; the names of the finished chunks."""
    parts = output + '.parts'
    proc = subprocess.Popen([sys.executable, '-m', 'ffcv_dr.cli', *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            os.path.isdir(parts) and any(n.endswith('.npz') and 'tmp' not in n for n in os.listdir(parts))):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return sorted(n for n in os.listdir(parts) if n.startswith('chunk_') and n.endswith('.npz')
                  and 'tmp' not in n)
