"""Crop-aware reading of stored images for the replay kernels: a JPEG is
decoded only in the rows and (iMCU-aligned) columns a crop needs, scaled by
1/2, 1/4 or 1/8 in the IDCT when the crop is at least twice the output; raw
pixels are cropped without decoding. The crop is then resized with OpenCV
(antialiased like PIL's bilinear filter, see ``_resize.cpp``).

The kernels call the C functions by symbol name (``ExternalFunction``, the
libraries loaded into LLVM's process-wide namespace) rather than through
ctypes pointers, whose addresses change from process to process: that keeps
every kernel cacheable on disk (``cache=True``), so a second process starts
without recompiling them."""
import ctypes

import llvmlite.binding as llvm
import numba as nb
import numpy as np
from numba import types

from . import _jpeg, _resize
from .format import STORED_RAW

for _library in (_jpeg.__file__, _resize.__file__):
    llvm.load_library_permanently(_library)
_ptr, _u32 = types.uint64, types.uint32   # pointers pass as 64-bit integers (same ABI)
_decode_region = types.ExternalFunction('ffcv_dr_decode_region', types.int32(
    _ptr, types.uint64, _u32, _u32, _u32, _u32, _u32, _u32, _u32, _ptr, types.uint64, _ptr))
_resize_crop = types.ExternalFunction('ffcv_dr_resize_crop', types.int32(
    _ptr, _u32, _u32, _u32, _u32, _u32, _u32, _ptr, _u32, _u32))
_check_jpeg = ctypes.CDLL(_jpeg.__file__).ffcv_dr_check_jpeg
_check_jpeg.restype = ctypes.c_int
_check_jpeg.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p]
_add_restarts = ctypes.CDLL(_jpeg.__file__).ffcv_dr_add_restarts
_add_restarts.restype = ctypes.c_int64
_add_restarts.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64]
_splice_restarts = ctypes.CDLL(_jpeg.__file__).ffcv_dr_splice_restarts
_splice_restarts.restype = ctypes.c_int64
_splice_restarts.argtypes = _add_restarts.argtypes
TOO_SMALL, NOT_SPLICED = -2, -3   # what the two return besides a size
_decode_region_c = ctypes.CDLL(_jpeg.__file__).ffcv_dr_decode_region
_decode_region_c.argtypes = [ctypes.c_void_p, ctypes.c_uint64] + 7 * [ctypes.c_uint32] + [
    ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p]
_seekable = ctypes.CDLL(_jpeg.__file__).ffcv_dr_seekable
_seekable.restype = ctypes.c_int
_seekable.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
RESTART_INTERVAL = 4   # MCUs at most: files grow ~1%, a crop's piece is within 3 MCUs of its width


def add_restarts(data, splice: bool = True) -> np.ndarray:
    """The JPEG ``data`` rewritten losslessly with restart markers that let
    the decoder cut out a crop's intervals (see ``_jpeg.c``): the same
    pixels, baseline, optimal Huffman tables (the source's AC tables where
    they are as good). ``data`` itself where that does not apply (not 8-bit,
    not grey or 3 components, damaged data).

    A sequential JPEG is re-marked at the level of its Huffman symbols
    (``_restarts.c``, 0.4 of the time); anything else, or with
    ``splice=False``, goes through libjpeg's coefficients."""
    data = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data
    source = data.tobytes()
    room = 2 * data.size + 65536
    routes = [_splice_restarts, _add_restarts] if splice else [_add_restarts]
    while True:
        out = np.empty(room, np.uint8)
        for route in routes:
            n = route(source, data.size, RESTART_INTERVAL, out.ctypes.data, room)
            if n != NOT_SPLICED:
                break
        if n != TOO_SMALL:
            return out[:n].copy() if n > 0 else data
        room *= 2


def decode_region(data: np.ndarray, denom: int, top: int, height: int, left: int,
                  width: int) -> np.ndarray:
    """Rows [top, top + height) and columns [left, left + width) of the JPEG
    scaled by 1/denom, as the kernels decode them (HWC RGB)."""
    geometry = np.zeros(2, np.uint32)
    buf = np.zeros(height * (-(-jpeg_header(data.tobytes())[0] // denom)) * 3, np.uint8)
    if _decode_region_c(data.ctypes.data, data.size, 0, 0, denom, top, height, left, width,
                        buf.ctypes.data, buf.size, geometry.ctypes.data) != 0:
        raise ValueError('libjpeg could not decode the region')
    x0, w = int(geometry[0]), int(geometry[1])
    return buf[:height * w * 3].reshape(height, w, 3)[:, left - x0:left - x0 + width]


def seekable(data: np.ndarray) -> bool:
    """Whether the decoder cuts this JPEG to a crop's restart intervals. Reads
    only its header: over a map of a large file, one page per image."""
    return data.size > 0 and bool(_seekable(data.ctypes.data, data.size))


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


@nb.njit(nogil=True, fastmath=False, cache=True)
def dct_scale(crop_h, crop_w, out_h, out_w):
    """The largest libjpeg scale denominator (1, 2, 4, 8) that keeps the crop
    at least as large as the output."""
    d = 1
    while d < 8 and crop_h >= 2 * d * out_h and crop_w >= 2 * d * out_w:
        d *= 2
    return d


@nb.njit(nogil=True, fastmath=False, cache=True)
def scaled_region(img_h, img_w, top, left, h, w, out_h, out_w):
    """What a crop (top, left, h, w) resized to out_h x out_w decodes: the
    scale denominator, the scaled image's width, and the scaled rows
    [r0, r1) and columns [c0, c1) that cover the crop."""
    d = dct_scale(h, w, out_h, out_w)
    sh = (img_h + d - 1) // d
    sw = (img_w + d - 1) // d
    return (d, sw, top // d, min((top + h + d - 1) // d, sh), left // d,
            min((left + w + d - 1) // d, sw))


@nb.njit(nogil=True, fastmath=False, cache=True)
def decode_crop_resize(jpeg, img_h, img_w, top, left, h, w, out):
    """out <- the box (top, left, h, w) of the JPEG (an img_h x img_w image)
    resized to out's shape. Returns False, leaving ``out`` black, when the
    JPEG cannot be decoded or is not img_h x img_w (the file's metadata lies).

    The decoded rows go to a buffer allocated here, sized for this crop:
    malloc hands the same memory back call after call, whereas a buffer in
    FFCV's per-sample memory would have to fit the file's largest image and be
    allocated and paged in again, for every slot of every batch, each epoch."""
    d, sw, r0, r1, c0, c1 = scaled_region(img_h, img_w, top, left, h, w, out.shape[0], out.shape[1])
    geometry = np.empty(2, np.uint32)
    buf = np.empty((r1 - r0) * sw * 3, np.uint8)
    status = _decode_region(jpeg.ctypes.data, jpeg.size, img_w, img_h, d, r0, r1 - r0, c0, c1 - c0,
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


@nb.njit(nogil=True, fastmath=False, cache=True)
def raw_crop_resize(pixels, img_h, img_w, top, left, h, w, out):
    """out <- the box (top, left, h, w) of raw RGB pixels (img_h x img_w x 3)
    resized to out's shape; False, leaving ``out`` black, when the pixels
    are fewer than the size says. The crop is copied first: the resize
    blurs its input in place, and the stored pixels are read-only."""
    if pixels.size < img_h * img_w * 3:
        out[:] = 0
        return False
    image = pixels[:img_h * img_w * 3].reshape(img_h, img_w * 3)
    crop = np.empty((h, w * 3), np.uint8)
    crop[:] = image[top:top + h, left * 3:(left + w) * 3]
    if _resize_crop(crop.ctypes.data, h, w, 0, h, 0, w, out.ctypes.data,
                    out.shape[0], out.shape[1]) != 0:
        out[:] = 0
        return False
    return True


@nb.njit(nogil=True, fastmath=False, cache=True)
def crop_resize(payload, mode, img_h, img_w, top, left, h, w, out):
    """out <- the box (top, left, h, w) of a stored image (``mode``: how it
    is stored, see :mod:`ffcv_dr.storage`), resized to out's shape."""
    if mode == STORED_RAW:
        return raw_crop_resize(payload, img_h, img_w, top, left, h, w, out)
    return decode_crop_resize(payload, img_h, img_w, top, left, h, w, out)
