"""The Loader's arguments, checked when it is built.

FFCV checks almost none of them, and what it does not check ends badly inside
its compiled pipeline: an index past the file reads outside the file's
memory (a signal), a float or 2-D index kills a worker thread (a hang), a
zero-sized image hangs, ``batches_ahead=0`` hands out batches that are being
overwritten. Each check below names the argument, the value and what is
allowed.
"""
from __future__ import annotations

import numbers
import os

import numpy as np
from ffcv.loader import OrderOption

from ..fields.soft_target import DENSIFY

DTYPES = (np.float16, np.float32)


def _integer(name, value, low, high=None, allowed='') -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        raise ValueError(f'{name}={value!r}: must be ' + (allowed or (
            f'an integer from {low} to {high}' if high is not None else f'an integer of at least {low}')))
    return int(value)


def _flag(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{name}={value!r}: must be True or False')
    return bool(value)


def output_size(value, batch_size: int = 1, slots: int = 1, per_pixel: int = 3, default: int = None):
    """(height, width) as integers; ``batch_size`` x ``slots`` images of
    ``per_pixel`` bytes a pixel (``default`` x ``default`` when ``value`` is
    None) must fit in this machine's memory."""
    if value is None:
        if default is not None:
            _fits(f'batch_size={batch_size}, batches_ahead={slots - 2}', (default, default), batch_size, slots,
                  per_pixel)
        return None
    if (isinstance(value, (str, bytes)) or not hasattr(value, '__len__') or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                       for v in value)):
        raise ValueError(f'output_size={value!r}: must be (height, width), two integers of at least 1')
    h, w = int(value[0]), int(value[1])
    _fits(f'output_size={value!r}', (h, w), batch_size, slots, per_pixel)
    return h, w


def _fits(what, size, batch_size, slots, per_pixel):
    need = batch_size * slots * size[0] * size[1] * per_pixel
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if need > total:
        raise ValueError(f'{what}: the batch buffers would take {need / 2**30:.1f} GiB ({batch_size} images of '
                         f'{size[0]}x{size[1]} x {slots} batches in flight), more than the '
                         f'{total / 2**30:.1f} GiB of memory here')


def indices(value, num_samples: int, path: str) -> np.ndarray:
    """1-D integers in [0, num_samples); repeats are kept (FFCV's orders keep them)."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f'indices: must be a 1-D sequence of sample numbers, got shape {array.shape}')
    if not len(array):
        raise ValueError('indices: empty; give at least one sample number')
    if array.dtype.kind not in 'iu':
        raise ValueError(f'indices: must be integers, got {array.dtype} (first: {array[0]!r})')
    bad = np.flatnonzero((array < 0) | (array >= num_samples))
    if len(bad):
        raise ValueError(f'indices[{bad[0]}]={array[bad[0]]}: outside the file, whose samples are '
                         f'0 to {num_samples - 1} ({path})')
    return array.astype(np.uint64)


def device(value):
    """None, or a torch device this machine has."""
    if value is None:
        return None
    import torch
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f'device={value!r}: not a torch device ({e})') from None
    if dev.type == 'cuda':
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count or not count:
            raise ValueError(f'device={value!r}: this machine has {count} CUDA devices')
    elif dev.type != 'cpu':
        raise ValueError(f"device={value!r}: must be None, 'cpu' or a CUDA device")
    return dev


def normalization(name, value):
    """Three finite channel values (``std``: positive)."""
    array = np.asarray(value, dtype=np.float64) if np.size(value) == 3 else None
    if array is None or array.shape != (3,) or not np.isfinite(array).all() or (
            name == 'std' and (array <= 0).any()):
        raise ValueError(f'{name}={value!r}: must be three finite numbers, one a channel'
                         + (', each above 0' if name == 'std' else ''))
    return array


def check(*, batch_size, num_workers, order, distributed, seed, p, densify, labels,
          reinforcement_index, os_cache, drop_last, batches_ahead, dtype, mean, std, recompile):
    """Everything that does not need the file."""
    _integer('batch_size', batch_size, 1)
    if num_workers != -1:
        import numba
        most = numba.config.NUMBA_NUM_THREADS
        _integer('num_workers', num_workers, 1, most,
                 allowed=f'-1 (every core) or 1 to {most} (the threads numba may start here)')
    _integer('batches_ahead', batches_ahead, 1)
    _integer('seed', seed, 0, 2 ** 63 - 1)
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f'p={p!r}: must be a probability, from 0 to 1')
    if order not in (OrderOption.SEQUENTIAL, OrderOption.RANDOM, OrderOption.QUASI_RANDOM):
        raise ValueError(f'order={order!r}: must be an ffcv.loader.OrderOption')
    if densify not in DENSIFY:
        raise ValueError(f'densify={densify!r}: must be one of {", ".join(DENSIFY)}')
    try:
        ok = np.dtype(dtype) in [np.dtype(d) for d in DTYPES]
    except TypeError:  # not a numpy type at all (a torch dtype, say)
        ok = False
    if not ok:
        raise ValueError(f'dtype={dtype!r}: must be np.float16 or np.float32')
    for name, value in (('distributed', distributed), ('labels', labels), ('os_cache', os_cache),
                        ('reinforcement_index', reinforcement_index), ('drop_last', drop_last),
                        ('recompile', recompile)):
        _flag(name, value)
    normalization('mean', mean)
    normalization('std', std)


def pipelines(value):
    """None, or FFCV's ``pipelines``: a dict from output name to a list of
    operations, a ``PipelineSpec`` or None (the field left out)."""
    from collections.abc import Mapping, Sequence

    from ffcv.pipeline import PipelineSpec
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f'pipelines={value!r}: must be a dict from output name to a list of '
                         'operations, a PipelineSpec or None, as for ffcv.Loader')
    for name, spec in value.items():
        if spec is not None and not isinstance(spec, PipelineSpec) and (
                not isinstance(spec, Sequence) or isinstance(spec, (str, bytes))):
            raise ValueError(f'pipelines[{name!r}]={spec!r}: must be a list of operations, a '
                             'PipelineSpec or None (the field left out)')


def per_process(count: int, distributed: bool) -> int:
    """Samples each process gets an epoch: a DistributedSampler's share."""
    if not distributed:
        return count
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError('distributed=True: torch.distributed is not initialised (run under torchrun '
                         'and call torch.distributed.init_process_group first)')
    return -(-count // dist.get_world_size())


def check_epoch(count: int, batch_size: int, drop_last: bool, path: str, name: str = 'batch_size'):
    """A full batch at least, when drop_last would otherwise give empty epochs
    (``name``: the argument or setting that gave ``batch_size``)."""
    if drop_last and count < batch_size:
        raise ValueError(f'{name}={batch_size} with drop_last=True: the {count} samples '
                         f'({path}, per process) make no full batch, so every epoch would be empty')
