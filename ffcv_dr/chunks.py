"""Resumable teacher jobs (``reinforce``, ``relabel``): work split in chunks
of consecutive images, shared out over a torchrun group, each finished chunk
kept as one ``.npz`` in ``OUTPUT.parts/`` so that a killed run started again
with the same command redoes none of them.

A chunk is written under a temporary name and renamed; ``OUTPUT.parts`` holds
the fingerprint of the run its chunks belong to, so a run with other inputs
or settings is refused instead of mixing them. Chunks and batches do not
depend on the world size, so one process and many give the same file.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from .format import Recipe, reinforcement_dtype, topk_dtype
from .jobs import JobError, OutputLock, changed, check_output, disk_full, is_disk_full, scratch_dir
from .writer import output_dir, write_beton


def assemble(output, parts, images, source, num_workers, teachers) -> dict:
    """Rank 0's last step: the ``.beton`` from the finished chunks (``source``)
    and ``images``, written aside and renamed once complete; then the parts go."""
    scratch = scratch_dir(output)
    try:
        result = write_beton(output, images, source, scratch, num_workers, teachers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(parts)
    return result


def rank_and_world(device: str):
    """(rank, world size): torchrun's when launched by it, else (0, 1)."""
    if dist.is_available() and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: str) -> str:
    """``cuda`` means this rank's GPU under torchrun."""
    return f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}' if device == 'cuda' else device


def barrier(world_size: int):
    if world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def group_lock(output, rank, world_size):
    """Rank 0 holds the output's lock for the whole torchrun group; when it
    cannot, every rank stops with its message."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = OutputLock(output).__enter__()
        except JobError as e:
            error = str(e)
    if world_size > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise JobError(error)
    try:
        yield
    finally:
        if lock:
            lock.__exit__(None, None, None)


@contextlib.contextmanager
def teacher_job(output: str, inputs, device: str):
    """The frame of a teacher job writing ``output`` from ``inputs``: checked
    paths, then the output's lock held for the torchrun group. Yields (rank,
    world size, this rank's device). A job that fails before finishing a
    chunk (a bad image, say) leaves no parts folder behind."""
    rank, world_size = rank_and_world(device)
    output_dir(output)
    check_output(output, inputs)
    with group_lock(output, rank, world_size):
        try:
            yield rank, world_size, local_device(device)
        except BaseException:
            parts = output + '.parts'
            if rank == 0 and not glob.glob(os.path.join(glob.escape(parts), 'chunk_*.npz')):
                shutil.rmtree(parts, ignore_errors=True)
            raise


def parts_dir(output: str, fingerprint: dict, rank: int, world_size: int, restart: bool) -> str:
    """``OUTPUT.parts``, holding the fingerprint of the run its chunks belong to;
    a run with another fingerprint is refused while any chunk is finished
    (``restart``: the parts are thrown away), saying what changed; without
    one there is nothing to lose, and the new run takes the folder."""
    parts = output + '.parts'
    path = os.path.join(parts, 'fingerprint.json')
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back: lists for tuples
    if rank == 0:
        if restart and os.path.isdir(parts):
            shutil.rmtree(parts)
        os.makedirs(parts, exist_ok=True)
        stored = None
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            if stored != fingerprint and glob.glob(os.path.join(glob.escape(parts), 'chunk_*.npz')):
                what = ', '.join(changed(stored, fingerprint))
                raise JobError(f'{parts}: holds chunks of another run ({what} changed); run the same '
                               'command on the same inputs, or pass --restart to start over')
        if stored != fingerprint:
            with open(path + '.tmp', 'w') as f:
                json.dump(fingerprint, f, sort_keys=True)
            os.replace(path + '.tmp', path)
    barrier(world_size)
    return parts


def chunk_path(parts: str, c: int) -> str:
    return os.path.join(parts, f'chunk_{c:06d}.npz')


def chunks_to_do(parts: str, count: int, rank: int, world_size: int) -> list:
    """This rank's share of ``count`` chunks (every ``world_size``-th) not yet
    finished; says how many are, when resuming."""
    mine = [c for c in range(count) if c % world_size == rank]
    todo = [c for c in mine if not os.path.exists(chunk_path(parts, c))]
    if len(todo) < len(mine):
        print(f'rank {rank}: resuming, {len(mine) - len(todo)} of {len(mine)} chunks already done',
              flush=True)
    return todo


def topk_records(probs, recipe: Recipe) -> np.ndarray:
    """The recipe's top-k records of a (reinforcements, classes) tensor of probabilities."""
    values, ids = probs.topk(recipe.topk, dim=-1)
    top = np.zeros(len(probs), topk_dtype(recipe))
    top['prob'], top['cls'] = values.numpy().astype(np.float16), ids.numpy()
    return top


def chunk_saver(parts, run, output, todo, count, input_bytes):
    """``save(c, records, topk)`` for :func:`run_chunks`: chunk c of this run,
    written by :func:`save_chunk`; on a full disk the estimate of what is still
    needed counts the chunks left to write, then the file (all ``count``
    chunks again and ``input_bytes()`` of images)."""
    def save(c, records, topk):
        save_chunk(chunk_path(parts, c), records, topk, run, output, lambda: (
            (records.nbytes + topk.nbytes) * (len(todo) - todo.index(c) + count) + input_bytes()))
    return save


def save_chunk(path, records, topk, run, output, still_needed):
    """Write a finished chunk whole or not at all; a full disk is a JobError
    naming ``output`` and ``still_needed()`` (bytes, this chunk included)."""
    tmp = path + '.tmp.npz'
    try:
        np.savez(tmp, records=records.view(np.uint8), topk=topk.view(np.uint8), run=np.array(run))
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if is_disk_full(e):
            raise JobError(disk_full(output, os.path.dirname(path), still_needed())) from None
        raise
    os.replace(tmp, path)


class ChunkSource:
    """The finished chunks, as ``write_beton`` reads them (image by image)."""

    def __init__(self, parts, recipe: Recipe, chunk: int, run: str):
        self.parts, self.recipe, self.chunk, self.run = parts, recipe, chunk, run
        self._loaded = (None, None, None)

    def get(self, index):
        c = index // self.chunk
        if self._loaded[0] != c:
            with np.load(self.name(index)) as z:
                if str(z['run']) != self.run:
                    raise JobError(f'{self.name(index)}: a chunk of another run')
                self._loaded = (c, z['records'].view(reinforcement_dtype(self.recipe)),
                                z['topk'].view(topk_dtype(self.recipe)))
        k = index - c * self.chunk
        n = self.recipe.num_samples
        return self._loaded[1][k * n:(k + 1) * n], self._loaded[2][k * n:(k + 1) * n]

    def name(self, index):
        return chunk_path(self.parts, index // self.chunk)


def run_chunks(todo, chunk: int, n: int, samples: int, batch_size: int, prepare, label, save,
               device: str, rank: int, world_size: int, doing: str) -> dict:
    """Label the reinforcements of chunks ``todo`` (of ``chunk`` images, ``n``
    in all; image i's reinforcement j is number ``i * samples + j``) in groups
    of one teacher batch, so that a batch is padded only at a chunk's end
    whatever the number of reinforcements per image: ``prepare(start, stop)``
    gives a group's (records, renders), ``label(renders, start, stop)`` their
    top-k records, and ``save(c, records, topk)`` gets each chunk once
    complete. On a GPU the next group is prepared while the teacher runs; on
    the CPU the teacher needs every core, so they take turns. Rank 0 shows the
    group's progress; returns the seconds taken and the group's images per
    second (None when earlier runs did every chunk), once every rank is done."""
    if len(todo) > 1 and chunk * samples < batch_size:
        warnings.warn(f'a chunk of {chunk} images makes {chunk * samples} reinforcements, less than one '
                      f'teacher batch of {batch_size}: every batch is padded and '
                      f'{1 - chunk * samples / batch_size:.0%} of the teacher\'s work is thrown away; '
                      f'use --chunk {-(-batch_size // samples)} or more', stacklevel=3)
    spans = [(c, r, min(r + batch_size, min((c + 1) * chunk, n) * samples)) for c in todo
             for r in range(c * chunk * samples, min((c + 1) * chunk, n) * samples, batch_size)]
    bar = tqdm(total=sum(stop - start for _, start, stop in spans) * world_size, unit='view',
               desc=f'{doing} ({world_size} process{"es" if world_size > 1 else ""})', disable=rank != 0)
    began = time.perf_counter()
    records, tops = [], []
    with ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(prepare, *spans[0][1:]) if spans else None
        for s, (c, start, stop) in enumerate(spans):
            group_records, renders = pending.result()
            if s + 1 < len(spans):
                pending = ahead.submit(prepare, *spans[s + 1][1:])
                if device == 'cpu':
                    pending.result()
            tops.append(label(renders, start, stop))
            records.append(group_records)
            bar.update((stop - start) * world_size)
            if s + 1 == len(spans) or spans[s + 1][0] != c:
                save(c, np.concatenate(records), np.concatenate(tops))
                records, tops = [], []
    bar.close()
    seconds = time.perf_counter() - began
    barrier(world_size)
    return {'seconds': seconds, 'rate': bar.total / samples / seconds if bar.total else None}


def images_of(start: int, stop: int, samples: int) -> range:
    """The images whose reinforcements include numbers start..stop-1."""
    return range(start // samples, -(-stop // samples))


def images_starting_in(start: int, stop: int, samples: int) -> range:
    """The images whose first reinforcement is one of numbers start..stop-1:
    each image of a chunk is in exactly one such group, its first."""
    return range(-(-start // samples), -(-stop // samples))


def rows_of(per_image, start: int, stop: int, samples: int) -> np.ndarray:
    """Reinforcements start..stop-1 of the per-image arrays (``samples`` rows
    each) of the images :func:`images_of` names, in order."""
    first = start // samples * samples
    return np.concatenate(per_image)[start - first:stop - first]
