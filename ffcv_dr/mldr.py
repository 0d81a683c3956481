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
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from .format import (FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA,
                     RA_OPS, Recipe, reinforcement_dtype, topk_dtype)

SAMPLE_NAME = re.compile(r'(?:^|/)(\d+)\.pth\.tar$')
CONFIG_NAME = re.compile(r'(?:^|/)config\.pth\.tar$')

# The only globals an ml-dr pickle may name: numpy scalars (np.int64 in CutMix boxes).
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'dtype'),
}
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
        return _safe_dtype if name == 'dtype' else _safe_scalar

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


def load_pickle(data: bytes, name: str):
    """Unpickle a ``torch.save`` zip (or a bare pickle) with the restricted unpickler."""
    try:
        if data[:4] == b'PK\x03\x04':
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                pkls = [n for n in zf.namelist() if n.endswith('data.pkl')]
                if len(pkls) != 1:
                    raise MldrError(f'{name}: not a torch.save archive (no single data.pkl)')
                data = zf.read(pkls[0])
        return _RestrictedUnpickler(io.BytesIO(data), name).load()
    except MldrError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
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
        ra = aug.get('rand_augment', {})
        return Recipe(num_samples=int(rein['num_samples']), topk=int(rein['topk']),
                      num_classes=num_classes,
                      ra_ops=int(ra.get('num_ops', 2)) if enabled('rand_augment') else 0,
                      erase=enabled('random_erase'),
                      mixing=enabled('mixup') or enabled('cutmix'),
                      size=int(aug['random_resized_crop'].get('size', 224)))
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


def _box(value, what, limit_h, limit_w, name):
    if not isinstance(value, (tuple, list)) or len(value) != 4 or not all(
            isinstance(v, (int, np.integer)) for v in value):
        raise MldrError(f'{name}: {what} must be 4 integers (top, left, height, width), got {value!r}')
    top, left, h, w = (int(v) for v in value)
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > limit_h or left + w > limit_w:
        raise MldrError(f'{name}: {what} {value!r} lies outside the {limit_w}x{limit_h} image')
    return top, left, h, w


def _fill_view(rec, prefix, rrc, flip, ra, re_box, recipe, img_w, img_h, name):
    rec[prefix + 'crop'] = _box(rrc, 'RandomResizedCrop box', img_h, img_w, name)
    if not isinstance(flip, (bool, np.bool_)):
        raise MldrError(f'{name}: flip must be a bool, got {flip!r}')
    flags = FLIP if flip else 0
    if ra is not None:
        if not recipe.ra_ops:
            raise MldrError(f'{name}: RandAugment parameters in a recipe without RandAugment')
        if not isinstance(ra, (list, tuple)) or len(ra) != recipe.ra_ops:
            raise MldrError(f'{name}: expected {recipe.ra_ops} RandAugment ops, got {ra!r}')
        for k, op in enumerate(ra):
            if (not isinstance(op, (list, tuple)) or len(op) != 2 or not isinstance(op[0], (int, np.integer))
                    or not 0 <= int(op[0]) < len(RA_OPS) or not _finite(op[1])):
                raise MldrError(f'{name}: bad RandAugment op {op!r} (op id 0..{len(RA_OPS) - 1}, finite magnitude)')
            rec[prefix + 'ra_op'][k] = int(op[0])
            rec[prefix + 'ra_mag'][k] = float(op[1])
        flags |= HAS_RA
    if re_box is not None:
        if not recipe.erase:
            raise MldrError(f'{name}: RandomErasing box in a recipe without erasing')
        rec[prefix + 'erase'] = _box(re_box, 'RandomErasing box', recipe.size, recipe.size, name)
        flags |= HAS_ERASE
    rec[prefix + 'flags'] = flags


def _fill_mixing(rec, params, recipe, index, sizes: ImageSizes, name):
    if len(params) != 7:
        raise MldrError(f'{name}: mixing params must have 7 entries, got {len(params)}')
    pair, rrc, flip, ra, re_box, mixup, cutmix = params
    own_w, own_h = int(sizes.widths[index]), int(sizes.heights[index])
    mix_flags = 0
    if pair is None:
        _fill_view(rec, '', rrc, flip, ra, re_box, recipe, own_w, own_h, name)
    else:
        if not isinstance(pair, (int, np.integer)) or not 0 <= int(pair) < len(sizes.widths):
            raise MldrError(f'{name}: paired image index {pair!r} is outside 0..{len(sizes.widths) - 1}')
        pair = int(pair)
        pairs = (rrc, flip, ra, re_box)
        if not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in pairs):
            raise MldrError(f'{name}: with a paired image each of rrc, flip, ra, re must be a pair')
        _fill_view(rec, '', rrc[0], flip[0], ra[0], re_box[0], recipe, own_w, own_h, name)
        _fill_view(rec, 'pair_', rrc[1], flip[1], ra[1], re_box[1], recipe,
                   int(sizes.widths[pair]), int(sizes.heights[pair]), name)
        rec['pair'] = pair
        mix_flags |= HAS_PAIR
    if mixup is not None:
        if not _finite(mixup) or not 0.0 <= float(mixup) <= 1.0:
            raise MldrError(f'{name}: MixUp lambda must be in [0, 1], got {mixup!r}')
        rec['mixup_lam'] = float(mixup)
        mix_flags |= HAS_MIXUP
    if cutmix is not None:
        if (not isinstance(cutmix, (list, tuple)) or len(cutmix) != 5 or not _finite(cutmix[0])
                or not all(isinstance(v, (int, np.integer)) for v in cutmix[1:])):
            raise MldrError(f'{name}: CutMix must be [lam, r1, c1, r2, c2], got {cutmix!r}')
        r1, c1, r2, c2 = (int(v) for v in cutmix[1:])
        if not (0 <= r1 <= r2 <= recipe.size and 0 <= c1 <= c2 <= recipe.size):
            raise MldrError(f'{name}: CutMix box {cutmix[1:]!r} lies outside the {recipe.size}px output')
        rec['cutmix_lam'] = float(cutmix[0])
        rec['cutmix_box'] = (r1, c1, r2, c2)
        mix_flags |= HAS_CUTMIX
    if mix_flags & (HAS_MIXUP | HAS_CUTMIX) and not mix_flags & HAS_PAIR:
        raise MldrError(f'{name}: MixUp/CutMix parameters without a paired image')
    rec['mix_flags'] = mix_flags


def parse_sample(obj, expected_index: int, recipe: Recipe, sizes: ImageSizes, name: str):
    """Validate one unpickled ml-dr sample; return (reinforcement records, top-k records)."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[1], list):
        raise MldrError(f'{name}: expected (index, [reinforcements]), got {type(obj).__name__}')
    index, samples = obj
    if not isinstance(index, (int, np.integer)) or int(index) != expected_index:
        raise MldrError(f'{name}: holds index {index!r}, expected {expected_index}')
    if len(samples) != recipe.num_samples:
        raise MldrError(f'{name}: has {len(samples)} reinforcements, the config says {recipe.num_samples}')
    records = np.zeros(recipe.num_samples, reinforcement_dtype(recipe))
    topk = np.zeros(recipe.num_samples, topk_dtype(recipe))
    img_w, img_h = int(sizes.widths[expected_index]), int(sizes.heights[expected_index])
    for j, sample in enumerate(samples):
        where = f'{name} (reinforcement {j})'
        try:
            params, (values, ids) = sample['params'], sample['prob']
        except (TypeError, KeyError, ValueError):
            raise MldrError(f'{where}: expected {{"params": [...], "prob": (values, ids)}}') from None
        if not isinstance(params, (list, tuple)):
            raise MldrError(f'{where}: params must be a list')
        if recipe.mixing:
            _fill_mixing(records[j], params, recipe, expected_index, sizes, where)
        else:
            if len(params) != 4:
                raise MldrError(f'{where}: params must be [rrc, flip, ra, re], got {len(params)} entries')
            _fill_view(records[j], '', *params, recipe, img_w, img_h, where)
        _fill_topk(topk[j], values, ids, recipe, where)
    return records, topk


def _fill_topk(rec, values, ids, recipe, name):
    k = recipe.topk
    if not isinstance(values, (list, tuple)) or not isinstance(ids, (list, tuple)) \
            or len(values) != k or len(ids) != k:
        raise MldrError(f'{name}: expected {k} probabilities and {k} class ids')
    if not all(_finite(v) for v in values):
        raise MldrError(f'{name}: probabilities must be finite numbers, got {values!r}')
    probs = np.asarray(values, np.float64)
    if probs.min() < 0.0 or probs.max() > 1.0 or probs.sum() > 1.0 + 1e-3:
        raise MldrError(f'{name}: probabilities must lie in [0, 1] and sum to at most 1, got {values!r}')
    if not all(isinstance(c, (int, np.integer)) and 0 <= int(c) < recipe.num_classes for c in ids):
        raise MldrError(f'{name}: class ids must be integers in 0..{recipe.num_classes - 1}, got {ids!r}')
    if len(set(int(c) for c in ids)) != k:
        raise MldrError(f'{name}: class ids repeat: {ids!r}')
    rec['prob'] = probs
    rec['cls'] = np.asarray(ids, np.int64)


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
        with open(config, 'rb') as f:
            self.config = load_pickle(f.read(), config)
        found = set()
        for entry in os.listdir(path):
            i = member_index(entry)
            if i is not None:
                found.add(i)
        check_indices(found, num_images, path)

    def read(self, index: int):
        name = os.path.join(self.path, f'{index}.pth.tar')
        with open(name, 'rb') as f:
            return load_pickle(f.read(), name), name


def check_indices(found, num_images, where):
    missing = sorted(set(range(num_images)) - set(found))
    extra = sorted(set(found) - set(range(num_images)))
    if missing:
        raise MldrError(f'{where}: no reinforcements for {len(missing)} of the {num_images} images '
                        f'(first missing index: {missing[0]})')
    if extra:
        raise MldrError(f'{where}: reinforcements for index {extra[0]}, but the image folder has only '
                        f'{num_images} images')


def iter_tar(path: str):
    """Yield (member name, bytes) of an ml-dr ``.tar``/``.tar.gz`` as a stream.

    Nothing is extracted; members whose path escapes the archive are refused."""
    try:
        with tarfile.open(path, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = member.name.split('/')
                if member.name.startswith('/') or '..' in parts:
                    raise MldrError(f'{path}: refused member {member.name!r}: path outside the archive')
                if member_index(member.name) is None and not CONFIG_NAME.search(member.name):
                    continue
                yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise MldrError(f'{path}: unreadable archive ({type(e).__name__}: {e})') from None
