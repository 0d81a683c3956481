"""Reading apple/ml-dr's released reinforcements, safely.

ml-dr writes one ``{index}.pth.tar`` per image with ``torch.save``: a zip
holding a plain pickle of ``(index, [{"params": [...], "prob": (values, ids)}])``.
``torch.load(weights_only=False)`` would execute whatever a downloaded pickle
asks for, so the pickle is read with an unpickler that admits only the
builtins it needs and numpy scalars; anything else is refused, naming the file.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
import reprlib
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from .format import (FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA,
                     RA_OPS, Recipe, reinforcement_dtype, topk_dtype)
from .jobs import regular_file
from .mldr_checks import store_views, topk_unfit
from .mldr_limits import CONFIG_LIMITS, Limits, check_pickle, sample_limits
from .mldr_pickle import read_views

SAMPLE_NAME = re.compile(r'(?:^|/)(\d+)\.pth\.tar$')
CONFIG_NAME = re.compile(r'(?:^|/)config\.pth\.tar$')

# A torch.save zip around a pickle: a few small members, headers, padding.
ZIP_OVERHEAD = 64 << 10

_ALLOWED_DTYPES = set('?bBhHiIlLqQefdg') | {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4',
                                            'u8', 'f2', 'f4', 'f8'}


class MldrError(ValueError):
    """An ml-dr input is unreadable or inconsistent; the message names the file."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj, name):
        super().__init__(fileobj)
        self.name = name

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise MldrError(f'{self.name}: refused: the pickle asks for {module}.{name}, '
                            'which an ml-dr reinforcement file never contains')
        return _ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid):
        raise MldrError(f'{self.name}: refused: the pickle references tensor storage, '
                        'which an ml-dr reinforcement file never contains')


def _safe_dtype(spec, *args):
    if spec not in _ALLOWED_DTYPES:
        raise pickle.UnpicklingError(f'numpy dtype {spec!r} is not allowed')
    return np.dtype(spec)


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biuf' or not isinstance(data, bytes):
        raise pickle.UnpicklingError('only numeric numpy scalars are allowed')
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_bytes(text, encoding):
    if not isinstance(text, str) or encoding != 'latin1':
        raise pickle.UnpicklingError("_codecs.encode is allowed only as (text, 'latin1')")
    return text.encode('latin1')


# The only globals an ml-dr pickle may name: numpy scalars (np.int64 in CutMix
# boxes), whose bytes pickle protocol 2 (torch.save's default) spells as
# _codecs.encode(text, 'latin1').
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', 'scalar'): _safe_scalar, ('numpy._core.multiarray', 'scalar'): _safe_scalar,
    ('numpy', 'dtype'): _safe_dtype, ('_codecs', 'encode'): _latin1_bytes,
}


def _shown(value) -> str:
    """``value`` for an error message: a hostile file's value can be huge."""
    return reprlib.repr(value)


def file_limit(limits: Limits) -> int:
    """The most bytes a file (or archive member) holding such a pickle may have."""
    return limits.bytes + ZIP_OVERHEAD


def _pickle_bytes(data: bytes, name: str, limits: Limits) -> bytes:
    """The pickle inside a ``torch.save`` zip (or ``data`` itself, a bare
    pickle); the zip's declared sizes are checked before anything is inflated."""
    if len(data) > file_limit(limits):
        raise MldrError(f'{name}: refused: {len(data)} bytes, more than the {file_limit(limits)} '
                        'an ml-dr file of this recipe can need (the limit)')
    if data[:4] != b'PK\x03\x04':
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            pkls = [i for i in zf.infolist() if i.filename.endswith('data.pkl')]
            if len(pkls) != 1:
                raise MldrError(f'{name}: not a torch.save archive (no single data.pkl)')
            if pkls[0].file_size > limits.bytes:
                raise MldrError(f'{name}: refused: {pkls[0].filename} declares {pkls[0].file_size} '
                                f'bytes, more than the {limits.bytes} an ml-dr pickle of this '
                                'recipe can need (the limit)')
            return zf.read(pkls[0])
    except MldrError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, zlib.error) as e:
        raise MldrError(f'{name}: unreadable ml-dr file ({type(e).__name__}: {e})') from None


def load_pickle(data: bytes, name: str, limits: Limits, unzipped: bool = False):
    """Unpickle a ``torch.save`` zip (or a bare pickle, or with ``unzipped`` the
    pickle of one) with the restricted unpickler, once it is within ``limits``."""
    if not unzipped:
        data = _pickle_bytes(data, name, limits)
    problem = check_pickle(data, limits)
    if problem:
        raise MldrError(f'{name}: refused: the pickle {problem}')
    try:
        return _RestrictedUnpickler(io.BytesIO(data), name).load()
    except MldrError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, AttributeError, IndexError, OverflowError) as e:
        raise MldrError(f'{name}: unreadable ml-dr file ({type(e).__name__}: {e})') from None


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
                      ra_ops=int(ra.get('num_ops', 2)) if enabled('rand_augment') else 0,
                      erase=enabled('random_erase'),
                      mixing=enabled('mixup') or enabled('cutmix'),
                      size=int(rrc.get('size', 224)),
                      # torchvision's defaults where ml-dr's config leaves them out
                      scale=tuple(rrc.get('scale', (0.08, 1.0))),
                      ratio=tuple(rrc.get('ratio', (3 / 4, 4 / 3))),
                      ra_magnitude=int(ra.get('magnitude', 9)),
                      erase_p=float(aug.get('random_erase', {}).get('p', 0.25)))
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
                raise MldrError(f'{name} (reinforcement {j}): {what}, got {_shown(v)}')
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
            raise MldrError(f'{name} (reinforcement {j}): params must be [rrc, flip, ra, re], got {_shown(v)}')
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
                raise MldrError(f'{name} (reinforcement {j}): MixUp lambda must be a number, got {_shown(mixup)}')
            rec['mixup_lam'] = float(mixup)
            mix_flags |= HAS_MIXUP
        if cutmix is not None:
            if (not isinstance(cutmix, (list, tuple)) or len(cutmix) != 5 or not _finite(cutmix[0])
                    or not all(isinstance(v, (int, np.integer)) for v in cutmix[1:])):
                raise MldrError(f'{name} (reinforcement {j}): CutMix must be [lam, r1, c1, r2, c2], '
                                f'got {_shown(cutmix)}')
            r1, c1, r2, c2 = (int(v) for v in cutmix[1:])
            if not all(0 <= v <= 65535 for v in (r1, c1, r2, c2)):
                raise MldrError(f'{name} (reinforcement {j}): CutMix box {_shown(cutmix[1:])} lies outside '
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
    data = _pickle_bytes(data, name, limits)  # unzipped once, for either reader
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
        raise MldrError(f'{name}: holds index {_shown(index)}, expected {expected_index}')
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


def member_index(name: str):
    m = SAMPLE_NAME.search(name)
    return int(m.group(1)) if m else None


class MldrDirectory:
    """A ``reinforced_data`` directory: files are read on demand, by index."""

    def __init__(self, path: str, num_images: int):
        self.path = path
        config = os.path.join(path, 'config.pth.tar')
        if not os.path.isfile(config):
            raise MldrError(f'{config}: missing (an ml-dr reinforced_data directory has one)')
        self.config = load_pickle(read_bounded(config, file_limit(CONFIG_LIMITS)), config,
                                  CONFIG_LIMITS)
        found = set()
        for entry in os.listdir(path):
            i = member_index(entry)
            if i is not None:
                found.add(i)
        check_indices(found, num_images, path)

    def name(self, index: int) -> str:
        return os.path.join(self.path, f'{index}.pth.tar')

    def read(self, index: int, limits: Limits):
        """(bytes, path) of image ``index``'s file, refused when larger than
        a file within ``limits`` can be."""
        name = self.name(index)
        return read_bounded(name, file_limit(limits)), name


def read_bounded(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, refused unread when over ``max_bytes``."""
    regular_file(path)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise MldrError(f'{path}: refused: {size} bytes, more than the {max_bytes} an ml-dr file '
                        'of this recipe can need (the limit)')
    with open(path, 'rb') as f:
        return f.read(max_bytes + 1)


def check_indices(found, num_images, where):
    missing = sorted(set(range(num_images)) - set(found))
    extra = sorted(set(found) - set(range(num_images)))
    if missing:
        raise MldrError(f'{where}: no reinforcements for {len(missing)} of the {num_images} images '
                        f'(first missing index: {missing[0]})')
    if extra:
        raise MldrError(f'{where}: reinforcements for index {extra[0]}, but the image folder has only '
                        f'{num_images} images')


def iter_tar(path: str, limits: Limits, config_only: bool = False):
    """Yield (member name, bytes) of the reinforcement files (or with
    ``config_only``, the config) in an ml-dr ``.tar``/``.tar.gz``, read as a
    stream. Nothing is extracted; members whose path escapes the archive, or
    that declare more bytes than a file within ``limits`` can have, are refused."""
    try:
        with tarfile.open(path, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = member.name.split('/')
                if member.name.startswith('/') or '..' in parts:
                    raise MldrError(f'{path}: refused member {member.name!r}: path outside the archive')
                if not (CONFIG_NAME.search(member.name) if config_only else SAMPLE_NAME.search(member.name)):
                    continue
                if member.size > file_limit(limits):
                    raise MldrError(f'{path}:{member.name}: refused: declares {member.size} bytes, more '
                                    f'than the {file_limit(limits)} an ml-dr file of this recipe can '
                                    'need (the limit)')
                yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise MldrError(f'{path}: unreadable archive ({type(e).__name__}: {e})') from None
