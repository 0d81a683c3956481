"""The image field: the stored image (JPEG bytes or raw pixels) with the
augmentation parameters of every reinforcement."""
from __future__ import annotations

from collections import namedtuple
from dataclasses import replace
from typing import Callable, Optional, Tuple

import numba as nb
import numpy as np
from ffcv.fields.base import Field
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from ..format import (FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA,
                      IMAGE_METADATA, Recipe, block_crc, field_offset, reinforcement_dtype)
from ..geometry import (erase, fresh_flip, hflip_inplace, random_erasing, random_resized_crop,
                        read_u16, scale_box)
from ..jpeg import crop_resize
from ..mixing import cutmix, mixup
from ..randaugment import apply_op, draw_ops, magnitude_table
from ..rules import magnitude_limits, replayable
from ..schedule import (STREAM_FRESH_ERASE, STREAM_FRESH_RA, TARGET_PTR, ReplayClock, choose,
                        read_epoch, sample_table)


class ReinforcedImageField(Field):
    """The stored image plus ``recipe.num_samples`` reinforcement records.

    ``encode`` takes ``(payload, orig_width, orig_height, width, height, mode,
    records)``: the JPEG bytes or raw RGB pixels as a uint8 array, the
    original size (the pixel space of the stored boxes), the stored size,
    ``STORED_JPEG`` or ``STORED_RAW``, and a structured array of
    ``reinforcement_dtype(recipe)`` with one row per reinforcement.
    """

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.record_dtype = reinforcement_dtype(recipe)

    @property
    def metadata_type(self) -> np.dtype:
        return IMAGE_METADATA

    @staticmethod
    def from_binary(binary) -> 'ReinforcedImageField':
        return ReinforcedImageField(Recipe.from_binary(binary))

    def to_binary(self):
        return self.recipe.to_binary()

    def encode(self, destination, value, malloc):
        payload, orig_w, orig_h, width, height, mode, records = value
        records = np.asarray(records, dtype=self.record_dtype)
        if records.shape != (self.recipe.num_samples,):
            raise ValueError(f'expected {self.recipe.num_samples} reinforcements, got {records.shape}')
        params = records.view('<u1').reshape(-1)
        ptr, block = malloc(params.size + payload.size)
        block[:params.size] = params
        block[params.size:] = payload
        destination['data_ptr'] = ptr
        destination['orig_width'] = orig_w
        destination['orig_height'] = orig_h
        destination['width'] = width
        destination['height'] = height
        destination['mode'] = mode
        destination['crc32'] = block_crc(destination, block)

    def get_decoder_class(self):
        return ReinforcedImageDecoder


class ReinforcedImageDecoder(Operation):
    """Decodes the JPEG and replays the chosen reinforcement, in numba.

    Output: uint8 HWC images of ``output_size`` (default: the recipe's size).
    The stored crop is replayed, then flip, RandAugment, RandomErasing and,
    in mixing recipes, MixUp/CutMix with the paired image, which is read from
    the same file. Stored boxes and translations are rescaled when the output
    size differs from the recipe's. With probability ``1 - clock.p`` a sample
    gets a fresh augmentation from the same kernels instead, drawn as the
    stored ones were (the recipe's scale, ratio, RandAugment magnitude and
    erasing probability). So does a sample whose record or top-k
    :func:`ffcv_dr.rules.sample_problem` finds damaged; the clock, bound to
    the file, keeps count.
    """

    def __init__(self, output_size: Optional[Tuple[int, int]] = None,
                 clock: Optional[ReplayClock] = None):
        super().__init__()
        self.output_size = output_size
        self.clock = clock if clock is not None else ReplayClock()

    def _out_shape(self):
        size = self.output_size or (self.field.recipe.size,) * 2
        return (int(size[0]), int(size[1]), 3)

    def declare_state_and_memory(self, previous_state: State):
        out_shape = self._out_shape()
        temp = temp_size(self.field.recipe, out_shape)
        return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=np.dtype('u1')),
                (AllocationQuery(out_shape, np.dtype('u1')),
                 AllocationQuery((temp,), np.dtype('u1'))))

    def generate_code(self) -> Callable:
        recipe = self.field.recipe
        if recipe.mixing and not _reads_whole_file(self.memory_read):
            raise ValueError(
                'this .beton mixes images (MixUp/CutMix): the decoder reads each paired image '
                "from the file, which FFCV's process cache (os_cache=False) does not load; "
                'use os_cache=True')
        if self.clock.p > 0 and not recipe.num_samples:
            raise ValueError(f'holds no reinforcements, so only fresh augmentations (p=0) can be '
                             f'loaded, not p={self.clock.p}')
        layout = render_layout(recipe)
        fresh = fresh_settings(recipe)
        limits = magnitude_limits(recipe)
        num_samples, topk, num_classes = (np.int64(v) for v in
                                          (recipe.num_samples, recipe.topk, recipe.num_classes))
        seed, p, address = self.clock.constants
        table_address, rows = self.clock.table
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = read_epoch(address)
            table = sample_table(table_address, rows)
            for dst_ix in my_range(len(batch_indices)):
                index = batch_indices[dst_ix]
                meta = metadata[index]
                block = mem_read(meta['data_ptr'], storage_state)
                j = replayable(choose(seed, epoch, index, num_samples, p), block,
                               mem_read(np.uint64(table[index, TARGET_PTR]), storage_state), index,
                               table, layout, limits, topk, num_classes)
                pair = pair_index(block, j, layout)
                pair_meta, pair_block = meta, block
                if pair >= 0:
                    pair_meta = metadata[pair]
                    pair_block = mem_read(pair_meta['data_ptr'], storage_state)
                render(block, meta, pair_block, pair_meta, j, seed, epoch, index,
                       temp_storage[dst_ix], destination[dst_ix], layout, fresh)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def _reads_whole_file(memory_read) -> bool:
    """False for FFCV's process cache, which holds only the batch's own pages."""
    return 'ProcessCacheManager' not in getattr(memory_read, 'py_func', memory_read).__qualname__


View = namedtuple('View', 'crop flags ra_op ra_mag erase erase_wide')
View.__doc__ = 'Byte offsets of one view inside a record; -1 where the recipe has no such field.'
Layout = namedtuple('Layout', 'params_size record_size size num_ops mixing own paired '
                              'pair mix_flags mixup_lam cutmix_lam cutmix_box')
Fresh = namedtuple('Fresh', 'scale_lo scale_hi ratio_lo ratio_hi ra_mags ra_signed erase_p')


def _view(dtype: np.dtype, recipe: Recipe, prefix: str) -> View:
    def off(name):
        return field_offset(dtype, prefix + name) if prefix + name in dtype.fields else -1
    return View(off('crop'), off('flags'), off('ra_op'), off('ra_mag'), off('erase'),
                recipe.size > 255)


def render_layout(recipe: Recipe) -> Layout:
    """Where :func:`render` finds each parameter in a record."""
    dtype = reinforcement_dtype(recipe)

    def off(name):
        return field_offset(dtype, name) if name in dtype.fields else -1
    return Layout(dtype.itemsize * recipe.num_samples, dtype.itemsize, recipe.size,
                  recipe.ra_ops, recipe.mixing, _view(dtype, recipe, ''),
                  _view(dtype, recipe, 'pair_'), off('pair'), off('mix_flags'),
                  off('mixup_lam'), off('cutmix_lam'), off('cutmix_box'))


def fresh_settings(recipe: Recipe) -> Fresh:
    """What fresh (non-replayed) samples draw from, at the recipe's size, as the
    stored ones were drawn; :func:`render` scales translations to the output
    size, so nothing compiled depends on it."""
    mags, signed = magnitude_table(recipe.size, recipe.size, recipe.ra_magnitude)
    return Fresh(*recipe.scale, *recipe.ratio, mags, signed,
                 recipe.erase_p if recipe.erase else 0.0)


def temp_size(recipe: Recipe, out_shape) -> int:
    """Scratch bytes per sample: one image for the geometric ops and, when the
    recipe mixes, the rendered paired image."""
    return out_shape[0] * out_shape[1] * 3 * (2 if recipe.mixing else 1)


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def _read_f32(buf, offset):
    return buf[offset:offset + 4].view(np.float32)[0]


@nb.njit(nogil=True, fastmath=False, cache=True)
def pair_index(block, j, layout):
    """The image that reinforcement j of this block mixes with, or -1."""
    if not layout.mixing or j < 0:
        return -1
    rec = block[j * layout.record_size:(j + 1) * layout.record_size]
    if rec[layout.mix_flags] & HAS_PAIR == 0:
        return -1
    return np.int64(read_u16(rec, layout.pair)) | (np.int64(read_u16(rec, layout.pair + 2)) << 16)


@nb.njit(nogil=True, fastmath=False, cache=True)
def _render_stored(block, meta, rec, view, layout, scratch, out):
    """Crop (decoding what a JPEG needs) and resize one stored view into
    ``out``, then replay the rest."""
    height, width = np.int64(meta['height']), np.int64(meta['width'])
    top, left, h, w = scale_box(
        read_u16(rec, view.crop), read_u16(rec, view.crop + 2),
        read_u16(rec, view.crop + 4), read_u16(rec, view.crop + 6),
        meta['orig_height'], meta['orig_width'], height, width)
    crop_resize(block[layout.params_size:], meta['mode'], height, width, top, left, h, w, out)
    replay_view(out, rec, view, layout, scratch)


@nb.njit(nogil=True, fastmath=False, cache=True)
def replay_view(out, rec, view, layout, scratch):
    """Flip, RandAugment and RandomErasing of one stored view, applied to its
    resized crop ``out``; ``scratch`` has out's shape."""
    flags = rec[view.flags]
    if flags & FLIP:
        hflip_inplace(out)
    sy = out.shape[0] / layout.size
    sx = out.shape[1] / layout.size
    if flags & HAS_RA:
        for k in range(layout.num_ops):
            apply_op(out, scratch, rec[view.ra_op + k], _read_f32(rec, view.ra_mag + 4 * k), sy, sx)
    if flags & HAS_ERASE:
        if view.erase_wide:
            box = (read_u16(rec, view.erase), read_u16(rec, view.erase + 2),
                   read_u16(rec, view.erase + 4), read_u16(rec, view.erase + 6))
        else:
            box = (np.int64(rec[view.erase]), np.int64(rec[view.erase + 1]),
                   np.int64(rec[view.erase + 2]), np.int64(rec[view.erase + 3]))
        erase(out, *_scale_out_box(box, sy, sx))


@nb.njit(nogil=True, fastmath=False, cache=True)
def replay_mixing(out, paired, rec, layout):
    """MixUp, then CutMix, of ``out`` with the rendered paired image."""
    flags = rec[layout.mix_flags]
    if flags & HAS_MIXUP:
        mixup(out, paired, np.float64(_read_f32(rec, layout.mixup_lam)))
    if flags & HAS_CUTMIX:
        b = layout.cutmix_box
        r1, c1, r2, c2 = (read_u16(rec, b), read_u16(rec, b + 2),
                          read_u16(rec, b + 4), read_u16(rec, b + 6))
        top, left, h, w = _scale_out_box((r1, c1, r2 - r1, c2 - c1),
                                         out.shape[0] / layout.size, out.shape[1] / layout.size)
        cutmix(out, paired, top, left, top + h, left + w)


@nb.njit(nogil=True, fastmath=False, inline='always', cache=True)
def _scale_out_box(box, sy, sx):
    """A (top, left, height, width) box in recipe-size pixels, at the output size."""
    top, left, h, w = box
    if sy == 1.0 and sx == 1.0:
        return top, left, h, w
    t, l = int(round(top * sy)), int(round(left * sx))
    return t, l, int(round((top + h) * sy)) - t, int(round((left + w) * sx)) - l


@nb.njit(nogil=True, fastmath=False, cache=True)
def _render_fresh(block, meta, seed, epoch, index, layout, fresh, scratch, out):
    """A fresh augmentation with the recipe's ops, drawn from (seed, epoch, index)."""
    height, width = np.int64(meta['height']), np.int64(meta['width'])
    top, left, h, w = random_resized_crop(height, width, fresh.scale_lo, fresh.scale_hi,
                                          fresh.ratio_lo, fresh.ratio_hi, seed, epoch, index)
    crop_resize(block[layout.params_size:], meta['mode'], height, width, top, left, h, w, out)
    if fresh_flip(seed, epoch, index):
        hflip_inplace(out)
    if layout.num_ops:
        ops = np.empty(layout.num_ops, np.uint8)
        mags = np.empty(layout.num_ops, np.float32)
        draw_ops(fresh.ra_mags, fresh.ra_signed, seed, epoch, index, STREAM_FRESH_RA, ops, mags)
        sy, sx = out.shape[0] / layout.size, out.shape[1] / layout.size
        for k in range(layout.num_ops):
            apply_op(out, scratch, ops[k], mags[k], sy, sx)
    if fresh.erase_p > 0:
        erase(out, *random_erasing(out.shape[0], out.shape[1], fresh.erase_p,
                                   seed, epoch, index, STREAM_FRESH_ERASE))


@nb.njit(nogil=True, fastmath=False, cache=True)
def render(block, meta, pair_block, pair_meta, j, seed, epoch, index, temp, out, layout, fresh):
    """Render one sample; the decoder and ``ffcv-dr replay`` both call it, so a
    replayed PNG is exactly what training sees.

    Writes reinforcement ``j`` of the image in ``block`` (a fresh augmentation
    drawn from (seed, epoch, index) when j < 0) into ``out``; ``pair_block``
    and ``pair_meta`` are those of :func:`pair_index`'s image (any image when
    there is none). ``temp`` holds :func:`temp_size` bytes. It lives at module
    level, so every loader shares one compiled copy (which is why
    ``ffcv_fixes`` must keep FFCV from mutating numba's interned array types).
    """
    n = out.size
    scratch = temp[:n].reshape(out.shape)
    if j < 0:
        _render_fresh(block, meta, seed, epoch, index, layout, fresh, scratch, out)
        return
    rec = block[j * layout.record_size:(j + 1) * layout.record_size]
    _render_stored(block, meta, rec, layout.own, layout, scratch, out)
    if pair_index(block, j, layout) < 0:
        return
    paired = temp[n:2 * n].reshape(out.shape)
    _render_stored(pair_block, pair_meta, rec, layout.paired, layout, scratch, paired)
    replay_mixing(out, paired, rec, layout)
