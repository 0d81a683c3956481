"""The image field: the stored image (JPEG bytes or raw pixels) with the
augmentation parameters of every reinforcement."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
from ffcv.fields.base import Field
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from ..file_reads import open_for_reads, read_payload
from ..format import (IMAGE_METADATA, Recipe, block_crc, cut_from_binary, cut_to_binary,
                      reinforcement_dtype)
from ..render import fresh_settings, pair_index, render, render_layout, temp_size
from ..rules import magnitude_limits, replayable
from ..replay_clock import DAMAGED, IMAGE_SIZE, TARGET_PTR, ReplayClock, choose, read_epoch, sample_table


class ReinforcedImageField(Field):
    """The stored image plus ``recipe.num_samples`` reinforcement records.

    ``encode`` takes ``(payload, orig_width, orig_height, width, height, mode,
    records)``: the JPEG bytes or raw RGB pixels as a uint8 array, the
    original size (the pixel space of the stored boxes), the stored size,
    ``STORED_JPEG`` or ``STORED_RAW``, and a structured array of
    ``reinforcement_dtype(recipe)`` with one row per reinforcement. ``cut``:
    the :class:`ffcv_dr.format.CutFrom` of a file ``ffcv-dr subset`` wrote.
    """

    def __init__(self, recipe: Recipe, cut=None):
        self.recipe, self.cut = recipe, cut
        self.record_dtype = reinforcement_dtype(recipe)

    @property
    def metadata_type(self) -> np.dtype:
        return IMAGE_METADATA

    @staticmethod
    def from_binary(binary) -> 'ReinforcedImageField':
        return ReinforcedImageField(Recipe.from_binary(binary), cut_from_binary(binary))

    def to_binary(self):
        out = self.recipe.to_binary()
        if self.cut:
            cut_to_binary(self.cut, out)
        return out

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
    the same file (under ``os_cache=False``, by a read of just its bytes:
    FFCV's process cache loads only the batch's own pages). Stored boxes and
    translations are rescaled when the output size differs from the recipe's. With probability ``1 - clock.p`` a sample
    gets a fresh augmentation from the same kernels instead, drawn as the
    stored ones were (the recipe's scale, ratio, RandAugment magnitude and
    erasing probability). So does a sample whose record or top-k
    :func:`ffcv_dr.rules.sample_problem` finds damaged; the clock, bound to
    the file, keeps count, of those and of images that do not decode as
    their metadata says (which come out black).
    """

    def __init__(self, output_size: Optional[Tuple[int, int]] = None,
                 clock: Optional[ReplayClock] = None):
        super().__init__()
        self.output_size = output_size
        self.clock = clock if clock is not None else ReplayClock()
        self._fd = None  # the file, for mixing partners under os_cache=False

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
        # FFCV's process cache (os_cache=False) loads only the batch's own pages:
        # a mixing partner's image is then read from the file by itself.
        fd = np.int32(-1)
        if recipe.mixing and not _reads_whole_file(self.memory_read):
            if self._fd is None:
                self._fd = open_for_reads(self, self.clock.source)
            fd = np.int32(self._fd)
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
                    if fd >= 0:
                        pair_block = read_payload(fd, pair_meta['data_ptr'], table[pair, IMAGE_SIZE],
                                                  layout.params_size)
                    else:
                        pair_block = mem_read(pair_meta['data_ptr'], storage_state)
                if not render(block, meta, pair_block, pair_meta, j, seed, epoch, index,
                              temp_storage[dst_ix], destination[dst_ix], layout, fresh):
                    table[index, DAMAGED] = 1   # an image that is not what its metadata says
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def _reads_whole_file(memory_read) -> bool:
    """False for FFCV's process cache, which holds only the batch's own pages."""
    return 'ProcessCacheManager' not in getattr(memory_read, 'py_func', memory_read).__qualname__
