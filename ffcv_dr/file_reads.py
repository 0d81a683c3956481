"""Reads straight from the ``.beton`` for what FFCV's process cache does not
schedule: a MixUp/CutMix partner is known only once the sample's record is
read, after FFCV has planned the epoch's pages (``os_cache=False``).

The partner's stored image is read with one ``pread`` of just its bytes into
memory allocated and freed with the sample, so memory stays bounded by
the decoding threads times the largest image, whatever the file's size, and
nothing of the file is mapped. ``pread`` is called by symbol name, as the
C functions in :mod:`ffcv_dr.jpeg` are, so the kernel is cached on disk.
"""
import os
import weakref

import numba as nb
import numpy as np
from numba import types

_pread = types.ExternalFunction('pread', types.int64(
    types.int32, types.uint64, types.uint64, types.int64))


@nb.njit(nogil=True, fastmath=False, cache=True)
def read_payload(fd, ptr, size, skip):
    """The ``size``-byte data block at byte ``ptr`` of the file open as ``fd``,
    of which only the bytes from ``skip`` on (the stored image, after the
    records) are read; the first ``skip`` bytes are left as they are. A block
    that cannot be read in full (the file shrank since it was opened) comes
    back as those ``skip`` bytes alone: an empty image, which decodes to black
    as a damaged one does."""
    block = np.empty(size, np.uint8)
    done = skip
    while done < size:
        got = _pread(fd, block.ctypes.data + done, size - done, ptr + done)
        if got <= 0:
            return block[:skip]
        done += got
    return block


def open_for_reads(owner, path: str) -> int:
    """A read-only descriptor of ``path``, closed when ``owner`` is collected."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    weakref.finalize(owner, os.close, fd)
    return fd
