"""The image field: JPEG bytes with the augmentation parameters of every reinforcement."""
from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable, Optional, Tuple

import numba as nb
import numpy as np
from ffcv.fields.base import Field
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from ..format import (FLIP, IMAGE_METADATA, Recipe, field_offset,
                      reinforcement_dtype)
from ..geometry import (fresh_flip, hflip_inplace, random_resized_crop,
                        read_u16, scale_box)
from ..schedule import ReplayClock, choose, read_epoch


class ReinforcedImageField(Field):
    """JPEG bytes plus ``recipe.num_samples`` reinforcement records.

    ``encode`` takes ``(jpeg, orig_width, orig_height, width, height, records)``:
    the JPEG as a uint8 array, the original size (the pixel space of the
    stored boxes), the size of the stored JPEG, and a structured array of
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
        jpeg, orig_w, orig_h, width, height, records = value
        records = np.asarray(records, dtype=self.record_dtype)
        if records.shape != (self.recipe.num_samples,):
            raise ValueError(f'expected {self.recipe.num_samples} reinforcements, got {records.shape}')
        params = records.view('<u1').reshape(-1)
        ptr, block = malloc(params.size + jpeg.size)
        block[:params.size] = params
        block[params.size:] = jpeg
        destination['data_ptr'] = ptr
        destination['orig_width'] = orig_w
        destination['orig_height'] = orig_h
        destination['width'] = width
        destination['height'] = height
        destination['crc32'] = zlib.crc32(block)

    def get_decoder_class(self):
        return ReinforcedImageDecoder


class ReinforcedImageDecoder(Operation):
    """Decodes the JPEG and replays the chosen reinforcement, in numba.

    Output: uint8 HWC images of ``output_size`` (default: the recipe's size).
    Stored boxes are rescaled when the output size differs from the recipe's
    or the stored image was resized. With probability ``1 - clock.p`` a sample
    gets a fresh RandomResizedCrop (``scale``, ``ratio``) and flip instead.
    """

    def __init__(self, output_size: Optional[Tuple[int, int]] = None,
                 clock: Optional[ReplayClock] = None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.output_size = output_size
        self.clock = clock if clock is not None else ReplayClock()
        self.scale = scale
        self.ratio = ratio

    def _out_shape(self):
        size = self.output_size or (self.field.recipe.size,) * 2
        return (int(size[0]), int(size[1]), 3)

    def declare_state_and_memory(self, previous_state: State):
        out_shape = self._out_shape()
        pixels = (self.metadata['width'].astype(np.uint64)
                  * self.metadata['height'].astype(np.uint64)).max()
        return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=np.dtype('u1')),
                (AllocationQuery(out_shape, np.dtype('u1')),
                 AllocationQuery((int(pixels) * 3,), np.dtype('u1'))))

    def generate_code(self) -> Callable:
        layout = render_layout(self.field.recipe, self.scale, self.ratio)
        num_samples = np.int64(self.field.recipe.num_samples)
        seed, p, address = self.clock.constants
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = read_epoch(address)
            for dst_ix in my_range(len(batch_indices)):
                index = batch_indices[dst_ix]
                field = metadata[index]
                render(mem_read(field['data_ptr'], storage_state),
                       field['height'], field['width'], field['orig_height'], field['orig_width'],
                       choose(seed, epoch, index, num_samples, p), seed, epoch, index,
                       temp_storage[dst_ix], destination[dst_ix], layout)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def render_layout(recipe: Recipe, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """The constants :func:`render` needs: record layout and fresh-crop ranges."""
    dtype = reinforcement_dtype(recipe)
    return (dtype.itemsize * recipe.num_samples, dtype.itemsize,
            field_offset(dtype, 'crop'), field_offset(dtype, 'flags'),
            float(scale[0]), float(scale[1]), float(ratio[0]), float(ratio[1]))


_imdecode = nb.njit(nogil=True)(imdecode)
_resize_crop = nb.njit(nogil=True)(resize_crop)


@nb.njit(nogil=True)
def render(block, height, width, orig_height, orig_width, j, seed, epoch, index, temp, out,
           layout):
    """Render one sample; the decoder and ``ffcv-dr replay`` both call it, so a
    replayed PNG is exactly what training sees.

    Decodes the JPEG of ``block`` into ``temp`` and writes reinforcement ``j``
    (a fresh augmentation drawn from (seed, epoch, index) when j < 0) into
    ``out``. It lives at module level, so every loader shares one compiled
    copy (which is why ``ffcv_fixes`` must keep FFCV from mutating numba's
    interned array types).
    """
    params_size, rec_size, crop_off, flags_off, scale_lo, scale_hi, ratio_lo, ratio_hi = layout
    height = np.uint32(height)
    width = np.uint32(width)
    pixels = temp[:height * width * 3].reshape(height, width, 3)
    _imdecode(block[params_size:], pixels, height, width, height, width, 0, 0, 1, 1, False, False)
    if j >= 0:
        rec = block[j * rec_size:(j + 1) * rec_size]
        top, left, h, w = scale_box(
            read_u16(rec, crop_off), read_u16(rec, crop_off + 2),
            read_u16(rec, crop_off + 4), read_u16(rec, crop_off + 6),
            orig_height, orig_width, height, width)
        flip = (rec[flags_off] & FLIP) != 0
    else:
        top, left, h, w = random_resized_crop(height, width, scale_lo, scale_hi,
                                              ratio_lo, ratio_hi, seed, epoch, index)
        flip = fresh_flip(seed, epoch, index)
    _resize_crop(pixels, top, top + h, left, left + w, out)
    if flip:
        hflip_inplace(out)
