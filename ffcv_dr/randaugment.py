"""torchvision's 14 RandAugment ops on uint8 HWC images, in numba.

ml-dr replays RandAugment with torchvision on PIL images, so each op repeats
Pillow's arithmetic: affine ops pick nearest neighbours in Pillow's 16.16
fixed point (``affine_fixed`` in Geometry.c), blends truncate in float32
(``ImagingBlend``), the smoothing filter rounds (``ImagingFilter3x3``) and
the histogram ops build the lookup tables of ``ImageOps``. Magnitudes are
the stored ones: already signed and scaled, as ml-dr keeps them.

All replay kernels set ``fastmath=False`` explicitly: FFCV compiles decoders
with ``fastmath=True`` and numba passes that flag on to called functions that
leave it unset, which moves roundings (AutoContrast's table, blends, crop
draws) away from Pillow's and from ``ffcv-dr replay``.
"""
import math

import numba as nb
import numpy as np

from .replay_clock import uniform

(IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR,
 CONTRAST, SHARPNESS, POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE) = range(14)
NUM_OPS = 14


def magnitude_table(height: int, width: int, magnitude: int = 9, num_bins: int = 31):
    """(magnitude, signed) per op, as ``torchvision.transforms.RandAugment``'s
    augmentation space at one magnitude bin: what fresh samples draw from."""
    t = magnitude / (num_bins - 1)
    mags = np.zeros(NUM_OPS, np.float32)
    mags[[SHEAR_X, SHEAR_Y]] = 0.3 * t
    mags[TRANSLATE_X] = 150.0 / 331.0 * width * t
    mags[TRANSLATE_Y] = 150.0 / 331.0 * height * t
    mags[ROTATE] = 30.0 * t
    mags[[BRIGHTNESS, COLOR, CONTRAST, SHARPNESS]] = 0.9 * t
    mags[POSTERIZE] = 8 - round(magnitude / ((num_bins - 1) / 4))
    mags[SOLARIZE] = 255.0 * (1 - t)
    signed = np.zeros(NUM_OPS, np.bool_)
    signed[SHEAR_X:SHARPNESS + 1] = True
    return mags, signed


@nb.njit(nogil=True, fastmath=False, cache=True)
def draw_ops(mags, signed, seed, epoch, index, stream, ops, out_mags):
    """Fill ``ops``/``out_mags`` as RandAugment.forward draws them: a uniform op,
    its table magnitude, negated on a coin flip when the op is signed."""
    for k in range(ops.shape[0]):
        op = min(int(uniform(seed, epoch, index, stream + 2 * k) * NUM_OPS), NUM_OPS - 1)
        ops[k] = op
        m = mags[op]
        if signed[op] and uniform(seed, epoch, index, stream + 2 * k + 1) < 0.5:
            m = -m
        out_mags[k] = m


@nb.njit(nogil=True, fastmath=False, cache=True)
def apply_op(img, scratch, op, magnitude, scale_y, scale_x):
    """Apply one op to ``img`` in place; ``scratch`` has img's shape.
    ``scale_y``/``scale_x`` map stored translations to this image's pixels."""
    h, w = img.shape[0], img.shape[1]
    if op == SHEAR_X or op == SHEAR_Y:
        shear = math.degrees(math.atan(magnitude))
        if op == SHEAR_X:
            m = _inverse_affine(0.0, 0.0, 0.0, 0.0, 0.0, shear, 0.0)
        else:
            m = _inverse_affine(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, shear)
        _affine_nearest(img, scratch, m)
        _copy(scratch, img)
    elif op == TRANSLATE_X or op == TRANSLATE_Y:
        if op == TRANSLATE_X:
            tx, ty = float(round(int(magnitude) * scale_x)), 0.0
        else:
            tx, ty = 0.0, float(round(int(magnitude) * scale_y))
        _affine_nearest(img, scratch, _inverse_affine(w * 0.5, h * 0.5, 0.0, tx, ty, 0.0, 0.0))
        _copy(scratch, img)
    elif op == ROTATE:
        _affine_nearest(img, scratch, _rotation(magnitude, w, h))
        _copy(scratch, img)
    elif op == BRIGHTNESS:
        _apply_lut(img, _blend_lut(0, 1.0 + magnitude))
    elif op == COLOR:
        _blend_gray(img, 1.0 + magnitude)
    elif op == CONTRAST:
        _apply_lut(img, _blend_lut(_gray_mean(img), 1.0 + magnitude))
    elif op == SHARPNESS:
        _smooth(img, scratch)
        _blend_image(img, scratch, 1.0 + magnitude)
    elif op == POSTERIZE:
        _apply_lut(img, np.arange(256).astype(np.uint8) & np.uint8((0xFF << (8 - int(magnitude))) & 0xFF))
    elif op == SOLARIZE:
        lut = np.arange(256).astype(np.uint8)
        for i in range(256):
            if i >= magnitude:
                lut[i] = 255 - i
        _apply_lut(img, lut)
    elif op == AUTOCONTRAST:
        _apply_luts(img, _autocontrast_luts(_histograms(img)))
    elif op == EQUALIZE:
        _apply_luts(img, _equalize_luts(_histograms(img)))


@nb.njit(nogil=True, fastmath=False, cache=True)
def _copy(src, dst):
    """dst <- src (an explicit loop: numba's slice assignment is ten times slower)."""
    d, s = dst.reshape(-1), src.reshape(-1)
    for i in range(s.size):
        d[i] = s[i]


@nb.njit(nogil=True, fastmath=False, cache=True)
def _inverse_affine(cx, cy, angle, tx, ty, shear_x, shear_y):
    """torchvision's inverse affine matrix (output -> input pixel), as F.affine
    hands it to Pillow; angles in degrees, scale 1."""
    rot = math.radians(angle)
    sx = math.radians(shear_x)
    sy = math.radians(shear_y)
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return m0, m1, m2, m3, m4, m5


@nb.njit(nogil=True, fastmath=False, cache=True)
def _rotation(angle, width, height):
    """Pillow's ``Image.rotate`` matrix about the image centre (torchvision's
    F.rotate on PIL images calls it)."""
    a = -math.radians(angle % 360.0)
    cos = round(math.cos(a), 15)
    sin = round(math.sin(a), 15)
    cx, cy = width / 2.0, height / 2.0
    return (cos, sin, cos * -cx + sin * -cy + cx,
            -sin, cos, -sin * -cx + cos * -cy + cy)


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def _fix(v):
    return np.int64(math.floor(v * 65536.0 + 0.5))


@nb.njit(nogil=True, fastmath=False, cache=True)
def _affine_nearest(src, dst, m):
    """Pillow's nearest-neighbour affine transform in 16.16 fixed point; fill 0.
    (Unsigned indices spare numba's negative-index checks, here and below.)"""
    h, w = src.shape[0], src.shape[1]
    a0, a1, a2, a3, a4, a5 = m
    f0, f1, f3, f4 = _fix(a0), _fix(a1), _fix(a3), _fix(a4)
    xo = _fix(a2 + a1 * 0.5 + a0 * 0.5)
    yo = _fix(a5 + a4 * 0.5 + a3 * 0.5)
    for y in range(h):
        xx, yy = xo, yo
        row = dst[y]
        for x in range(w):
            xi = xx >> 16
            yi = yy >> 16
            if 0 <= xi < w and 0 <= yi < h:
                p = src[np.uint64(yi), np.uint64(xi)]
                row[x, 0], row[x, 1], row[x, 2] = p[0], p[1], p[2]
            else:
                row[x, 0], row[x, 1], row[x, 2] = 0, 0, 0
            xx += f0
            yy += f3
        xo += f1
        yo += f4


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def _blend(degenerate, value, factor):
    """Pillow's ImagingBlend of one value: float32 arithmetic, clipped, truncated.
    (The difference of two 0..255 values is exact in float32; subtracting
    there rather than in int32 lets callers' loops vectorise.)"""
    d = np.float32(degenerate)
    v = d + factor * (np.float32(value) - d)
    return np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@nb.njit(nogil=True, fastmath=False, cache=True)
def _blend_lut(degenerate, factor):
    """The blend towards a constant as a lookup table (it depends on the value only)."""
    f = np.float32(factor)
    lut = np.empty(256, np.uint8)
    for i in range(256):
        lut[i] = _blend(degenerate, i, f)
    return lut


@nb.njit(nogil=True, fastmath=False, cache=True)
def _apply_lut(img, lut):
    flat = img.reshape(-1)
    for i in range(flat.size):
        flat[i] = lut[flat[i]]


@nb.njit(nogil=True, fastmath=False, cache=True)
def _blend_image(img, degenerate, factor):
    f = np.float32(factor)
    a, d = img.reshape(-1), degenerate.reshape(-1)
    for i in range(a.size):
        a[i] = _blend(d[i], a[i], f)


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def _luma(r, g, b):
    """Pillow's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point)."""
    return (np.int32(r) * 19595 + np.int32(g) * 38470 + np.int32(b) * 7471 + 0x8000) >> 16


@nb.njit(nogil=True, fastmath=False, cache=True)
def _blend_gray(img, factor):
    f = np.float32(factor)
    a = img.reshape(-1)
    for i in range(0, a.size, 3):
        gray = _luma(a[i], a[i + 1], a[i + 2])
        a[i] = _blend(gray, a[i], f)
        a[i + 1] = _blend(gray, a[i + 1], f)
        a[i + 2] = _blend(gray, a[i + 2], f)


@nb.njit(nogil=True, fastmath=False, cache=True)
def _gray_mean(img):
    """ImageEnhance.Contrast's degenerate level: the rounded mean of the L image."""
    a = img.reshape(-1)
    total = 0
    for i in range(0, a.size, 3):
        total += _luma(a[i], a[i + 1], a[i + 2])
    return int(total / (a.size // 3) + 0.5)


_K = np.float32(1.0 / 13.0)
_K5 = np.float32(5.0 / 13.0)


@nb.njit(nogil=True, fastmath=False, cache=True)
def _smooth(img, out):
    """ImageFilter.SMOOTH (3x3, centre 5, divisor 13) in float32, rounded;
    border pixels are copied, as Pillow does. The products and sums keep
    Pillow's (row below, centre row, row above; left to right), so results
    are exact. Three rows of products are kept; offsets are never negative,
    which lets the inner loop vectorise."""
    h, n = img.shape[0], img.shape[1] * 3
    flat = img.reshape(h, n)
    dst = out.reshape(h, n)
    pk = np.empty((3, n), np.float32)
    for i in range(n):
        dst[0, i], dst[h - 1, i] = flat[0, i], flat[h - 1, i]
        pk[0, i] = np.float32(flat[0, i]) * _K
        pk[1, i] = np.float32(flat[1, i]) * _K
    for y in range(1, h - 1):
        above, row, below = pk[(y - 1) % 3], pk[y % 3], pk[(y + 1) % 3]
        src, cur, d = flat[y + 1], flat[y], dst[y]
        for i in range(n):
            below[i] = np.float32(src[i]) * _K
        for i in range(3):
            d[i], d[n - 1 - i] = cur[i], cur[n - 1 - i]
        for k in range(n - 6):  # pixel i = k + 3
            ss = below[k] + below[k + 3] + below[k + 6]
            ss += row[k] + np.float32(cur[k + 3]) * _K5 + row[k + 6]
            ss += above[k] + above[k + 3] + above[k + 6]
            # a weighted mean of 0..255 plus 0.5: truncation rounds, no clipping needed
            d[k + 3] = np.uint8(ss + np.float32(0.5))


@nb.njit(nogil=True, fastmath=False, cache=True)
def _histograms(img):
    hist = np.zeros((3, 256), np.int64)
    for y in range(img.shape[0]):
        row = img[y]
        for x in range(img.shape[1]):
            hist[0, row[x, 0]] += 1
            hist[1, row[x, 1]] += 1
            hist[2, row[x, 2]] += 1
    return hist


@nb.njit(nogil=True, fastmath=False, cache=True)
def _identity_luts():
    luts = np.empty((3, 256), np.uint8)
    for c in range(3):
        for i in range(256):
            luts[c, i] = i
    return luts


@nb.njit(nogil=True, fastmath=False, cache=True)
def _autocontrast_luts(hist):
    """ImageOps.autocontrast (no cutoff): stretch each channel's [min, max]."""
    luts = _identity_luts()
    for c in range(3):
        lo = 0
        while lo < 256 and hist[c, lo] == 0:
            lo += 1
        hi = 255
        while hi >= 0 and hist[c, hi] == 0:
            hi -= 1
        if hi <= lo:
            continue
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        for i in range(256):
            luts[c, i] = min(max(int(i * scale + offset), 0), 255)
    return luts


@nb.njit(nogil=True, fastmath=False, cache=True)
def _equalize_luts(hist):
    """ImageOps.equalize: each channel's cumulative histogram, Pillow's rounding."""
    luts = _identity_luts()
    for c in range(3):
        total = 0
        last = 0
        used = 0
        for i in range(256):
            if hist[c, i]:
                total += hist[c, i]
                last = hist[c, i]
                used += 1
        if used <= 1:
            continue
        step = (total - last) // 255
        if step == 0:
            continue
        n = step // 2
        for i in range(256):
            luts[c, i] = min(n // step, 255)
            n += hist[c, i]
    return luts


@nb.njit(nogil=True, fastmath=False, cache=True)
def _apply_luts(img, luts):
    for y in range(img.shape[0]):
        row = img[y]
        for x in range(img.shape[1]):
            row[x, 0] = luts[0, row[x, 0]]
            row[x, 1] = luts[1, row[x, 1]]
            row[x, 2] = luts[2, row[x, 2]]
