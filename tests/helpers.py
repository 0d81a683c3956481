"""Helpers shared by the tests."""
import io
import os

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
    from ffcv_dr.mldr import load_pickle
    from ffcv_dr.mldr_limits import CONFIG_LIMITS
    with open(path, 'rb') as f:
        return load_pickle(f.read(), path, CONFIG_LIMITS)
