"""The target field: the teacher's sparse top-k for every reinforcement."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import numba as nb
import numpy as np
from ffcv.fields.base import Field
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from ..format import (HALF_TO_FLOAT, TARGET_METADATA, Recipe, block_crc, teachers_from_binary,
                      teachers_to_binary, topk_block_size, topk_dtype)
from ..record_bytes import read_u16
from ..rules import magnitude_limits, replayable
from ..replay_clock import IMAGE_PTR, ReplayClock, choose, read_epoch, sample_table
from ..render import render_layout

DENSIFY = ('smooth', 'zeros')


class SoftTargetField(Field):
    """``recipe.num_samples`` top-k records per image, plus the image's label.

    ``encode`` takes ``(label, records)``, records a structured array of
    ``topk_dtype(recipe)`` with one row per reinforcement. ``teachers``: the
    :class:`ffcv_dr.format.TeacherEntry` tuple of who made them (None: unknown).
    """

    def __init__(self, recipe: Recipe, teachers=None):
        self.recipe, self.teachers = recipe, teachers
        self.record_dtype = topk_dtype(recipe)

    @property
    def metadata_type(self) -> np.dtype:
        return TARGET_METADATA

    @staticmethod
    def from_binary(binary) -> 'SoftTargetField':
        return SoftTargetField(Recipe.from_binary(binary), teachers_from_binary(binary))

    def to_binary(self):
        out = self.recipe.to_binary()
        if self.teachers:
            teachers_to_binary(self.teachers, out)
        return out

    def encode(self, destination, value, malloc):
        label, records = value
        records = np.asarray(records, dtype=self.record_dtype)
        if records.shape != (self.recipe.num_samples,):
            raise ValueError(f'expected {self.recipe.num_samples} top-k records, got {records.shape}')
        raw = records.view('<u1').reshape(-1)
        ptr, block = malloc(topk_block_size(self.recipe))
        block[:raw.size] = raw
        block[raw.size:] = 0
        destination['data_ptr'] = ptr
        destination['label'] = label
        destination['crc32'] = block_crc(destination, block)

    def get_decoder_class(self):
        return SoftTargetDecoder


@nb.njit(nogil=True, fastmath=False, cache=True)
def densify(rec, topk, out, mode_zeros):
    """ml-dr's densify: 'smooth' spreads the missing mass over the other classes;
    'zeros' (or a top-k summing above 1) puts softmax(top-k) on the top-k, as
    ml-dr's ``densify`` does. The record must pass :func:`rules.topk_problem`."""
    num_classes = out.shape[0]
    total = 0.0
    for t in range(topk):
        total += HALF_TO_FLOAT[read_u16(rec, 2 * t)]
    rest = 1.0 - total
    if mode_zeros or rest < 0.0:
        out[:] = 0.0
        norm = 0.0
        for t in range(topk):
            norm += math.exp(HALF_TO_FLOAT[read_u16(rec, 2 * t)])
        for t in range(topk):
            out[read_u16(rec, 2 * (topk + t))] = math.exp(HALF_TO_FLOAT[read_u16(rec, 2 * t)]) / norm
    else:
        out[:] = rest / max(num_classes - topk, 1)
        for t in range(topk):
            out[read_u16(rec, 2 * (topk + t))] = HALF_TO_FLOAT[read_u16(rec, 2 * t)]


@nb.njit(nogil=True, fastmath=False, cache=True)
def one_hot(out, label):
    out[:] = 0.0
    if label < out.shape[0]:  # rules refuse a file with such labels; never write outside out
        out[label] = 1.0


class SoftTargetDecoder(Operation):
    """Dense float32 soft targets (num_classes,) of the replayed reinforcement.

    Uses the same :class:`ReplayClock` as the image decoder, so both pick the
    same reinforcement; fresh samples (probability ``1 - clock.p``), and
    samples whose record or top-k :func:`ffcv_dr.rules.sample_problem` finds
    damaged, get the one-hot ground-truth label.
    """

    def __init__(self, clock: Optional[ReplayClock] = None, densify: str = 'smooth'):
        super().__init__()
        if densify not in DENSIFY:
            raise ValueError(f'densify must be one of {DENSIFY}, got {densify!r}')
        self.clock = clock if clock is not None else ReplayClock()
        self.densify = densify

    def declare_state_and_memory(self, previous_state: State):
        shape = (self.field.recipe.num_classes,)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype('<f4')),
                AllocationQuery(shape, np.dtype('<f4')))

    def generate_code(self) -> Callable:
        recipe = self.field.recipe
        rec_size = topk_dtype(recipe).itemsize
        num_samples, topk = np.int64(recipe.num_samples), np.int64(recipe.topk)
        seed, p, address = self.clock.constants
        table_address, rows = self.clock.table
        layout, limits = render_layout(recipe), magnitude_limits(recipe)
        num_classes = np.int64(recipe.num_classes)
        mode_zeros = self.densify == 'zeros'
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()

        def decode(batch_indices, destination, metadata, storage_state):
            epoch = read_epoch(address)
            table = sample_table(table_address, rows)
            for dst_ix in my_range(len(batch_indices)):
                index = batch_indices[dst_ix]
                field = metadata[index]
                out = destination[dst_ix]
                block = mem_read(field['data_ptr'], storage_state)
                j = replayable(choose(seed, epoch, index, num_samples, p),
                               mem_read(np.uint64(table[index, IMAGE_PTR]), storage_state), block,
                               index, table, layout, limits, topk, num_classes)
                if j >= 0:
                    densify(block[j * rec_size:(j + 1) * rec_size], topk, out, mode_zeros)
                else:
                    one_hot(out, field['label'])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ReinforcementIndexDecoder(Operation):
    """The reinforcement j each sample replays this epoch (-1: fresh), as int64.

    Put it on the ``target`` field under another output name to see the
    schedule (debugging, curricula)."""

    def __init__(self, clock: Optional[ReplayClock] = None):
        super().__init__()
        self.clock = clock if clock is not None else ReplayClock()

    def declare_state_and_memory(self, previous_state: State):
        return (replace(previous_state, jit_mode=True, shape=(1,), dtype=np.dtype('<i8')),
                AllocationQuery((1,), np.dtype('<i8')))

    def generate_code(self) -> Callable:
        recipe = self.field.recipe
        num_samples, topk, num_classes = (np.int64(v) for v in
                                          (recipe.num_samples, recipe.topk, recipe.num_classes))
        seed, p, address = self.clock.constants
        table_address, rows = self.clock.table
        layout, limits = render_layout(recipe), magnitude_limits(recipe)
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()

        def decode(batch_indices, destination, metadata, storage_state):
            epoch = read_epoch(address)
            table = sample_table(table_address, rows)
            for dst_ix in my_range(len(batch_indices)):
                index = batch_indices[dst_ix]
                destination[dst_ix, 0] = replayable(
                    choose(seed, epoch, index, num_samples, p),
                    mem_read(np.uint64(table[index, IMAGE_PTR]), storage_state),
                    mem_read(metadata[index]['data_ptr'], storage_state), index, table, layout, limits,
                    topk, num_classes)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
