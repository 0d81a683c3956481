"""Resuming the Loader in the middle of an epoch (``state_dict`` /
``load_state_dict``, named as in torchdata's StatefulDataLoader).

Everything the Loader yields is a pure function of its arguments, the epoch
and the position in the epoch: each order (FFCV's SEQUENTIAL and RANDOM, and
:mod:`ffcv_dr.page_order`'s QUASI_RANDOM) is drawn anew from (seed, epoch),
with or without ``distributed``, and the replay clock draws each sample's
reinforcement and fresh augmentation from (seed, epoch, sample). So the state
is where the caller stands: the epoch and the batches handed out in it (not
those prefetched), plus the output size that :meth:`set_output_size` may
have changed. A resumed Loader cuts those batches off the front of that
epoch's order before FFCV plans its reads, so it neither decodes nor reads
them. The state also holds what it is only valid for (the file, as its size
and a CRC of FFCV's per-sample metadata, which holds every block's address
and CRC; and the arguments that shape the order and the targets), and a
state from another file or other arguments is refused, naming what differs.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

from ..jobs import changed

FORMAT = 'ffcv-dr loader state 1'


def identity(source: str, num_samples: int, indices, distributed: bool, *, seed, p,
             order, batch_size, drop_last, densify) -> dict:
    """What a state is valid for, apart from the file's metadata CRC (taken
    when first needed: :func:`ffcv_dr.beton.metadata_crc`)."""
    rank = world = None
    if distributed:
        import torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
    return {'samples': num_samples, 'file_bytes': os.path.getsize(source),
            'indices': None if indices is None else
            [len(indices), zlib.crc32(np.ascontiguousarray(indices, np.int64).view(np.uint8))],
            'seed': int(seed), 'p': float(p), 'order': order.name, 'batch_size': int(batch_size),
            'drop_last': bool(drop_last), 'densify': densify, 'rank': rank, 'world_size': world}


def check(state, expected: dict, path: str):
    """Refuse ``state`` unless it is a Loader state taken with ``expected``."""
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise ValueError(f'{path}: not a Loader state (a dict from Loader.state_dict(), '
                         f'format {FORMAT!r}), got {type(state).__name__}')
    taken = {k: state.get(k) for k in expected}
    differ = changed(taken, expected)
    if differ:
        what = '; '.join(f'{k}: state {taken[k]!r}, this loader {expected[k]!r}' for k in differ)
        raise ValueError(f'{path}: the state was taken from another file or with other arguments ({what})')
    for key in ('epoch', 'batches'):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f'{path}: the state\'s {key} must be an integer of at least 0, got {value!r}')


class Delivered:
    """An epoch's iterator that counts the batches handed to the caller, into
    ``loader._position`` (epoch, batches); FFCV's prefetched ones do not count."""

    def __init__(self, iterator, loader, epoch: int, done: int):
        self.iterator, self.loader, self.epoch, self.done = iterator, loader, epoch, done
        loader._position = (epoch, done)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.loader._position = (self.epoch + 1, 0)
            raise
        self.done += 1
        self.loader._position = (self.epoch, self.done)
        return batch

    def close(self):
        self.iterator.close()
