"""Packing of ml-dr reinforcements into records, compiled.

The checks here are only that each value fits its field (the record's
integer widths, a finite float32); whether the record makes sense is
:mod:`ffcv_dr.rules`' to say, for every file written. They return the first
offending row: :mod:`ffcv_dr.mldr.records` turns it into a message naming the file
and the reinforcement. As NumPy expressions, with the fancy-indexed writes
into packed records, they took a third of ``ffcv-dr convert``'s time per
image (some 30 array passes over 400 reinforcements).
"""
import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def store_views(rows, crops, flips, has_ra, ra, has_re, erase, erase_max,
                crop_out, flags_out, ra_op_out, ra_mag_out, erase_out, flip, ra_flag, erase_flag):
    """Write view i (see :class:`ffcv_dr.mldr.records.Views`) into row rows[i] of the
    record fields ``*_out``. Returns (problem, i): the first view whose crop
    does not fit uint16 (1), whose RandAugment op id is not an integer in
    0..255 or magnitude not a finite float32 (2), or whose erasing box does
    not fit 0..erase_max (3), each looked for over all views in that order;
    (0, -1) once all are written. Nothing is written unless all fit."""
    n = len(rows)
    for i in range(n):
        if _unfit(crops[i], 65535):
            return 1, i
    for i in range(n):
        for o in range(ra.shape[1] if has_ra[i] else 0):
            op, mag = ra[i, o, 0], ra[i, o, 1]
            if not (op == np.floor(op) and 0 <= op <= 255 and np.abs(mag) <= 3.4e38):
                return 2, i
    for i in range(n):
        if has_re[i] and _unfit(erase[i], erase_max):
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
def _unfit(box, top):
    """Whether a box has a value outside 0..top."""
    for k in range(4):
        if not 0 <= box[k] <= top:
            return True
    return False


@nb.njit(cache=True, nogil=True)
def topk_unfit(values, ids):
    """(problem, row): the first row whose top-k probabilities are not finite
    (1) or whose class ids do not fit uint16 (3); (0, -1) when all fit."""
    n, k = values.shape
    for i in range(n):
        for t in range(k):
            if not np.isfinite(values[i, t]):
                return 1, i
    for i in range(n):
        for t in range(k):
            if not 0 <= ids[i, t] <= 65535:
                return 3, i
    return 0, -1
