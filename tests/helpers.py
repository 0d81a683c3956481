"""Helpers shared by the tests."""
import io
import os
import shutil
import subprocess
import sys
import tarfile

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
              f'"{sys.executable}" -c "$0" "$@"; echo $?; ls -A {disk}')
    proc = subprocess.run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script, code,
                           *map(str, args)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.skip(f'cannot mount a small disk here: {proc.stderr.strip()[-300:]}')
    exit_code, *left = proc.stdout.split()
    return proc.stderr, int(exit_code), left
