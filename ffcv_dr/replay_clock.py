"""Which reinforcement each sample replays: j = f(seed, epoch, index).

Image and target decoders run independently inside FFCV's compiled pipeline;
they agree because both call the same pure, counter-based functions here
(splitmix64 over seed, epoch, index and a stream id), whatever the traversal
order, worker count or rank.

FFCV compiles decoders once and never tells them the epoch, and numba freezes
closure arrays as constants. The epoch therefore lives in a small array owned
by a :class:`ReplayClock`; compiled code reads it through its address, so
advancing the epoch costs one store and no recompilation.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

STREAM_CHOICE = 0   # which stored reinforcement
STREAM_REPLAY = 1   # replay or fresh augmentation
STREAM_FRESH = 2    # first counter of a fresh augmentation's crop and flip draws
STREAM_FRESH_RA = 50      # fresh RandAugment: two counters per op
STREAM_FRESH_ERASE = 70   # fresh RandomErasing: coin, then four counters per try


@nb.njit(nogil=True, fastmath=False, cache=True)
def splitmix64(x):
    z = np.uint64(x) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@nb.njit(nogil=True, fastmath=False, cache=True)
def draw(seed, epoch, index, stream):
    """64 random bits, a pure function of its four arguments."""
    h = splitmix64(np.uint64(seed))
    h = splitmix64(h ^ np.uint64(epoch))
    h = splitmix64(h ^ np.uint64(index))
    return splitmix64(h ^ np.uint64(stream))


@nb.njit(nogil=True, fastmath=False, cache=True)
def uniform(seed, epoch, index, stream):
    """A float64 in [0, 1) from :func:`draw`."""
    return np.float64(draw(seed, epoch, index, stream) >> _S11) * (1.0 / 9007199254740992.0)


@nb.njit(nogil=True, fastmath=False, cache=True)
def choose(seed, epoch, index, num_samples, p):
    """The reinforcement sample ``index`` replays this epoch, or -1 for a fresh one."""
    if p < 1.0 and uniform(seed, epoch, index, STREAM_REPLAY) >= p:
        return -1
    return np.int64(draw(seed, epoch, index, STREAM_CHOICE) % np.uint64(num_samples))


@intrinsic
def _address_as_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@nb.njit(nogil=True, fastmath=False, cache=True)
def read_epoch(address):
    """The epoch stored at ``address`` (a :class:`ReplayClock`'s ``address``)."""
    return nb.carray(_address_as_pointer(address), 1, np.int64)[0]


# Columns of the per-sample table both decoders read: where each image's two
# blocks are, its original size (the crops' pixel space), a flag set by the
# decoders when a sample holds a damaged record, and the image block's size
# (for reading a mixing partner from the file, see :mod:`ffcv_dr.file_reads`).
IMAGE_PTR, TARGET_PTR, ORIG_H, ORIG_W, DAMAGED, IMAGE_SIZE = range(6)
TABLE_COLUMNS = 6


@nb.njit(nogil=True, fastmath=False, cache=True)
def sample_table(address, n):
    """The (n, TABLE_COLUMNS) int64 table at ``address`` (a :class:`ReplayClock`'s ``table``)."""
    return nb.carray(_address_as_pointer(address), (n, TABLE_COLUMNS), np.int64)


class ReplayClock:
    """The replay state shared by the image and target decoders of a loader.

    It follows the epoch of the FFCV Loader it is in, ``ffcv_dr.Loader`` or a
    plain ``ffcv.Loader`` alike (:mod:`ffcv_dr.ffcv_patches` advances it as
    each epoch starts), and is bound to the Loader's file when the Loader is
    built, so nothing needs calling per epoch. :meth:`set_epoch` overrides
    the epoch the next iteration replays, as ``DistributedSampler.set_epoch``.
    """

    def __init__(self, seed: int = 0, p: float = 1.0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'p must be in [0, 1], got {p}')
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.p = float(p)
        self._epoch = np.zeros(1, np.int64)   # read by compiled code by address
        self.path = self.source = None  # the file's name, and what the decoders read
        self._table, self._reported = None, 0
        self._pinned = False  # set_epoch was called since the last epoch started

    def bind(self, beton):
        """Give the decoders the file's per-sample table (an opened
        :class:`~ffcv_dr.beton.BetonFile`): each decoder then checks the
        image's record and top-k both, so image and target agree on the
        samples that fall back to a fresh augmentation with their label."""
        table = np.zeros((len(beton), TABLE_COLUMNS), np.int64)
        table[:, IMAGE_PTR] = beton.image_meta['data_ptr']
        table[:, TARGET_PTR] = beton.target_meta['data_ptr']
        table[:, ORIG_H] = beton.image_meta['orig_height']
        table[:, ORIG_W] = beton.image_meta['orig_width']
        table[:, IMAGE_SIZE] = beton.image_block_sizes()
        self.path, self.source, self._table = beton.path, beton.source, table

    @property
    def table(self) -> tuple:
        """(address, rows) of the bound table, for compiled code."""
        if self._table is None:
            raise ValueError('the ReplayClock is not bound to the file: call clock.bind(BetonFile(path))')
        return np.uint64(self._table.ctypes.data), np.int64(len(self._table))

    def damaged(self) -> np.ndarray:
        """Indices of the samples found holding a damaged record so far."""
        return np.flatnonzero(self._table[:, DAMAGED]) if self._table is not None else np.zeros(0, int)

    def report_damaged(self):
        """Warn, once per newly found batch of them, of samples that fell back
        to a fresh augmentation because a record of theirs is damaged."""
        found = self.damaged()
        if len(found) > self._reported:
            import warnings
            warnings.warn(f'{self.path}: {len(found)} samples (first: sample {found[0]}) hold damaged '
                          'records or images (run ffcv-dr verify); a damaged record is trained on '
                          'as a fresh augmentation with its label, a damaged image comes out black',
                          RuntimeWarning, stacklevel=3)
            self._reported = len(found)

    @property
    def address(self) -> np.uint64:
        return np.uint64(self._epoch.ctypes.data)

    @property
    def constants(self) -> tuple:
        """(seed, p, address) typed as numpy scalars: compiled decoders capture
        them as plain values rather than numba literals, so every loader shares
        one overload of the kernels."""
        return np.uint64(self.seed), np.float64(self.p), self.address

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def bound(self) -> bool:
        return self._table is not None

    def set_epoch(self, epoch: int):
        """Replay ``epoch`` in the next iteration, whatever the Loader's own
        count says; the epochs after it follow the Loader again."""
        self._epoch[0] = epoch
        self._pinned = True

    def follow(self, epoch: int):
        """The Loader starts ``epoch``: replay it unless :meth:`set_epoch` chose another."""
        if not self._pinned:
            self._epoch[0] = epoch
        self._pinned = False

    def choices(self, indices, num_samples: int, epoch: int = None) -> np.ndarray:
        """j for each index at ``epoch`` (default: the current one); -1 = fresh."""
        epoch = self.epoch if epoch is None else epoch
        return np.array([choose(self.seed, epoch, int(i), num_samples, self.p)
                         for i in np.asarray(indices).reshape(-1)], np.int64)
