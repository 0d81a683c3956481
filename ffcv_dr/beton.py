"""Random access to the records of an ffcv-dr ``.beton`` outside the Loader
(``info``, ``replay``, tests), through FFCV's own Reader."""
from __future__ import annotations

import functools
import os
import zlib

import numpy as np
from ffcv.reader import Reader

from .jobs import file_kind
from .fields import CUSTOM_FIELDS, ReinforcedImageField, SoftTargetField
from .render import (fresh_settings, pair_index, render, render_layout,
                                     temp_size)
from .rules import PROBLEMS, file_problems, header_problem, magnitude_limits, sample_problem
from .format import (FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA, RA_OPS,
                     reinforcement_dtype, topk_dtype)


class BetonFile:
    """An opened ffcv-dr file. Unless ``check`` is False (``verify``, which
    reports every problem instead), a file that fails :mod:`ffcv_dr.rules`
    is refused with a ValueError naming the file, the first bad sample and
    the field."""

    def __init__(self, path: str, check: bool = True, source: str = None):
        self.path = path            # what the file is called, in every message
        self.source = source or path  # what is read: the Loader's /proc/self/fd link to the file it opened
        if not os.path.isfile(self.source):
            raise ValueError(f'{path}: {_not_a_file(self.source)}')
        problem = header_problem(self.source)
        if problem:
            raise ValueError(f'{path}: {problem}')
        try:
            self.reader = Reader(self.source, CUSTOM_FIELDS)
        except (AssertionError, ValueError, OSError, IndexError, TypeError, KeyError, MemoryError) as e:
            raise ValueError(f'{path}: not a readable ffcv-dr .beton ({type(e).__name__}: {e})') from None
        handlers = self.reader.handlers
        if not (isinstance(handlers.get('image'), ReinforcedImageField)
                and isinstance(handlers.get('target'), SoftTargetField)):
            raise ValueError(f'{path}: not an ffcv-dr .beton (fields: {list(handlers)})')
        self.recipe = handlers['image'].recipe
        self.teachers = handlers['target'].teachers  # who made the top-k; None: unknown
        self.cut_from = handlers['image'].cut       # what ``subset`` cut it from; None: not cut
        self.record_dtype = reinforcement_dtype(self.recipe)
        self.topk_dtype = topk_dtype(self.recipe)
        self.params_size = self.recipe.num_samples * self.record_dtype.itemsize
        names = self.reader.field_names
        self.image_meta = self.reader.metadata[f'f{names.index("image")}']
        self.target_meta = self.reader.metadata[f'f{names.index("target")}']
        table = self.reader.alloc_table
        order = np.argsort(table['ptr'], kind='stable')  # a structured sort takes 10x longer
        self._ptrs, self._sizes = table['ptr'][order], table['size'][order]
        self._mmap = np.memmap(self.source, np.uint8, mode='r')
        if check:
            problems, _ = file_problems(self)
            if problems:
                kind, message = problems[0]
                more = f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''
                raise ValueError(f'{path}: {message}{more}; `ffcv-dr verify` lists them all')

    def labels_field(self):
        """The IntField labels, or None in a file without that field."""
        names = self.reader.field_names
        return self.reader.metadata[f'f{names.index("label")}'] if 'label' in names else None

    def __len__(self):
        return int(self.reader.num_samples)

    def block(self, ptr) -> np.ndarray:
        """The data block starting at byte ``ptr``; ValueError when none does."""
        k = int(np.searchsorted(self._ptrs, ptr))
        if k >= len(self._ptrs) or self._ptrs[k] != ptr:
            raise ValueError(f'{self.path}: no data block starts at byte {int(ptr)}')
        return self._mmap[int(ptr):int(ptr) + int(self._sizes[k])]

    def image_block_sizes(self) -> np.ndarray:
        """The size in bytes of each sample's image block (records, then image)."""
        return self._sizes[np.searchsorted(self._ptrs, self.image_meta['data_ptr'])]

    def image_bytes(self) -> int:
        """Bytes taken by all stored images (image blocks less their parameters)."""
        return int(self.image_block_sizes().sum()) - len(self) * self.params_size

    def image_block(self, index: int) -> np.ndarray:
        return self.block(self.image_meta[index]['data_ptr'])

    def records(self, index: int) -> np.ndarray:
        return self.image_block(index)[:self.params_size].view(self.record_dtype)

    def payload(self, index: int) -> np.ndarray:
        """The stored image: JPEG bytes, or raw RGB pixels (``image_meta['mode']``)."""
        return self.image_block(index)[self.params_size:]

    def render(self, index: int, j: int, seed=0, epoch=0, size=None) -> np.ndarray:
        """Reinforcement ``j`` of image ``index`` (fresh when j < 0) as the loader
        renders it, through the same jitted kernel: uint8 HWC of ``size`` (a
        side or (height, width); default: the recipe's)."""
        size = size or self.recipe.size
        out = np.empty((size, size, 3) if np.isscalar(size) else (*size, 3), np.uint8)
        layout = render_layout(self.recipe)
        block = self.image_block(index)
        if j >= 0:
            problem = self.problem(index, j)
            if problem:
                raise ValueError(f'{self.path}: sample {index}, reinforcement {j}: damaged '
                                 f'{problem} (the loader replaces it with a fresh augmentation)')
        pair = pair_index(block, j, layout)
        pair = index if pair < 0 else pair
        render(block, self.image_meta[index], self.image_block(pair), self.image_meta[pair],
               j, np.uint64(seed), epoch, index,
               np.empty(temp_size(self.recipe, out.shape), np.uint8), out, layout,
               fresh_settings(self.recipe))
        return out

    @functools.cached_property
    def orig_sizes(self) -> np.ndarray:
        """(original height, width) of every image: the pixel space of its crops."""
        return np.stack([self.image_meta['orig_height'], self.image_meta['orig_width']], 1).astype(np.int64)

    def problem(self, index: int, j: int) -> str:
        """'' or what :func:`rules.sample_problem` finds wrong with reinforcement j."""
        r = self.recipe
        code = sample_problem(self.image_block(index), self.block(self.target_meta[index]['data_ptr']),
                              j, render_layout(r), magnitude_limits(r), r.topk, r.num_classes, index,
                              self.orig_sizes)
        return PROBLEMS[code]

    def topk(self, index: int) -> np.ndarray:
        return self.topk_records(self.block(self.target_meta[index]['data_ptr']))

    def topk_records(self, block: np.ndarray) -> np.ndarray:
        """The top-k records in a target block (which may end in padding)."""
        return block[:self.recipe.num_samples * self.topk_dtype.itemsize].view(self.topk_dtype)

    def label(self, index: int) -> int:
        return int(self.target_meta[index]['label'])

    def describe(self, index: int, sample: int) -> dict:
        """One reinforcement as JSON-ready data: parameters and teacher top-k."""
        rec = self.records(index)[sample]
        params = _describe_view(rec, '', self.recipe)
        if self.recipe.mixing:
            flags = int(rec['mix_flags'])
            params['pair'] = int(rec['pair']) if flags & HAS_PAIR else None
            params['pair_params'] = _describe_view(rec, 'pair_', self.recipe) if flags & HAS_PAIR else None
            params['mixup'] = float(rec['mixup_lam']) if flags & HAS_MIXUP else None
            params['cutmix'] = ({'lam': float(rec['cutmix_lam']),
                                 'box': [int(v) for v in rec['cutmix_box']]}
                                if flags & HAS_CUTMIX else None)
        top = self.topk(index)[sample]
        order = np.argsort(-top['prob'].astype(np.float32), kind='stable')
        return {'index': int(index), 'sample': int(sample), 'label': self.label(index),
                'params': params,
                'topk': [[int(top['cls'][k]), round(float(top['prob'][k]), 6)] for k in order]}


def metadata_crc(metadata: np.ndarray) -> int:
    """CRC32 of FFCV's per-sample metadata table, which holds each field's
    block address, size and CRC: it tells one file (or one write) from another."""
    return zlib.crc32(np.ascontiguousarray(metadata).view(np.uint8))


def _describe_view(rec, prefix, recipe) -> dict:
    flags = int(rec[prefix + 'flags'])
    out = {'crop': [int(v) for v in rec[prefix + 'crop']], 'flip': bool(flags & FLIP)}
    if recipe.ra_ops:
        ops = [RA_OPS[o] if o < len(RA_OPS) else f'unknown op {o}' for o in rec[prefix + 'ra_op']]
        out['rand_augment'] = ([[op, float(m)] for op, m in zip(ops, rec[prefix + 'ra_mag'])]
                               if flags & HAS_RA else None)
    if recipe.erase:
        out['erase'] = [int(v) for v in rec[prefix + 'erase']] if flags & HAS_ERASE else None
    return out


def _not_a_file(path: str) -> str:
    """What ``path`` is, when it is not a regular file."""
    try:
        return f'{file_kind(os.stat(path).st_mode)}, not a .beton file'
    except OSError:
        return 'no such file'
