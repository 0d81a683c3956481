"""The render engine: one sample of a ``.beton`` into pixels, as training
sees it. A stored reinforcement is cropped (decoding only what a JPEG
needs), resized and replayed (flip, RandAugment, RandomErasing, then MixUp or
CutMix with its rendered partner); a fresh one is drawn first. The image
decoder, ``replay``, ``inspect``, ``reinforce`` (the teacher sees these
pixels) and the tests all call :func:`render`. Its kernels live beside it:
:mod:`.geometry`, :mod:`.jpeg`, :mod:`.randaugment`, :mod:`.mixing`.
"""
from __future__ import annotations

from collections import namedtuple

import numba as nb
import numpy as np

from .format import (FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA, Recipe, field_offset,
                     reinforcement_dtype)
from .geometry import erase, fresh_flip, hflip_inplace, random_erasing, random_resized_crop, scale_box
from .jpeg import crop_resize
from .mixing import cutmix, mixup
from .randaugment import apply_op, draw_ops, magnitude_table
from .record_bytes import read_f32, read_u16, write_f32, write_u16
from .replay_clock import STREAM_FRESH_ERASE, STREAM_FRESH_RA


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
def render_stored(block, meta, rec, view, layout, scratch, out):
    """Crop (decoding what a JPEG needs) and resize one stored view into
    ``out``, then replay the rest. False where the stored image cannot be
    decoded as its metadata describes it (``out`` then starts black)."""
    height, width = np.int64(meta['height']), np.int64(meta['width'])
    top, left, h, w = scale_box(
        read_u16(rec, view.crop), read_u16(rec, view.crop + 2),
        read_u16(rec, view.crop + 4), read_u16(rec, view.crop + 6),
        meta['orig_height'], meta['orig_width'], height, width)
    ok = crop_resize(block[layout.params_size:], meta['mode'], height, width, top, left, h, w, out)
    replay_view(out, rec, view, layout, scratch)
    return ok


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
            apply_op(out, scratch, rec[view.ra_op + k], read_f32(rec, view.ra_mag + 4 * k), sy, sx)
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
        mixup(out, paired, np.float64(read_f32(rec, layout.mixup_lam)))
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
def draw_view(rec, view, layout, fresh, orig_h, orig_w, seed, j, index):
    """Draw one view (crop in the original pixels, flip, RandAugment, erase in
    the recipe's output) from the schedule at (seed, j, index) into the record
    bytes ``rec``: the one path by which ``reinforce`` makes reinforcement j
    and the loader makes the fresh sample of epoch j."""
    top, left, h, w = random_resized_crop(orig_h, orig_w, fresh.scale_lo, fresh.scale_hi,
                                          fresh.ratio_lo, fresh.ratio_hi, seed, j, index)
    for k, v in enumerate((top, left, h, w)):
        write_u16(rec, view.crop + 2 * k, v)
    flags = FLIP if fresh_flip(seed, j, index) else 0
    if layout.num_ops:
        ops = np.empty(layout.num_ops, np.uint8)
        mags = np.empty(layout.num_ops, np.float32)
        draw_ops(fresh.ra_mags, fresh.ra_signed, seed, j, index, STREAM_FRESH_RA, ops, mags)
        for k in range(layout.num_ops):
            rec[view.ra_op + k] = ops[k]
            write_f32(rec, view.ra_mag + 4 * k, mags[k])
        flags |= HAS_RA
    if view.erase >= 0 and fresh.erase_p > 0:
        box = random_erasing(layout.size, layout.size, fresh.erase_p, seed, j, index, STREAM_FRESH_ERASE)
        if box[2]:
            for k in range(4):
                if view.erase_wide:
                    write_u16(rec, view.erase + 2 * k, box[k])
                else:
                    rec[view.erase + k] = box[k]
            flags |= HAS_ERASE
    rec[view.flags] = flags


@nb.njit(nogil=True, fastmath=False, cache=True)
def render_fresh(block, meta, seed, epoch, index, layout, fresh, scratch, out):
    """A fresh augmentation drawn from (seed, epoch, index) as a record, then
    rendered as a stored one."""
    rec = np.zeros(layout.record_size, np.uint8)
    draw_view(rec, layout.own, layout, fresh, np.int64(meta['orig_height']), np.int64(meta['orig_width']),
              seed, epoch, index)
    return render_stored(block, meta, rec, layout.own, layout, scratch, out)


@nb.njit(nogil=True, fastmath=False, cache=True)
def render(block, meta, pair_block, pair_meta, j, seed, epoch, index, temp, out, layout, fresh):
    """Render one sample; the decoder and ``ffcv-dr replay`` both call it, so a
    replayed PNG is exactly what training sees.

    Writes reinforcement ``j`` of the image in ``block`` (a fresh augmentation
    drawn from (seed, epoch, index) when j < 0) into ``out``; ``pair_block``
    and ``pair_meta`` are those of :func:`pair_index`'s image (any image when
    there is none). ``temp`` holds :func:`temp_size` bytes. Returns False
    where an image could not be decoded as its metadata says. It lives at module
    level, so every loader shares one compiled copy (which is why
    ``ffcv_patches`` must keep FFCV from mutating numba's interned array types).
    """
    n = out.size
    scratch = temp[:n].reshape(out.shape)
    if j < 0:
        return render_fresh(block, meta, seed, epoch, index, layout, fresh, scratch, out)
    rec = block[j * layout.record_size:(j + 1) * layout.record_size]
    ok = render_stored(block, meta, rec, layout.own, layout, scratch, out)
    if pair_index(block, j, layout) < 0:
        return ok
    paired = temp[n:2 * n].reshape(out.shape)
    ok_pair = render_stored(pair_block, pair_meta, rec, layout.paired, layout, scratch, paired)
    replay_mixing(out, paired, rec, layout)
    return ok and ok_pair
