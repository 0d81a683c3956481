"""ml-dr's reinforcements as ffcv-dr records: the layout of a sample read into
arrays, each value checked to fit its field (the compiled reader where it
knows the layout, the unpickled objects otherwise), and ml-dr's config as a
:class:`~ffcv_dr.format.Recipe`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..format import (DEFAULT_ERASE_P, DEFAULT_RA_MAGNITUDE, DEFAULT_RA_OPS, DEFAULT_RATIO,
                      DEFAULT_SCALE, FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA, RA_OPS,
                      Recipe, reinforcement_dtype, topk_dtype)
from .checks import store_views, topk_unfit
from .limits import sample_limits
from .reader import read_views
from .unpickler import MldrError, shown, load_pickle, unzip_pickle


def recipe_from_config(config, name: str, num_classes: int) -> Recipe:
    """The ffcv-dr recipe matching an ml-dr ``config.pth.tar``."""
    try:
        rein = config['reinforce']
        aug = rein['image_augmentation']
        enabled = lambda key: bool(aug.get(key, {}).get('enable', False))  # noqa: E731
        if not enabled('random_resized_crop'):
            raise MldrError(f'{name}: only recipes with random_resized_crop are supported')
        ra, rrc = aug.get('rand_augment', {}), aug['random_resized_crop']
        return Recipe(num_samples=int(rein['num_samples']), topk=int(rein['topk']),
                      num_classes=num_classes,
                      ra_ops=int(ra.get('num_ops', DEFAULT_RA_OPS)) if enabled('rand_augment') else 0,
                      erase=enabled('random_erase'),
                      mixing=enabled('mixup') or enabled('cutmix'),
                      size=int(rrc.get('size', 224)),
                      # torchvision's defaults where ml-dr's config leaves them out
                      scale=tuple(rrc.get('scale', DEFAULT_SCALE)),
                      ratio=tuple(rrc.get('ratio', DEFAULT_RATIO)),
                      ra_magnitude=int(ra.get('magnitude', DEFAULT_RA_MAGNITUDE)),
                      erase_p=float(aug.get('random_erase', {}).get('p', DEFAULT_ERASE_P)))
    except MldrError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MldrError(f'{name}: not an ml-dr reinforcement config ({type(e).__name__}: {e})') from None


@dataclass
class ImageSizes:
    """(width, height) of every image in the original pixel space, for box checks."""
    widths: np.ndarray
    heights: np.ndarray


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def _numbers(values, shape, kinds, what, name, rows):
    """``values`` as one array of ``shape`` whose dtype kind is in ``kinds``
    (one NumPy call for all reinforcements); the error names the first bad one."""
    try:
        arr = np.array(values)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.shape != shape or arr.dtype.kind not in kinds:
        for j, v in zip(rows, values):  # find the culprit for the message
            one = np.array(v, dtype=object)
            if one.shape != shape[1:] or not all(
                    isinstance(x, bool if kinds == 'b' else (int, np.integer) if kinds == 'iu'
                               else (int, float, np.integer, np.floating)) for x in one.reshape(-1)):
                raise MldrError(f'{name} (reinforcement {j}): {what}, got {shown(v)}')
        raise MldrError(f'{name}: {what}')
    return arr


def _first(bad, rows):
    return rows[int(np.flatnonzero(bad)[0])]


@dataclass
class Views:
    """One view (crop, flip, RandAugment, erasing) of each of n reinforcements
    as arrays; rows of ``ra`` and ``erase`` count only where ``has_ra`` and
    ``has_re`` are set."""
    crops: np.ndarray    # (n, 4) top, left, height, width
    flips: np.ndarray    # (n,) bool
    has_ra: np.ndarray   # (n,) bool
    ra: np.ndarray       # (n, ra_ops, 2) op id, magnitude
    has_re: np.ndarray   # (n,) bool
    erase: np.ndarray    # (n, 4) top, left, height, width


def _view_arrays(views, rows, recipe, name) -> Views:
    """``views`` (ml-dr's ``[rrc, flip, ra, re]`` lists) as :class:`Views`;
    errors name the first reinforcement (from ``rows``) of the wrong shape or type."""
    for j, v in zip(rows, views):
        if not isinstance(v, (list, tuple)) or len(v) != 4:
            raise MldrError(f'{name} (reinforcement {j}): params must be [rrc, flip, ra, re], got {shown(v)}')
    n = len(rows)
    crops = _numbers([v[0] for v in views], (n, 4), 'iu',
                     'RandomResizedCrop box must be 4 integers (top, left, height, width)', name, rows)
    flips = _numbers([v[1] for v in views], (n,), 'b', 'flip must be a bool', name, rows)
    has_ra = np.array([v[2] is not None for v in views], bool)
    ra = np.zeros((n, recipe.ra_ops, 2))
    if has_ra.any() and recipe.ra_ops:
        ra[has_ra] = _numbers([v[2] for v in views if v[2] is not None], (int(has_ra.sum()), recipe.ra_ops, 2),
                              'fiu', f'expected {recipe.ra_ops} RandAugment (op id, magnitude) pairs',
                              name, rows[has_ra])
    has_re = np.array([v[3] is not None for v in views], bool)
    erase = np.zeros((n, 4), np.int64)
    if has_re.any() and recipe.erase:
        erase[has_re] = _numbers([v[3] for v in views if v[3] is not None], (int(has_re.sum()), 4), 'iu',
                                 'RandomErasing box must be 4 integers (top, left, height, width)',
                                 name, rows[has_re])
    return Views(crops, flips, has_ra, ra, has_re, erase)


def _store_views(records, rows, prefix, v: Views, recipe, name):
    """Store the views of the reinforcements in ``rows``, each value checked to
    fit its field (whether it makes sense is :mod:`ffcv_dr.rules`')."""
    if v.has_ra.any() and not recipe.ra_ops:
        raise MldrError(f'{name} (reinforcement {_first(v.has_ra, rows)}): RandAugment parameters '
                        'in a recipe without RandAugment')
    if v.has_re.any() and not recipe.erase:
        raise MldrError(f'{name} (reinforcement {_first(v.has_re, rows)}): RandomErasing box in a '
                        'recipe without erasing')
    none = np.zeros((0, 0), np.uint8)
    field = lambda f, on: records[prefix + f] if on else none  # noqa: E731
    problem, k = store_views(np.asarray(rows, np.int64), v.crops, v.flips, v.has_ra, v.ra, v.has_re,
                             v.erase, 255 if recipe.size <= 255 else 65535,
                             records[prefix + 'crop'], records[prefix + 'flags'],
                             field('ra_op', recipe.ra_ops), field('ra_mag', recipe.ra_ops),
                             field('erase', recipe.erase), FLIP, HAS_RA, HAS_ERASE)
    if problem == 1:
        raise MldrError(f'{name} (reinforcement {rows[k]}): RandomResizedCrop box {tuple(v.crops[k])} lies '
                        'outside its image')
    if problem == 2:
        raise MldrError(f'{name} (reinforcement {rows[k]}): bad RandAugment op '
                        f'(op id 0..{len(RA_OPS) - 1}, finite magnitude)')
    if problem == 3:
        raise MldrError(f'{name} (reinforcement {rows[k]}): RandomErasing box '
                        f'lies outside the {recipe.size}x{recipe.size} output')


def _fill_views(records, rows, prefix, views, recipe, name):
    rows = np.asarray(rows)
    if len(rows):
        _store_views(records, rows, prefix, _view_arrays(views, rows, recipe, name), recipe, name)


def _fill_mixing(records, params, recipe, sizes: ImageSizes, name):
    rows = np.arange(len(params))
    for j, p in enumerate(params):
        if len(p) != 7:
            raise MldrError(f'{name} (reinforcement {j}): mixing params must have 7 entries, got {len(p)}')
    paired = np.array([p[0] is not None for p in params], bool)
    _fill_views(records, rows[~paired], '', [p[1:5] for p in params if p[0] is None], recipe, name)
    if paired.any():
        pairs = _numbers([p[0] for p in params if p[0] is not None], (int(paired.sum()),), 'iu',
                         'the paired image index must be an integer', name, rows[paired])
        bad = (pairs < 0) | (pairs >= 1 << 32)
        if bad.any():
            raise MldrError(f'{name} (reinforcement {_first(bad, rows[paired])}): paired image index '
                            f'{pairs[bad][0]} does not fit 32 bits')
        bad = sizes.widths[np.minimum(pairs, len(sizes.widths) - 1)] == 0  # indices past the end: rules
        bad &= pairs < len(sizes.widths)
        if bad.any():
            raise MldrError(f'{name} (reinforcement {_first(bad, rows[paired])}): mixes with image '
                            f'{pairs[bad][0]}, which was skipped as unreadable')
        views = [p[1:5] for p in params if p[0] is not None]
        for j, v in zip(rows[paired], views):
            if not all(isinstance(x, (list, tuple)) and len(x) == 2 for x in v):
                raise MldrError(f'{name} (reinforcement {j}): with a paired image each of rrc, flip, '
                                'ra, re must be a pair')
        _fill_views(records, rows[paired], '', [tuple(x[0] for x in v) for v in views], recipe, name)
        _fill_views(records, rows[paired], 'pair_', [tuple(x[1] for x in v) for v in views], recipe, name)
        records['pair'][rows[paired]] = pairs
    for j, (pair, *_, mixup, cutmix) in enumerate(params):
        rec = records[j]
        mix_flags = HAS_PAIR if pair is not None else 0
        if mixup is not None:
            if not _finite(mixup):
                raise MldrError(f'{name} (reinforcement {j}): MixUp lambda must be a number, got {shown(mixup)}')
            rec['mixup_lam'] = float(mixup)
            mix_flags |= HAS_MIXUP
        if cutmix is not None:
            if (not isinstance(cutmix, (list, tuple)) or len(cutmix) != 5 or not _finite(cutmix[0])
                    or not all(isinstance(v, (int, np.integer)) for v in cutmix[1:])):
                raise MldrError(f'{name} (reinforcement {j}): CutMix must be [lam, r1, c1, r2, c2], '
                                f'got {shown(cutmix)}')
            r1, c1, r2, c2 = (int(v) for v in cutmix[1:])
            if not all(0 <= v <= 65535 for v in (r1, c1, r2, c2)):
                raise MldrError(f'{name} (reinforcement {j}): CutMix box {shown(cutmix[1:])} lies outside '
                                f'the {recipe.size}px output')
            rec['cutmix_lam'] = float(cutmix[0])
            rec['cutmix_box'] = (r1, c1, r2, c2)
            mix_flags |= HAS_CUTMIX
        rec['mix_flags'] = mix_flags


def parse_file(data: bytes, expected_index: int, recipe: Recipe, sizes: ImageSizes, name: str):
    """:func:`parse_sample` of the file's bytes ``data``, read by the compiled
    reader where it knows the layout; otherwise (and for every error message)
    unpickled first."""
    limits = sample_limits(recipe.num_samples, recipe.topk)
    data = unzip_pickle(data, name, limits)  # unzipped once, for either reader
    views = None if recipe.mixing else read_views(data, recipe.ra_ops, recipe.topk)
    if views is None:
        return parse_sample(load_pickle(data, name, limits, unzipped=True), expected_index, recipe,
                            sizes, name)
    index, crops, flips, has_ra, ra, has_re, erase, values, ids = views
    _check_header(index, len(crops), expected_index, recipe, name)
    records = np.zeros(recipe.num_samples, reinforcement_dtype(recipe))
    _store_views(records, np.arange(len(crops)), '', Views(crops, flips, has_ra, ra, has_re, erase),
                 recipe, name)
    return records, _store_topk(values, ids, recipe, name)


def _check_header(index, count, expected_index, recipe, name):
    if not isinstance(index, (int, np.integer)) or int(index) != expected_index:
        raise MldrError(f'{name}: holds index {shown(index)}, expected {expected_index}')
    if count != recipe.num_samples:
        raise MldrError(f'{name}: has {count} reinforcements, the config says {recipe.num_samples}')


def parse_sample(obj, expected_index: int, recipe: Recipe, sizes: ImageSizes, name: str):
    """Validate one unpickled ml-dr sample; return (reinforcement records, top-k records).
    The checks run on arrays of all reinforcements at once: ImageNet+ has 400."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[1], list):
        raise MldrError(f'{name}: expected (index, [reinforcements]), got {type(obj).__name__}')
    index, samples = obj
    _check_header(index, len(samples), expected_index, recipe, name)
    params, probs = [], []
    for j, sample in enumerate(samples):
        try:
            params.append(sample['params'])
            values, ids = sample['prob']
        except (TypeError, KeyError, ValueError):
            raise MldrError(f'{name} (reinforcement {j}): expected '
                            '{"params": [...], "prob": (values, ids)}') from None
        if not isinstance(params[-1], (list, tuple)):
            raise MldrError(f'{name} (reinforcement {j}): params must be a list')
        probs.append((values, ids))
    records = np.zeros(recipe.num_samples, reinforcement_dtype(recipe))
    if recipe.mixing:
        _fill_mixing(records, params, recipe, sizes, name)
    else:
        _fill_views(records, np.arange(len(params)), '', params, recipe, name)
    k, n, rows = recipe.topk, len(probs), np.arange(len(probs))
    values = _numbers([p[0] for p in probs], (n, k), 'fiu',
                      f'expected {k} probabilities (finite numbers)', name, rows).astype(np.float64)
    ids = _numbers([p[1] for p in probs], (n, k), 'iu',
                   f'class ids must be integers in 0..{recipe.num_classes - 1} ({k} of them)', name, rows)
    return records, _store_topk(values, ids, recipe, name)


def _store_topk(values, ids, recipe, name):
    """The teacher's top-k of each reinforcement as top-k records, each value
    checked to fit its field (whether they make sense is :mod:`ffcv_dr.rules`')."""
    problem, j = topk_unfit(values, ids)
    if problem:
        what = {1: 'probabilities must be finite numbers',
                3: f'class ids must be integers in 0..{recipe.num_classes - 1}'}[problem]
        raise MldrError(f'{name} (reinforcement {j}): {what}, got '
                        f'{(values if problem < 3 else ids)[j].tolist()!r}')
    topk = np.zeros(len(values), topk_dtype(recipe))
    topk['prob'] = values
    topk['cls'] = ids
    return topk
