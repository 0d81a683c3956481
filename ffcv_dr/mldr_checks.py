"""Range checks and packing of ml-dr reinforcements, compiled.

The checks return the first offending row: :mod:`ffcv_dr.mldr` turns it into
a message naming the file and the reinforcement. As NumPy expressions, with
the fancy-indexed writes into packed records, they took a third of ``ffcv-dr
convert``'s time per image (some 30 array passes over 400 reinforcements).
"""
import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def store_views(rows, crops, flips, has_ra, ra, has_re, erase, heights, widths, num_ops, size,
                crop_out, flags_out, ra_op_out, ra_mag_out, erase_out, flip, ra_flag, erase_flag):
    """Check n views (see :class:`ffcv_dr.mldr.Views`) and write view i into
    row rows[i] of the record fields ``*_out``. Returns (problem, i): the first
    view whose crop leaves its heights[i] x widths[i] image (1), whose
    RandAugment op id is not an integer in 0..num_ops-1 or magnitude not
    finite (2), or whose erasing box leaves the size x size output (3), each
    looked for over all views in that order; (0, -1) once all are written.
    Nothing is written unless all are fine."""
    n = len(rows)
    for i in range(n):
        if _box_outside(crops[i], heights[i], widths[i]):
            return 1, i
    for i in range(n):
        for o in range(ra.shape[1] if has_ra[i] else 0):
            op, mag = ra[i, o, 0], ra[i, o, 1]
            if not (op == np.floor(op) and 0 <= op < num_ops and np.isfinite(mag)):
                return 2, i
    for i in range(n):
        if has_re[i] and _box_outside(erase[i], size, size):
            return 3, i
    for i in range(n):
        r = rows[i]
        flags = flip if flips[i] else 0
        for k in range(4):
            crop_out[r, k] = crops[i, k]
        if has_ra[i]:
            flags |= ra_flag
            for o in range(ra.shape[1]):
                ra_op_out[r, o] = ra[i, o, 0]
                ra_mag_out[r, o] = ra[i, o, 1]
        if has_re[i]:
            flags |= erase_flag
            for k in range(4):
                erase_out[r, k] = erase[i, k]
        flags_out[r] = flags
    return 0, -1


@nb.njit(cache=True, nogil=True, inline='always')
def _box_outside(box, height, width):
    """Whether a (top, left, height, width) box is empty or leaves its area."""
    top, left, h, w = box[0], box[1], box[2], box[3]
    return top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > height or left + w > width


@nb.njit(cache=True, nogil=True)
def topk_problem(values, ids, num_classes):
    """(problem, row): the first row whose top-k probabilities are not finite
    (1), not in [0, 1] or summing above 1 (2), whose class ids are not in
    0..num_classes-1 (3) or repeat (4); (0, -1) when all are fine. Problems are
    looked for in that order, each over all rows."""
    n, k = values.shape
    for i in range(n):
        for t in range(k):
            if not np.isfinite(values[i, t]):
                return 1, i
    for i in range(n):
        total = 0.0
        for t in range(k):
            if not 0.0 <= values[i, t] <= 1.0:
                return 2, i
            total += values[i, t]
        if total > 1.0 + 1e-3:
            return 2, i
    for i in range(n):
        for t in range(k):
            if not 0 <= ids[i, t] < num_classes:
                return 3, i
    for i in range(n):
        for t in range(k):
            for u in range(t):
                if ids[i, t] == ids[i, u]:
                    return 4, i
    return 0, -1
