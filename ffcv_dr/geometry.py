"""Numba kernels for the geometric part of an augmentation: boxes and flips."""
import math

import numba as nb

from .replay_clock import STREAM_FRESH, uniform


@nb.njit(nogil=True, fastmath=False, cache=True)
def scale_box(top, left, height, width, orig_h, orig_w, img_h, img_w):
    """Map a box in original-image pixels to the stored image, clamped inside it."""
    if orig_h != img_h or orig_w != img_w:
        sy = img_h / orig_h
        sx = img_w / orig_w
        bottom = int(round((top + height) * sy))
        right = int(round((left + width) * sx))
        top = int(round(top * sy))
        left = int(round(left * sx))
        height = bottom - top
        width = right - left
    top = min(max(top, 0), img_h - 1)
    left = min(max(left, 0), img_w - 1)
    height = min(max(height, 1), img_h - top)
    width = min(max(width, 1), img_w - left)
    return top, left, height, width


@nb.njit(nogil=True, fastmath=False, cache=True)
def random_resized_crop(height, width, scale_lo, scale_hi, ratio_lo, ratio_hi,
                        seed, epoch, index):
    """torchvision's RandomResizedCrop.get_params, drawing from the replay schedule."""
    area = height * width
    log_lo = math.log(ratio_lo)
    log_hi = math.log(ratio_hi)
    c = STREAM_FRESH
    for _ in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(seed, epoch, index, c))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(seed, epoch, index, c + 1))
        c += 2
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(seed, epoch, index, c) * (height - h + 1))
            left = int(uniform(seed, epoch, index, c + 1) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w = width
        h = int(round(w / ratio_lo))
    elif in_ratio > ratio_hi:
        h = height
        w = int(round(h * ratio_hi))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@nb.njit(nogil=True, fastmath=False, cache=True)
def fresh_flip(seed, epoch, index):
    """The flip coin of a fresh augmentation (p = 0.5, as ml-dr's recipe)."""
    return uniform(seed, epoch, index, STREAM_FRESH + 40) < 0.5


@nb.njit(nogil=True, fastmath=False, cache=True)
def hflip_inplace(img):
    """Mirror an RGB image left to right (per-pixel swaps of the three channels)."""
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        row = img[y]
        for x in range(w // 2):
            r = w - 1 - x
            a0, a1, a2 = row[x, 0], row[x, 1], row[x, 2]
            row[x, 0], row[x, 1], row[x, 2] = row[r, 0], row[r, 1], row[r, 2]
            row[r, 0], row[r, 1], row[r, 2] = a0, a1, a2


@nb.njit(nogil=True, fastmath=False, cache=True)
def random_erasing(height, width, p, seed, epoch, index, stream):
    """torchvision's RandomErasing.get_params (scale 0.02-0.33, ratio 0.3-3.3)
    behind a coin of probability ``p``, drawing from the replay schedule.
    Returns (top, left, h, w); h == 0 means no erasing."""
    if uniform(seed, epoch, index, stream) >= p:
        return 0, 0, 0, 0
    area = height * width
    log_lo = math.log(0.3)
    log_hi = math.log(3.3)
    c = stream + 1
    for _ in range(10):
        erase_area = area * (0.02 + 0.31 * uniform(seed, epoch, index, c))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(seed, epoch, index, c + 1))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if h < height and w < width:
            top = int(uniform(seed, epoch, index, c + 2) * (height - h + 1))
            left = int(uniform(seed, epoch, index, c + 3) * (width - w + 1))
            return top, left, h, w
        c += 4
    return 0, 0, 0, 0


@nb.njit(nogil=True, fastmath=False, cache=True)
def erase(img, top, left, height, width):
    """Zero a box (clipped to the image): ml-dr's RandomErasing before Normalize."""
    img[max(top, 0):max(top + height, 0), max(left, 0):max(left + width, 0)] = 0
