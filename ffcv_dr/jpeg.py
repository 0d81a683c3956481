"""Crop-aware JPEG decoding for the replay kernels: decode only the rows and
(iMCU-aligned) columns a crop needs, scaled by 1/2, 1/4 or 1/8 in the IDCT
when the crop is at least twice the output, then resize with OpenCV
(antialiased like PIL's bilinear filter, see ``_resize.cpp``)."""
import ctypes

import numba as nb
import numpy as np

from . import _jpeg, _resize

_lib = ctypes.CDLL(_jpeg.__file__)
_decode_region = _lib.decode_region
_decode_region.restype = ctypes.c_int
_decode_region.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                           ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                           ctypes.c_uint64, ctypes.c_void_p]
_check_jpeg = _lib.check_jpeg
_check_jpeg.restype = ctypes.c_int
_check_jpeg.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p]
_resize_crop = ctypes.CDLL(_resize.__file__).resize_crop_aa
_resize_crop.restype = ctypes.c_int
_resize_crop.argtypes = [ctypes.c_void_p] + [ctypes.c_uint32] * 6 + [ctypes.c_void_p] + [ctypes.c_uint32] * 2


def check_jpeg(data: bytes):
    """(problem or None, width, height) of a JPEG, decoded in full at 1/8
    scale (ctypes releases the GIL, so threads check in parallel)."""
    info = np.zeros(4, np.uint32)
    status = _check_jpeg(bytes(data), len(data), 1, info.ctypes.data)
    problem = ('not a decodable JPEG' if status < 0 else
               'truncated or corrupt JPEG data' if status > 0 else None)
    return problem, int(info[0]), int(info[1])


def jpeg_header(data: bytes):
    """(width, height, colour components, bits per sample) from a JPEG's
    header, without decoding; None where libjpeg cannot read it."""
    info = np.zeros(4, np.uint32)
    if _check_jpeg(data, len(data), 0, info.ctypes.data) != 0:
        return None
    return tuple(int(v) for v in info)


@nb.njit(nogil=True, fastmath=False)
def dct_scale(crop_h, crop_w, out_h, out_w):
    """The largest libjpeg scale denominator (1, 2, 4, 8) that keeps the crop
    at least as large as the output."""
    d = 1
    while d < 8 and crop_h >= 2 * d * out_h and crop_w >= 2 * d * out_w:
        d *= 2
    return d


@nb.njit(nogil=True, fastmath=False)
def decode_crop_resize(jpeg, img_h, img_w, top, left, h, w, out):
    """out <- the box (top, left, h, w) of the JPEG (an img_h x img_w image)
    resized to out's shape. Returns False, leaving ``out`` black, when the
    JPEG cannot be decoded.

    The decoded rows go to a buffer allocated here, sized for this crop:
    malloc hands the same memory back call after call, whereas a buffer in
    FFCV's per-sample memory would have to fit the file's largest image and be
    allocated and paged in again, for every slot of every batch, each epoch."""
    d = dct_scale(h, w, out.shape[0], out.shape[1])
    sh = (img_h + d - 1) // d
    sw = (img_w + d - 1) // d
    r0 = top // d
    r1 = min((top + h + d - 1) // d, sh)
    c0 = left // d
    c1 = min((left + w + d - 1) // d, sw)
    geometry = np.empty(2, np.uint32)
    buf = np.empty((r1 - r0) * sw * 3, np.uint8)
    status = _decode_region(jpeg.ctypes.data, jpeg.size, d, r0, r1 - r0, c0, c1 - c0,
                            buf.ctypes.data, buf.size, geometry.ctypes.data)
    if status != 0:
        out[:] = 0
        return False
    x0, width = np.int64(geometry[0]), np.int64(geometry[1])
    # The crop in decoded pixels; exact when d == 1, else rounded to the scaled grid.
    y_lo = min(max(int(round(top / d)) - r0, 0), r1 - r0 - 1)
    y_hi = min(max(int(round((top + h) / d)) - r0, y_lo + 1), r1 - r0)
    x_lo = min(max(int(round(left / d)) - x0, 0), width - 1)
    x_hi = min(max(int(round((left + w) / d)) - x0, x_lo + 1), width)
    if _resize_crop(buf.ctypes.data, r1 - r0, width, y_lo, y_hi, x_lo, x_hi,
                    out.ctypes.data, out.shape[0], out.shape[1]) != 0:
        out[:] = 0
        return False
    return True
