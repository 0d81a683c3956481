"""Range checks of ml-dr reinforcements, compiled.

Each returns the first offending row, or -1: :mod:`ffcv_dr.mldr` turns that
into a message naming the file and the reinforcement. As NumPy expressions
these checks took a third of ``ffcv-dr convert``'s time per image (some 20
array passes over 400 reinforcements); here they are one pass each.
"""
import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def box_outside(boxes, heights, widths):
    """First (top, left, height, width) box that is empty or leaves its
    ``heights[i]`` x ``widths[i]`` area."""
    for i in range(len(boxes)):
        top, left, h, w = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > heights[i] or left + w > widths[i]:
            return i
    return -1


@nb.njit(cache=True, nogil=True)
def bad_ra(ra, num_ops):
    """First row of (op id, magnitude) pairs with an op id that is not an
    integer in 0..num_ops-1 or a magnitude that is not finite."""
    for i in range(ra.shape[0]):
        for o in range(ra.shape[1]):
            op, mag = ra[i, o, 0], ra[i, o, 1]
            if not (op == np.floor(op) and 0 <= op < num_ops and np.isfinite(mag)):
                return i
    return -1


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
