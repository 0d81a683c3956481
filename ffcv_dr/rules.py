"""What makes an ffcv-dr file sound enough to open: the checks cheap enough
to run on every open (header, both fields' recipes, the metadata table, data
pointers and block sizes, labels), vectorised over the metadata so that a
million samples take well under a second.

A ``.beton`` is data from elsewhere. :class:`ffcv_dr.beton.BetonFile` (and
with it the Loader, ``replay``, ``inspect``, ``info`` and ``train``) refuses
a file that fails them, naming the file, the first bad sample and the field;
``verify`` reports every failure. What is too large to check up front (each
reinforcement record and top-k block) is checked by ``verify``, and the
kernels guard every value they use as an index.
"""
from __future__ import annotations

import os

import numba as nb
import numpy as np

from .format import (FLIP, HALF_TO_FLOAT, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA,
                     MAX_SIDE, STORED_JPEG, STORED_RAW, topk_block_size)
from .record_bytes import read_u16
from .replay_clock import DAMAGED, ORIG_H, ORIG_W


def header_problem(path: str):
    """What is wrong with FFCV's header of ``path`` before FFCV's Reader trusts
    it (it allocates the metadata table the header claims), or None."""
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        return f'{size} bytes: too short for an FFCV header'
    header = np.fromfile(path, HeaderType, count=1)[0]
    if header['version'] != CURRENT_VERSION:
        return (f'not an FFCV .beton: its header says file format {header["version"]}, and FFCV '
                f'writes format {CURRENT_VERSION}')
    page = int(header['page_size'])
    if page < 4096 or page & (page - 1):
        return f'page size {page} is not a power of two of at least 4096: the file is damaged'
    tables = HeaderType.itemsize + int(header['num_fields']) * FieldDescType.itemsize
    if tables + int(header['num_samples']) > size or not header['alloc_table_ptr'] < size:
        return (f'the header claims {header["num_samples"]} samples in {header["num_fields"]} fields, '
                f'more than {size} bytes can hold: the file is truncated or damaged')
    return None


def file_problems(f) -> tuple:
    """(problems, unsound) for an opened :class:`~ffcv_dr.beton.BetonFile`:
    (kind, message) of everything wrong with its structure, each naming its
    first sample, and a mask of the samples concerned (all of them when the
    file as a whole is wrong). No problems: the file is sound."""
    n, recipe = len(f), f.recipe
    everything = np.ones(n, bool)
    if f.reader.handlers['target'].recipe != recipe:
        return [('recipe', 'the image and target fields hold different recipes '
                           f'({recipe} and {f.reader.handlers["target"].recipe})')], everything
    metadata_end = (f.reader.header.dtype.itemsize + f.reader.field_descriptors.nbytes
                    + n * f.reader.metadata.dtype.itemsize)
    size = os.path.getsize(f.source)
    if len(f.reader.metadata) != n or metadata_end > size:
        return [('counts', f'the header claims {n} samples, but the file holds '
                           f'{len(f.reader.metadata)} metadata rows')], everything
    ends = f._ptrs.astype(np.uint64) + f._sizes.astype(np.uint64)
    if len(ends) != 2 * n or (len(ends) and (int(ends.max()) > size or int(f._ptrs.min()) < metadata_end)):
        return [('truncated file',
                 f'the allocation table holds {len(ends)} blocks for {n} images, ending at byte '
                 f'{int(ends.max()) if len(ends) else 0} of {size}: the file is truncated or '
                 'damaged')], everything
    problems, unsound = [], np.zeros(n, bool)

    def bad(kind, mask, what):
        rows = np.flatnonzero(mask)
        if rows.size:
            more = f' (and {rows.size - 1} more samples)' if rows.size > 1 else ''
            problems.append((kind, f'sample {rows[0]}: {what(rows[0])}{more}'))
            unsound[rows] = True

    im, tg = f.image_meta, f.target_meta
    image_size, image_ok = _block_sizes(f, im['data_ptr'])
    target_size, target_ok = _block_sizes(f, tg['data_ptr'])
    bad('bad block pointer', ~image_ok, lambda i: f'image field: no data block starts at byte '
                                                   f'{im[i]["data_ptr"]}')
    bad('bad block pointer', ~target_ok, lambda i: f'target field: no data block starts at byte '
                                                    f'{tg[i]["data_ptr"]}')
    width, height = im['width'].astype(np.int64), im['height'].astype(np.int64)
    bad('image size', (width < 1) | (height < 1) | (im['orig_width'] < 1) | (im['orig_height'] < 1),
        lambda i: f'image field: stored {width[i]}x{height[i]}, original '
                  f'{im[i]["orig_width"]}x{im[i]["orig_height"]}: sizes must be at least 1')
    ow, oh = im['orig_width'].astype(np.int64), im['orig_height'].astype(np.int64)
    sized = (width >= 1) & (height >= 1) & (ow >= 1) & (oh >= 1)
    bad('image size', sized & ((ow > MAX_SIDE) | (oh > MAX_SIDE)),
        lambda i: f'image field: original size {ow[i]}x{oh[i]} is beyond the {MAX_SIDE} pixels a side '
                  'that stored crops address')
    # stored as it is, or shrunk keeping its aspect ratio (FFCV's resizer rounds each side down)
    kept = (width <= ow) & (height <= oh) & (np.abs(width * oh - height * ow) < np.maximum(ow, oh))
    bad('image size', sized & (ow <= MAX_SIDE) & (oh <= MAX_SIDE) & ~kept,
        lambda i: f'image field: stored {width[i]}x{height[i]} is neither the original {ow[i]}x{oh[i]} '
                  'nor a shrink of it')
    bad('storage mode', (im['mode'] != STORED_JPEG) & (im['mode'] != STORED_RAW),
        lambda i: f'image field: unknown storage mode {im[i]["mode"]}')
    payload = image_size - f.params_size
    raw = im['mode'] == STORED_RAW
    bad('block size', image_ok & ((payload < 1) | (raw & (payload != 3 * width * height))),
        lambda i: f'image field: a block of {image_size[i]} bytes cannot hold {recipe.num_samples} '
                  f'records of {f.record_dtype.itemsize} bytes and the '
                  + (f'{width[i]}x{height[i]}x3 raw pixels' if raw[i] else 'JPEG'))
    bad('block size', target_ok & (target_size != topk_block_size(recipe)),
        lambda i: f'target field: a block of {target_size[i]} bytes, not the '
                  f'{topk_block_size(recipe)} of {recipe.num_samples} top-{recipe.topk} records')
    bad('label', tg['label'] >= recipe.num_classes,
        lambda i: f'target field: label {tg[i]["label"]} is not a class id below {recipe.num_classes}')
    labels = f.labels_field()
    if labels is not None:
        bad('label', labels != tg['label'],
            lambda i: f'label field: label {labels[i]}, but the target field says {tg[i]["label"]}')
    return problems, unsound


def _block_sizes(f, ptrs) -> tuple:
    """(size of the block at each pointer, whether a block starts there)."""
    k = np.minimum(np.searchsorted(f._ptrs, ptrs), max(len(f._ptrs) - 1, 0))
    if not len(f._ptrs):
        return np.zeros(len(ptrs), np.int64), np.zeros(len(ptrs), bool)
    ok = f._ptrs[k] == ptrs
    return np.where(ok, f._sizes[k], 0).astype(np.int64), ok


# What the compiled checks below return: 0, or the first problem found.
PROBLEMS = ('', 'crop box', 'flags', 'RandAugment op', 'RandAugment magnitude', 'erase box',
            'mixing flags', 'paired image index', 'MixUp lambda', 'CutMix box',
            'top-k probabilities', 'top-k class ids', 'repeated top-k class ids')
(CROP, FLAGS, RA_OP, RA_MAGNITUDE, ERASE, MIX_FLAGS, PAIR, MIXUP, CUTMIX, TOPK_PROB,
 TOPK_CLASS, TOPK_REPEAT) = range(1, len(PROBLEMS))


def describe(problem: int, recipe) -> str:
    """What rule a record broke, for the error that names its file."""
    return {CROP: 'RandomResizedCrop box lies outside its image',
            FLAGS: 'unknown flag bits',
            RA_OP: 'bad RandAugment op (op id 0..13)',
            RA_MAGNITUDE: 'RandAugment magnitude beyond what RandAugment can draw at any magnitude',
            ERASE: f'RandomErasing box lies outside the {recipe.size}x{recipe.size} output',
            MIX_FLAGS: 'MixUp/CutMix parameters without a paired image',
            PAIR: 'paired image index lies outside the dataset',
            MIXUP: 'MixUp lambda must be in [0, 1]',
            CUTMIX: f'CutMix needs a lambda in [0, 1] and a box inside the {recipe.size}px output',
            TOPK_PROB: 'probabilities must lie in [0, 1] and sum to at most 1',
            TOPK_CLASS: f'class ids must be integers in 0..{recipe.num_classes - 1}',
            TOPK_REPEAT: 'class ids repeat'}[problem]


def magnitude_limits(recipe) -> np.ndarray:
    """(lo, hi) per RandAugment op: what torchvision's RandAugment can draw at
    any magnitude bin for this recipe's output size (translations in its
    pixels); (0, 0) for the ops that take none."""
    from .randaugment import NUM_OPS, POSTERIZE, SOLARIZE, magnitude_table
    top, signed = magnitude_table(recipe.size, recipe.size, 30)
    limits = np.zeros((NUM_OPS, 2), np.float64)
    limits[signed, 0], limits[signed, 1] = -top[signed] * 1.0001, top[signed] * 1.0001
    limits[POSTERIZE] = (top[POSTERIZE], 8.0)
    limits[SOLARIZE] = (0.0, 255.0)
    return limits


@nb.njit(cache=True, nogil=True)
def view_problem(rec, view, layout, limits, orig_h, orig_w):
    """0, or what is wrong with one view of a record (see :func:`record_problem`)."""
    flags = rec[view.flags]
    known = FLIP | (HAS_RA if layout.num_ops else 0) | (HAS_ERASE if view.erase >= 0 else 0)
    if flags & ~known:
        return FLAGS
    c = view.crop
    top, left, h, w = read_u16(rec, c), read_u16(rec, c + 2), read_u16(rec, c + 4), read_u16(rec, c + 6)
    if h < 1 or w < 1 or top + h > orig_h or left + w > orig_w:
        return CROP
    if flags & HAS_RA:
        for k in range(layout.num_ops):
            op = rec[view.ra_op + k]
            if op >= limits.shape[0]:
                return RA_OP
            m = rec[view.ra_mag + 4 * k:view.ra_mag + 4 * k + 4].view(np.float32)[0]
            if not limits[op, 0] <= m <= limits[op, 1]:  # NaN fails too
                return RA_MAGNITUDE
    if flags & HAS_ERASE:
        e = view.erase
        if view.erase_wide:
            top, left = read_u16(rec, e), read_u16(rec, e + 2)
            h, w = read_u16(rec, e + 4), read_u16(rec, e + 6)
        else:
            top, left, h, w = np.int64(rec[e]), np.int64(rec[e + 1]), np.int64(rec[e + 2]), np.int64(rec[e + 3])
        if top + h > layout.size or left + w > layout.size:
            return ERASE
    return 0


@nb.njit(cache=True, nogil=True)
def record_problem(rec, layout, limits, index, orig_sizes):
    """0, or the first thing wrong with a reinforcement record of image
    ``index``: ``orig_sizes`` holds every image's (original height, width),
    the pixels of the stored crops. The loader replays only records that
    pass, ``verify`` reports the others, and convert and reinforce write none."""
    if rec.size < layout.record_size:  # rules' block sizes rule it out; never read past the block
        return FLAGS
    problem = view_problem(rec, layout.own, layout, limits, orig_sizes[index, 0], orig_sizes[index, 1])
    if problem or not layout.mixing:
        return problem
    flags = rec[layout.mix_flags]
    if flags & ~(HAS_PAIR | HAS_MIXUP | HAS_CUTMIX) or (flags & (HAS_MIXUP | HAS_CUTMIX) and not flags & HAS_PAIR):
        return MIX_FLAGS
    if flags & HAS_PAIR:
        pair = read_u16(rec, layout.pair) | (read_u16(rec, layout.pair + 2) << 16)
        if pair >= orig_sizes.shape[0]:
            return PAIR
        problem = view_problem(rec, layout.paired, layout, limits, orig_sizes[pair, 0], orig_sizes[pair, 1])
        if problem:
            return problem
    if flags & HAS_MIXUP:
        lam = rec[layout.mixup_lam:layout.mixup_lam + 4].view(np.float32)[0]
        if not 0.0 <= lam <= 1.0:
            return MIXUP
    if flags & HAS_CUTMIX:
        lam = rec[layout.cutmix_lam:layout.cutmix_lam + 4].view(np.float32)[0]
        b = layout.cutmix_box
        r1, c1, r2, c2 = read_u16(rec, b), read_u16(rec, b + 2), read_u16(rec, b + 4), read_u16(rec, b + 6)
        if not 0.0 <= lam <= 1.0 or r1 > r2 or c1 > c2 or r2 > layout.size or c2 > layout.size:
            return CUTMIX
    return 0


@nb.njit(cache=True, nogil=True)
def topk_problem(rec, topk, num_classes):
    """0, or what is wrong with a top-k record (k float16 probabilities, then
    k uint16 class ids): probabilities not finite, outside [0, 1] or summing
    above 1 (+1e-3 for float16 rounding); class ids not below num_classes;
    repeated class ids."""
    if rec.size < 4 * topk:
        return TOPK_PROB
    total = 0.0
    for t in range(topk):
        p = HALF_TO_FLOAT[read_u16(rec, 2 * t)]
        if not 0.0 <= p <= 1.0:
            return TOPK_PROB
        total += p
    if total > 1.0 + 1e-3:
        return TOPK_PROB
    for t in range(topk):
        c = read_u16(rec, 2 * (topk + t))
        if c >= num_classes:
            return TOPK_CLASS
        for u in range(t):
            if read_u16(rec, 2 * (topk + u)) == c:
                return TOPK_REPEAT
    return 0


@nb.njit(cache=True, nogil=True)
def sample_problem(params, topk_block, j, layout, limits, topk, num_classes, index, orig_sizes):
    """0, or what is wrong with reinforcement ``j`` of image ``index``: its
    record (in ``params``, the image block's records) or else its top-k (in
    the target field's block). Both decoders ask before replaying j."""
    rs, ts = layout.record_size, 4 * topk
    problem = record_problem(params[j * rs:(j + 1) * rs], layout, limits, index, orig_sizes)
    if problem:
        return problem
    return topk_problem(topk_block[j * ts:(j + 1) * ts], topk, num_classes)


@nb.njit(cache=True, nogil=True)
def replayable(j, params, topk_block, index, table, layout, limits, topk, num_classes):
    """``j``, or -1 (a fresh augmentation with the label) when reinforcement j
    of sample ``index`` breaks a rule, which is marked in the loader's
    ``table`` (see :class:`ffcv_dr.replay_clock.ReplayClock`). The image, target
    and index decoders all ask, so they agree."""
    if j >= 0 and sample_problem(params, topk_block, j, layout, limits, topk, num_classes, index,
                                 table[:, ORIG_H:ORIG_W + 1]):
        table[index, DAMAGED] = 1
        return -1
    return j


@nb.njit(cache=True, nogil=True)
def first_problem(params, topk_block, layout, limits, topk, num_classes, index, orig_sizes, num_samples):
    """(problem, j) of the first reinforcement of one image that breaks a rule;
    (0, -1) when none does: what convert and reinforce write must pass."""
    for j in range(num_samples):
        problem = sample_problem(params, topk_block, j, layout, limits, topk, num_classes, index,
                                 orig_sizes)
        if problem:
            return problem, j
    return 0, -1


@nb.njit(cache=True, nogil=True)
def image_problems(params, topk_block, layout, limits, topk, num_classes, index, orig_sizes, out):
    """``out[j]`` <- :func:`sample_problem` of every reinforcement of one image."""
    for j in range(out.shape[0]):
        out[j] = sample_problem(params, topk_block, j, layout, limits, topk, num_classes, index,
                                orig_sizes)
