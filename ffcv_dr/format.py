"""The on-disk record format of an ffcv-dr ``.beton`` (format version 5).

Everything is little-endian and fixed-width. A file has three FFCV fields:

``image`` (:class:`ffcv_dr.fields.ReinforcedImageField`)
    Per-image metadata (``IMAGE_METADATA``): pointer to the data block,
    original width/height (the pixel space of the stored boxes, as in ml-dr),
    stored width/height (differs only where ``--max-resolution`` resized the
    image), how the pixels are stored (``mode``: ``STORED_JPEG`` or
    ``STORED_RAW``, see :mod:`ffcv_dr.storage`) and a CRC32 of those fields
    and the block (:func:`block_crc`). The data block is ``num_samples``
    reinforcement records (``reinforcement_dtype(recipe)``) followed by the
    JPEG bytes or the raw RGB pixels (height x width x 3), so the image
    decoder reads parameters and pixels in one go.

``target`` (:class:`ffcv_dr.fields.SoftTargetField`)
    Per-image metadata: pointer, the ground-truth label (needed for the
    one-hot target of fresh, non-replayed samples) and a CRC32 of the label
    and the block. The data block is
    ``num_samples`` top-k records (``topk_dtype(recipe)``): k float16
    probabilities then k uint16 class ids.

``label``
    FFCV's own ``IntField`` with the ground-truth class.

Both custom fields carry the :data:`RECIPE_DTYPE` header in their FFCV field
arguments, so a reader knows the layout without any side file, and what fresh
(non-replayed) samples draw from: the RandomResizedCrop scale and ratio, the
RandAugment magnitude and the RandomErasing probability the reinforcements
were made with. A file may hold no reinforcements at all (images, labels and
the recipe only, for training on fresh augmentations).

The target field's arguments also hold, at byte :data:`TEACHERS_AT`, the
record of the teachers that made its top-k (:data:`TEACHERS_DTYPE`): up to
:data:`MAX_TEACHERS` entries of name (UTF-8, cut to 48 bytes), SHA-256 of
the weights and the weight of its probabilities in the stored labels, with a
CRC32. Those bytes were zero before the record existed, and still are where
the teachers are unknown (a file converted from ml-dr's pickles), so files
written with and without it read alike; an entry with an empty name stands
for labels of unknown teachers, kept by ``relabel --combine mean``.

A reinforcement record holds, for one augmented view:

===========  =========  ====================================================
field        type       meaning
===========  =========  ====================================================
crop         u2[4]      RandomResizedCrop (top, left, height, width) in
                        original-image pixels
flags        u1         bit 0 flip, bit 1 RandAugment applied,
                        bit 2 RandomErasing applied
ra_op        u1[R]      RandAugment op ids (``RA_OPS``), R = ops per image
ra_mag       f4[R]      magnitudes, signed and scaled, exactly as ml-dr stores
erase        u1/u2[4]   RandomErasing (top, left, height, width) in output
                        pixels; u1 when the output side is at most 255
===========  =========  ====================================================

Recipes with mixing add the same fields for the paired image (``pair_``
prefix) and ``pair`` (u4 index), ``mix_flags`` (bit 0 paired image present,
bit 1 MixUp, bit 2 CutMix), ``mixup_lam`` (f4), ``cutmix_lam`` (f4) and
``cutmix_box`` (u2[4], rows r1:r2 and columns c1:c2 of the output). Recipes
without RandAugment, erasing or mixing store none of those bytes. For the
ImageNet+ recipe (two RandAugment ops, erasing, 224 px, top-10) a
reinforcement takes 23 + 40 = 63 bytes.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, asdict

import numpy as np

FORMAT_VERSION = 5   # 2: CRC32s cover the metadata fields and the top-k block too;
#                     3: the recipe holds its draw settings (scale, ratio, magnitude, erase p);
#                     4: images may be stored as raw pixels (IMAGE_METADATA's mode);
#                     5: the recipe has a CRC32 of its own

FLIP, HAS_RA, HAS_ERASE = 1, 2, 4
HAS_PAIR, HAS_MIXUP, HAS_CUTMIX = 1, 2, 4
STORED_JPEG, STORED_RAW = 0, 1
MAX_SIDE = 65535   # pixels a side of an original image: crop boxes are u16 in its pixels

RA_OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate',
          'Brightness', 'Color', 'Contrast', 'Sharpness', 'Posterize',
          'Solarize', 'AutoContrast', 'Equalize')

RECIPE_DTYPE = np.dtype([
    ('version', '<u2'),
    ('num_samples', '<u2'),
    ('topk', '<u2'),
    ('num_classes', '<u4'),
    ('ra_ops', 'u1'),
    ('erase', 'u1'),
    ('mixing', 'u1'),
    ('size', '<u2'),
    ('scale', '<f8', (2,)),
    ('ratio', '<f8', (2,)),
    ('ra_magnitude', 'u1'),
    ('erase_p', '<f8'),
    ('crc32', '<u4'),   # of all the bytes before it
])

IMAGE_METADATA = np.dtype([
    ('data_ptr', '<u8'),
    ('orig_width', '<u4'),
    ('orig_height', '<u4'),
    ('width', '<u2'),
    ('height', '<u2'),
    ('mode', 'u1'),
    ('crc32', '<u4'),
])

TARGET_METADATA = np.dtype([
    ('data_ptr', '<u8'),
    ('label', '<u4'),
    ('crc32', '<u4'),
])


MAX_TEACHERS = 11
TEACHER_DTYPE = np.dtype([
    ('name', 'S48'),            # '' for labels of unknown teachers
    ('sha256', 'u1', (32,)),    # of the weights (state dict), zeros when unknown
    ('weight', '<f4'),          # share of the stored probabilities
])
TEACHERS_DTYPE = np.dtype([
    ('count', '<u2'),
    ('entries', TEACHER_DTYPE, (MAX_TEACHERS,)),
    ('crc32', '<u4'),           # of all the bytes before it
])
TEACHERS_AT = 64   # byte offset in the target field's arguments, after the recipe


CUT_DTYPE = np.dtype([          # what an ``ffcv-dr subset`` file was cut from
    ('name', 'S128'),           # the input file's name (UTF-8, cut to 128 bytes)
    ('num_samples', '<u4'),     # its reinforcements per image
    ('topk', '<u2'),            # its top-k
    ('images', '<u8'),          # its images
    ('metadata_crc32', '<u4'),  # CRC32 of its FFCV metadata table: which file exactly
    ('crc32', '<u4'),           # of all the bytes before it
])
CUT_AT = 64   # byte offset in the image field's arguments, after the recipe (zeros: not cut)


# float16 -> float32 for every bit pattern (numba has no float16 on the CPU), to read top-k records.
HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def block_crc(meta, block) -> int:
    """CRC32 of a metadata row's fields (all but ``data_ptr`` and ``crc32``)
    followed by its data block: ``ffcv-dr verify`` recomputes it, so a flipped
    byte in a JPEG, a record or the metadata is caught. ``meta``: one row, as
    a numpy record or a one-row array (what FFCV's writer passes)."""
    row = np.asarray(meta).reshape(-1)[:1]
    fields = b''.join(row[n].tobytes() for n in _crc_fields(row.dtype))
    return zlib.crc32(block, zlib.crc32(fields))


@functools.lru_cache(maxsize=None)
def _crc_fields(dtype) -> tuple:
    return tuple(n for n in dtype.names if n not in ('data_ptr', 'crc32'))


MAX_CLASSES = 1 << 16
MAX_SAMPLES = (1 << 16) - 1
MAX_SIZE = 4096   # output side: a 4096 px batch slot already takes 48 MiB


# ImageNet+'s recipe: the defaults of reinforce and the CLI, and what an ml-dr
# config that leaves a value out means (torchvision's and ml-dr's defaults).
DEFAULT_SCALE = (0.08, 1.0)      # RandomResizedCrop
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_RA_OPS = 2               # RandAugment
DEFAULT_RA_MAGNITUDE = 9
DEFAULT_ERASE_P = 0.25           # RandomErasing
DEFAULT_MIXUP = (0.5, 1.0, 2.0)  # MixUp p, alpha, ml-dr's div_by
DEFAULT_CUTMIX = (0.5, 1.0)      # CutMix p, alpha

# The recipes reinforce draws: RandomResizedCrop and flip, then RandAugment and
# RandomErasing, then MixUp/CutMix with a paired image.
RECIPES = ('rrc', 'rrc+ra+re', 'rrc+mix', 'rrc+ra+re+mix')
_RECIPE_PARTS = ('ra', 're', 'mix')


@dataclass(frozen=True)
class RecipeParts:
    """What a recipe string (``rrc+ra+re+mix``) turns on."""
    ra: bool
    erase: bool
    mixing: bool


def parse_recipe(name: str) -> RecipeParts:
    """The parts of a recipe string: ``rrc`` then any of ``+ra``, ``+re``,
    ``+mix`` in that order; a ValueError names anything else."""
    first, *rest = name.split('+')
    if first != 'rrc' or len(set(rest)) != len(rest) or \
            rest != [p for p in _RECIPE_PARTS if p in rest]:
        raise ValueError(f'recipe {name!r} is not rrc[+ra][+re][+mix] (e.g. {", ".join(RECIPES)})')
    return RecipeParts('ra' in rest, 're' in rest, 'mix' in rest)


def recipe_name(recipe) -> str:
    """The recipe string of a :class:`Recipe` (or :class:`RecipeParts`)."""
    ra = recipe.ra if isinstance(recipe, RecipeParts) else recipe.ra_ops > 0
    on = (ra, recipe.erase, recipe.mixing)
    return '+'.join(['rrc'] + [p for p, used in zip(_RECIPE_PARTS, on) if used])


@dataclass(frozen=True)
class Recipe:
    """What one file stores per image: its layout follows from these values."""
    num_samples: int
    topk: int
    num_classes: int
    ra_ops: int = 0        # RandAugment ops per image, 0 = no RandAugment
    erase: bool = False    # RandomErasing boxes stored
    mixing: bool = False   # MixUp/CutMix with a paired image stored
    size: int = 224        # output side the recipe was made for
    scale: tuple = DEFAULT_SCALE    # RandomResizedCrop, as the reinforcements were drawn
    ratio: tuple = DEFAULT_RATIO
    ra_magnitude: int = DEFAULT_RA_MAGNITUDE
    erase_p: float = DEFAULT_ERASE_P

    def __post_init__(self):
        if not 0 <= self.num_samples <= MAX_SAMPLES:  # 0: images and labels only
            raise ValueError(f'num_samples must be in 0..{MAX_SAMPLES}, got {self.num_samples}')
        if not 1 <= self.topk <= self.num_classes:
            raise ValueError(f'topk must be in 1..num_classes, got {self.topk}')
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f'num_classes must be in 1..{MAX_CLASSES}, got {self.num_classes}')
        if not 1 <= self.size <= MAX_SIZE:
            raise ValueError(f'size must be in 1..{MAX_SIZE}, got {self.size}')
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f'scale must be 0 < lo <= hi <= 1 and ratio 0 < lo <= hi, '
                             f'got {self.scale} and {self.ratio}')
        if not 0 <= self.ra_magnitude <= 30 or not 0 <= self.erase_p <= 1:
            raise ValueError(f'ra_magnitude must be in 0..30 and erase_p in [0, 1], '
                             f'got {self.ra_magnitude} and {self.erase_p}')
        object.__setattr__(self, 'scale', tuple(float(v) for v in self.scale))
        object.__setattr__(self, 'ratio', tuple(float(v) for v in self.ratio))

    def to_array(self) -> np.ndarray:
        out = np.zeros((), RECIPE_DTYPE)
        out['version'] = FORMAT_VERSION
        for key, value in asdict(self).items():
            out[key] = value
        out['crc32'] = _recipe_crc(out)
        return out

    @classmethod
    def from_array(cls, arr) -> 'Recipe':
        version = int(arr['version'])
        if version != FORMAT_VERSION:
            raise ValueError(f'ffcv-dr format version {version} is not supported '
                             f'(this ffcv-dr reads version {FORMAT_VERSION}; convert the data again)')
        if _recipe_crc(arr) != arr['crc32']:
            raise ValueError('the recipe in a field descriptor fails its CRC32: the file is damaged')
        return cls(num_samples=int(arr['num_samples']), topk=int(arr['topk']),
                   num_classes=int(arr['num_classes']), ra_ops=int(arr['ra_ops']),
                   erase=bool(arr['erase']), mixing=bool(arr['mixing']),
                   size=int(arr['size']), scale=tuple(arr['scale']), ratio=tuple(arr['ratio']),
                   ra_magnitude=int(arr['ra_magnitude']), erase_p=float(arr['erase_p']))

    def to_binary(self) -> np.ndarray:
        """The 1024-byte FFCV field argument block holding this recipe."""
        from ffcv.fields.base import ARG_TYPE
        out = np.zeros(1, dtype=ARG_TYPE)[0]
        out[0][:RECIPE_DTYPE.itemsize] = self.to_array().reshape(1).view('<u1')
        return out

    @classmethod
    def from_binary(cls, binary) -> 'Recipe':
        raw = np.asarray(binary).view('<u1').reshape(-1)[:RECIPE_DTYPE.itemsize]
        return cls.from_array(raw.copy().view(RECIPE_DTYPE)[0])


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher behind a file's top-k: ``name`` '' and ``sha256`` '' stand
    for teachers that are not known."""
    name: str
    sha256: str     # hex SHA-256 of the weights (``Teacher.digests``)
    weight: float   # share of the stored probabilities

    def describe(self) -> str:
        who = f'{self.name} (weights sha256 {self.sha256[:16]})' if self.name else 'unknown teachers'
        return f'{self.weight:.4g} x {who}'


def describe_teachers(teachers, unknown: str = 'unknown teachers') -> str:
    """A file's record of teachers in one line; ``unknown`` where it has none."""
    return '; '.join(t.describe() for t in teachers) if teachers else unknown


def teachers_to_binary(teachers, binary) -> None:
    """Write the record of ``teachers`` (TeacherEntry's) into a field argument
    block (as :meth:`Recipe.to_binary` makes it)."""
    if not 1 <= len(teachers) <= MAX_TEACHERS:
        raise ValueError(f'a file records 1..{MAX_TEACHERS} teachers, not {len(teachers)}')
    arr = np.zeros((), TEACHERS_DTYPE)
    arr['count'] = len(teachers)
    for row, t in zip(arr['entries'], teachers):
        if not t.name.isprintable():
            raise ValueError(f'teacher name {t.name!r}: holds control characters')
        row['name'] = t.name.encode()[:TEACHER_DTYPE['name'].itemsize].decode(errors='ignore').encode()
        row['sha256'] = np.frombuffer(bytes.fromhex(t.sha256), np.uint8) if t.sha256 else 0
        row['weight'] = t.weight
    arr['crc32'] = _teachers_crc(arr)
    binary[0][TEACHERS_AT:TEACHERS_AT + TEACHERS_DTYPE.itemsize] = arr.reshape(1).view('<u1')


@dataclass(frozen=True)
class CutFrom:
    """The file an ``ffcv-dr subset`` output was cut from."""
    name: str
    num_samples: int
    topk: int
    images: int
    metadata_crc32: int

    def describe(self) -> str:
        return (f'{self.name} ({self.num_samples} reinforcements per image, top-{self.topk}, '
                f'{self.images} images; metadata CRC32 {self.metadata_crc32:08x})')


def cut_to_binary(cut: CutFrom, binary) -> None:
    """Write ``cut`` into an image field's argument block."""
    arr = np.zeros((), CUT_DTYPE)
    name = cut.name.encode()[:CUT_DTYPE['name'].itemsize].decode(errors='ignore')
    if not name.isprintable():
        raise ValueError(f'file name {cut.name!r}: holds control characters')
    arr['name'] = name.encode()
    for key in ('num_samples', 'topk', 'images', 'metadata_crc32'):
        arr[key] = getattr(cut, key)
    arr['crc32'] = zlib.crc32(arr.reshape(1).view('<u1')[:-4].tobytes())
    binary[0][CUT_AT:CUT_AT + CUT_DTYPE.itemsize] = arr.reshape(1).view('<u1')


def cut_from_binary(binary):
    """The :class:`CutFrom` recorded in an image field's argument block, None
    where there is none; a ValueError for a record that is damaged."""
    raw = np.asarray(binary).view('<u1').reshape(-1)[CUT_AT:CUT_AT + CUT_DTYPE.itemsize]
    if not raw.any():
        return None
    arr = raw.copy().view(CUT_DTYPE)[0]
    try:
        name = bytes(arr['name']).decode()
    except UnicodeDecodeError:
        name = None
    if (zlib.crc32(raw[:-4].tobytes()) != arr['crc32'] or name is None or not name.isprintable()
            or not arr['num_samples'] or not arr['topk']):
        raise ValueError('the record of the file this one was cut from is damaged')
    return CutFrom(name, int(arr['num_samples']), int(arr['topk']), int(arr['images']),
                   int(arr['metadata_crc32']))


def teachers_from_binary(binary):
    """The teachers recorded in a field argument block (a tuple of
    :class:`TeacherEntry`), or None where there is no record; a ValueError
    for a record that is damaged."""
    raw = np.asarray(binary).view('<u1').reshape(-1)[TEACHERS_AT:TEACHERS_AT + TEACHERS_DTYPE.itemsize]
    if not raw.any():
        return None
    arr = raw.copy().view(TEACHERS_DTYPE)[0]
    count = int(arr['count'])
    if _teachers_crc(arr) != arr['crc32']:
        raise ValueError('the record of teachers in the target field fails its CRC32: the file is damaged')
    if not 1 <= count <= MAX_TEACHERS:
        raise ValueError(f'the record of teachers in the target field claims {count} teachers, not '
                         f'1..{MAX_TEACHERS}: the file is damaged')
    entries = []
    for row in arr['entries'][:count]:
        weight = float(row['weight'])
        try:
            name = bytes(row['name']).decode()
        except UnicodeDecodeError:
            name = None
        if (name is None or not name.isprintable() or not 0 < weight <= 1
                or (not name and row['sha256'].any())):  # a control character would reach terminals
            raise ValueError('the record of teachers in the target field holds a bad entry: '
                             'the file is damaged')
        entries.append(TeacherEntry(name, row['sha256'].tobytes().hex() if name else '', weight))
    if abs(sum(t.weight for t in entries) - 1) > 1e-3:
        raise ValueError('the weights in the record of teachers do not sum to 1: the file is damaged')
    return tuple(entries)


def _teachers_crc(arr) -> int:
    return zlib.crc32(np.asarray(arr).reshape(1).view('<u1')[:TEACHERS_DTYPE.fields['crc32'][1]].tobytes())


def _recipe_crc(arr) -> int:
    return zlib.crc32(np.asarray(arr).reshape(1).view('<u1')[:RECIPE_DTYPE.fields['crc32'][1]].tobytes())


def view_dtype(recipe: Recipe, prefix: str = '') -> list:
    """Fields for the parameters of one augmented image."""
    fields = [(prefix + 'crop', '<u2', (4,)), (prefix + 'flags', 'u1')]
    if recipe.ra_ops:
        fields += [(prefix + 'ra_op', 'u1', (recipe.ra_ops,)),
                   (prefix + 'ra_mag', '<f4', (recipe.ra_ops,))]
    if recipe.erase:
        fields += [(prefix + 'erase', 'u1' if recipe.size <= 255 else '<u2', (4,))]
    return fields


@functools.lru_cache(maxsize=None)  # built per image by convert otherwise
def reinforcement_dtype(recipe: Recipe) -> np.dtype:
    """Packed dtype of the augmentation parameters of one reinforcement."""
    fields = view_dtype(recipe)
    if recipe.mixing:
        fields += view_dtype(recipe, 'pair_') + [
            ('pair', '<u4'), ('mix_flags', 'u1'), ('mixup_lam', '<f4'),
            ('cutmix_lam', '<f4'), ('cutmix_box', '<u2', (4,))]
    return np.dtype(fields)


@functools.lru_cache(maxsize=None)
def topk_dtype(recipe: Recipe) -> np.dtype:
    """Packed dtype of the teacher's top-k for one reinforcement."""
    return np.dtype([('prob', '<f2', (recipe.topk,)), ('cls', '<u2', (recipe.topk,))])


def topk_block_size(recipe: Recipe) -> int:
    """Bytes of one image's top-k block. Never 0: FFCV finds a block by where it
    starts, and an empty one (a file without reinforcements) would start where
    the next one does, so it gets one zero byte."""
    return max(1, recipe.num_samples * topk_dtype(recipe).itemsize)


def bytes_per_reinforcement(recipe: Recipe) -> int:
    return reinforcement_dtype(recipe).itemsize + topk_dtype(recipe).itemsize


def field_offset(dtype: np.dtype, name: str) -> int:
    """Byte offset of a field inside a packed record (for numba kernels)."""
    return dtype.fields[name][1]
