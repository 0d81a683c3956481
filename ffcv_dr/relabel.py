"""``ffcv-dr relabel``: a new teacher's labels for the reinforcements a
``.beton`` already holds.

The teacher's forward passes are what a reinforced dataset costs; the
augmentation draws are cheap, and keeping them keeps runs before and after
comparable view for view. So every stored reinforcement (MixUp/CutMix with
its stored partner included) is rendered with the loader's own kernel
(:func:`ffcv_dr.render.render`) and run through the teacher, and the output
keeps the input's images, labels and augmentation records byte for byte,
with new top-k. With ``combine='mean'`` the new probabilities are averaged
with the stored ones (the stored top-k made dense as the loader's
``densify`` does), so an ensemble grows one teacher at a time; the file's
record of its teachers (:data:`ffcv_dr.format.TEACHERS_DTYPE`) says who
made the labels and with what weight.

Work is shared, kept and resumed in chunks as in ``reinforce``
(:mod:`ffcv_dr.chunks`): one process or a torchrun group give the same file.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numba as nb
import numpy as np
import torch

from .beton import BetonFile
from .chunks import (ChunkSource, assemble, barrier, chunk_saver, chunks_to_do, images_of,
                     images_starting_in, parts_dir, rows_of, run_chunks, teacher_job, topk_records)
from .fields.soft_target import DENSIFY, densify
from .format import FORMAT_VERSION, MAX_TEACHERS, TeacherEntry, block_crc
from .jobs import JobError, digest
from .render import fresh_settings, pair_index, render, render_layout, temp_size
from .rules import describe, first_problem, magnitude_limits
from .teachers import load_teacher
from .writer import BetonImages

COMBINE = ('replace', 'mean')
UNKNOWN = TeacherEntry('', '', 1.0)   # the teachers of a file without their record


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output besides the input file and the
    teachers' weights; a resumed run must match it."""
    teacher: str
    checkpoints: tuple
    teacher_size: int
    topk: int
    combine: str
    weight: float
    densify: str
    chunk: int
    batch_size: int


def grown_teachers(stored, entries, weight: float) -> tuple:
    """The record after mixing ``entries`` (the new teacher's members, who
    share ``weight``) into labels made by ``stored`` (None: unknown), the
    same teacher's shares summed."""
    merged = {}
    for t in tuple(entries) + tuple(replace(t, weight=t.weight * (1 - weight)) for t in stored or (UNKNOWN,)):
        key = (t.name, t.sha256)
        merged[key] = replace(t, weight=merged[key].weight + t.weight) if key in merged else t
    return tuple(t for t in merged.values() if t.weight > 0)


@nb.njit(nogil=True, cache=True)
def _dense(raw, record_size, topk, out, mode_zeros):
    """The top-k records in ``raw`` as (records, classes) distributions."""
    for r in range(out.shape[0]):
        densify(raw[r * record_size:(r + 1) * record_size], topk, out[r], mode_zeros)


def open_input(path: str) -> BetonFile:
    """The file to relabel; refused, saying why, when the kernels cannot
    replay it (another format version, a damaged header or table, a plain
    FFCV file) or it holds no reinforcements."""
    try:
        f = BetonFile(path)
    except ValueError as e:
        raise JobError(f'cannot relabel: {e}') from None
    if not f.recipe.num_samples:
        raise JobError(f'{path}: holds no reinforcements, so there is nothing to relabel '
                       '(`ffcv-dr reinforce` makes them)')
    return f


def relabel(input_path: str, output: str, teacher: str = 'bundled:efficientnet_lite0',
            checkpoints=(), teacher_size: int = None, topk: int = None, combine: str = 'replace',
            weight: float = None, densify_mode: str = 'smooth', batch_size: int = 64,
            device: str = 'cpu', chunk: int = 64, num_workers: int = None, pretrained: bool = True,
            restart: bool = False) -> dict:
    """Write ``output``: ``input_path``'s images and reinforcements with the
    top-k of ``teacher`` on them (see the module docstring). ``topk``:
    default the input's. ``combine='mean'``: ``weight`` of the new teacher's
    probabilities plus ``1 - weight`` of the stored ones, made dense as the
    loader's ``densify_mode`` does. Finished chunks are reused only by a run
    with the same fingerprint (the input file, the teachers' weights, every
    setting); ``restart`` throws away those of another run instead."""
    if combine not in COMBINE:
        raise ValueError(f'combine must be one of {COMBINE}, got {combine!r}')
    if combine == 'mean' and (weight is None or not 0 < weight <= 1):
        raise ValueError(f'--combine mean needs --weight in (0, 1], the new teacher\'s share (got {weight})')
    if combine == 'replace' and weight is not None:
        raise ValueError('--weight goes with --combine mean')
    if densify_mode not in DENSIFY:
        raise ValueError(f'densify must be one of {DENSIFY}, got {densify_mode!r}')
    num_workers = num_workers or os.cpu_count()
    with teacher_job(output, [input_path, *checkpoints], device) as (rank, world, device):
        f = open_input(input_path)
        n, samples = len(f), f.recipe.num_samples
        torch.set_num_threads(num_workers)  # importing FFCV sets it to 1
        model = load_teacher(teacher, checkpoints, pretrained, device, teacher_size)
        size = f.recipe.size
        classes = int(model(torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)).shape[-1])
        if classes != f.recipe.num_classes:
            raise JobError(f'{input_path}: its labels are over {f.recipe.num_classes} classes, but '
                           f'{teacher} predicts {classes}')
        recipe = replace(f.recipe, topk=topk or f.recipe.topk)
        mean = combine == 'mean'
        teachers = grown_teachers(f.teachers, model.entries(weight), weight) if mean else model.entries()
        if len(teachers) > MAX_TEACHERS:
            raise JobError(f'{output}: would be labelled by {len(teachers)} teachers, more than the '
                           f'{MAX_TEACHERS} a file records')
        settings = Settings(teacher, tuple(checkpoints), teacher_size or 0, recipe.topk, combine,
                            weight or 1.0, densify_mode, chunk, batch_size)
        st = os.stat(input_path)
        fingerprint = {'format': FORMAT_VERSION, 'settings': asdict(settings),
                       'input': [os.path.realpath(input_path), st.st_size, st.st_mtime_ns],
                       'teachers': model.digests}
        parts = parts_dir(output, fingerprint, rank, world, restart)
        run = digest(fingerprint)
        chunks = (n + chunk - 1) // chunk
        todo = chunks_to_do(parts, chunks, rank, world)
        layout, limits, fresh = render_layout(f.recipe), magnitude_limits(f.recipe), fresh_settings(f.recipe)
        # on a full disk the file still needs about the input's size again
        save = chunk_saver(parts, run, output, todo, chunks, lambda: os.path.getsize(input_path))
        with ThreadPoolExecutor(num_workers) as pool:
            def check(i):
                """Refuse a damaged sample (checksums, then the rules of its records), naming it."""
                block, top = f.image_block(i), f.block(f.target_meta[i]['data_ptr'])
                if (block_crc(f.image_meta[i], block) != f.image_meta[i]['crc32']
                        or block_crc(f.target_meta[i], top) != f.target_meta[i]['crc32']):
                    what = 'fails its CRC32'
                else:
                    problem, j = first_problem(block[:layout.params_size], top, layout, limits,
                                               f.recipe.topk, f.recipe.num_classes, i, f.orig_sizes,
                                               samples)
                    what = problem and f'reinforcement {j}: {describe(problem, f.recipe)}'
                if what:
                    raise JobError(f'{input_path}: sample {i} {what}: the file is damaged '
                                   '(`ffcv-dr verify` lists every damaged sample)')

            def draw(ij, out):
                i, j = divmod(ij, samples)
                block = f.image_block(i)
                pair = pair_index(block, j, layout)
                pair = i if pair < 0 else pair
                render(block, f.image_meta[i], f.image_block(pair), f.image_meta[pair], j,
                       np.uint64(0), 0, i, np.empty(temp_size(f.recipe, out.shape), np.uint8), out,
                       layout, fresh)

            def rows(get, start, stop):
                return rows_of([get(i) for i in images_of(start, stop, samples)], start, stop, samples)

            def prepare(start, stop):
                """Reinforcements start..stop-1: their stored records, and their renders."""
                list(pool.map(check, images_starting_in(start, stop, samples)))  # before any render
                renders = np.empty((stop - start, size, size, 3), np.uint8)
                list(pool.map(lambda k: draw(start + k, renders[k]), range(len(renders))))
                return rows(f.records, start, stop), renders

            def label(renders, start, stop):
                probs = model.probs(torch.from_numpy(renders), batch_size, device)
                if mean:
                    stored = np.empty(probs.shape, np.float32)
                    raw = rows(f.topk, start, stop).view(np.uint8).reshape(-1)
                    _dense(raw, f.topk_dtype.itemsize, f.recipe.topk, stored, densify_mode == 'zeros')
                    probs = weight * probs + (1 - weight) * torch.from_numpy(stored)
                return topk_records(probs, recipe)

            timing = run_chunks(todo, chunk, n, samples, batch_size, prepare, label, save, device, rank,
                                world, 'relabelling')
        result = {'output': output, 'images': n, 'recipe': recipe, 'teachers': teachers,
                  'replaced': f.teachers, **timing}
        if rank == 0:
            result.update(assemble(output, parts, BetonImages(f), ChunkSource(parts, recipe, chunk, run),
                                   num_workers, teachers))
        barrier(world)
        return result
