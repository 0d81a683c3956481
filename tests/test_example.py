"""examples/train_imagenet_plus.py runs as written, alone and under torchrun,
and the README's training snippet is its core, verbatim."""
import os
import re
import subprocess
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'examples', 'train_imagenet_plus.py')
ARGS = ['--arch', 'resnet10t', '--epochs', '2', '--batch-size', '8', '--limit', '32', '--workers', '2',
        '--min-res', '64', '--max-res', '96', '--start-ramp', '0', '--end-ramp', '1', '--lr', '0.1']


def snippet() -> str:
    text = open(SCRIPT).read()
    core = re.search(r"# -- the README's training snippet: begin\n(.*?)\n\s*# -- the README's "
                     r'training snippet: end', text, re.S).group(1)
    return textwrap.dedent(core)


def test_the_readme_shows_the_examples_core_verbatim():
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert snippet().strip() in readme


def _epochs(stdout: str) -> list:
    return [(int(m[1]), float(m[2])) for m in re.finditer(r'^epoch \d+ res (\d+) loss ([0-9.naninf]+)', stdout,
                                                             re.M)]


def test_the_example_trains_on_the_cpu(randaug_beton, tmp_path):
    out = tmp_path / 'weights.pt'
    done = subprocess.run([sys.executable, SCRIPT, '--data', randaug_beton, *ARGS, '--out', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = _epochs(done.stdout)
    assert [res for res, _ in epochs] == [64, 96]   # the resolution ramp
    assert all(0 < loss < 20 for _, loss in epochs)
    weights = torch.load(out, weights_only=True)
    assert weights['arch'] == 'resnet10t' and 'fc.weight' in weights['model']


def test_the_example_trains_under_torchrun(randaug_beton, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')}
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29541', SCRIPT, '--data', randaug_beton, *ARGS,
                           '--workers', '1'],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = _epochs(done.stdout)
    assert [res for res, _ in epochs] == [64, 96]   # printed by rank 0 only
    assert all(0 < loss < 20 for _, loss in epochs)
