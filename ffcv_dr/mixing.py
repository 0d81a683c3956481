"""MixUp and CutMix of a replayed image with its replayed partner, in numba.

ml-dr mixes normalised float tensors; normalisation is affine per channel, so
mixing the uint8 images first and normalising later gives the same result up
to the final rounding.
"""
import numba as nb
import numpy as np


@nb.njit(nogil=True, fastmath=False, cache=True)
def mixup(img, pair, lam):
    """img <- round(lam * img + (1 - lam) * pair)."""
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            for c in range(img.shape[2]):
                v = lam * np.float64(img[y, x, c]) + (1.0 - lam) * np.float64(pair[y, x, c])
                img[y, x, c] = np.uint8(min(max(v + 0.5, 0.0), 255.0))


@nb.njit(nogil=True, fastmath=False, cache=True)
def cutmix(img, pair, r1, c1, r2, c2):
    """Rows r1:r2 and columns c1:c2 of img come from pair."""
    r1, c1 = max(r1, 0), max(c1, 0)
    img[r1:max(r2, r1), c1:max(c2, c1)] = pair[r1:max(r2, r1), c1:max(c2, c1)]
