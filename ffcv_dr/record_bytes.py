"""Reading and writing the packed (unaligned, little-endian) bytes of a
reinforcement record inside compiled code."""
import numba as nb
import numpy as np


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def read_u16(buf, offset):
    return np.int64(buf[offset]) | (np.int64(buf[offset + 1]) << 8)


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def write_u16(buf, offset, value):
    buf[offset] = value & 0xFF
    buf[offset + 1] = (value >> 8) & 0xFF


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def read_f32(buf, offset):
    return buf[offset:offset + 4].view(np.float32)[0]


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def write_f32(buf, offset, value):
    buf[offset:offset + 4].view(np.float32)[0] = value
