"""``ffcv-dr reinforce``: make a reinforced ``.beton`` with a teacher.

For every image it draws N augmentations from the counter-based schedule
(a pure function of seed, reinforcement and image index), renders them with
:func:`ffcv_dr.fields.reinforced_image.render` -- the loader's own kernel, so
the teacher sees exactly the pixels the student will -- and keeps the
teacher's top-k probabilities.

Work is split in chunks of consecutive images. Under torchrun each rank takes
every ``world``-th chunk; a finished chunk is one ``.npz`` in
``OUTPUT.parts/``, written under a temporary name and renamed, so a killed run
started again with the same command redoes no finished chunk. Rank 0 then
assembles the ``.beton`` (written aside and renamed when complete) and
removes the parts. Chunks and batches do not depend on the world size, so
one process and many give the same file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .convert import (ConvertError, list_images, output_dir, probe_images, read_jpeg,
                      write_beton)
from .fields.reinforced_image import fresh_settings, render, render_layout, temp_size
from .format import FLIP, HAS_ERASE, HAS_RA, IMAGE_METADATA, Recipe, reinforcement_dtype, topk_dtype
from .geometry import fresh_flip, random_erasing, random_resized_crop
from .randaugment import draw_ops
from .schedule import STREAM_FRESH_ERASE, STREAM_FRESH_RA
from .teachers import load_teacher

RECIPES = ('rrc', 'rrc+ra+re')


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output; a resumed run must match it."""
    teacher: str
    checkpoints: tuple
    recipe: str
    samples: int
    topk: int
    size: int
    scale: tuple
    ratio: tuple
    ra_ops: int
    ra_magnitude: int
    erase_p: float
    seed: int
    chunk: int
    batch_size: int
    max_resolution: int


def sample_records(recipe: Recipe, fresh, index: int, orig_w: int, orig_h: int, seed: int):
    """N reinforcement records for image ``index``: reinforcement j draws from
    the schedule at (seed, j, index), with the fresh-sample kernels."""
    records = np.zeros(recipe.num_samples, reinforcement_dtype(recipe))
    ops = np.empty(recipe.ra_ops, np.uint8)
    mags = np.empty(recipe.ra_ops, np.float32)
    for j, rec in enumerate(records):
        rec['crop'] = random_resized_crop(orig_h, orig_w, fresh.scale_lo, fresh.scale_hi,
                                          fresh.ratio_lo, fresh.ratio_hi, seed, j, index)
        flags = FLIP if fresh_flip(seed, j, index) else 0
        if recipe.ra_ops:
            draw_ops(fresh.ra_mags, fresh.ra_signed, seed, j, index, STREAM_FRESH_RA, ops, mags)
            rec['ra_op'], rec['ra_mag'] = ops, mags
            flags |= HAS_RA
        if recipe.erase:
            box = random_erasing(recipe.size, recipe.size, fresh.erase_p, seed, j, index,
                                 STREAM_FRESH_ERASE)
            if box[2]:
                rec['erase'] = box
                flags |= HAS_ERASE
        rec['flags'] = flags
    return records


class _Image:
    """One image's stored bytes and sampled records, rendered as the loader would."""

    def __init__(self, index, jpeg, orig, stored, records):
        self.index, self.records = index, records
        self.meta = np.zeros(1, IMAGE_METADATA)[0]
        self.meta['orig_width'], self.meta['orig_height'] = orig
        self.meta['width'], self.meta['height'] = stored
        self.block = np.concatenate([records.view(np.uint8).reshape(-1), jpeg])
        self.pixels = stored[0] * stored[1]

    def render(self, j, recipe, layout, fresh, seed, out):
        temp = np.empty(temp_size(recipe, self.pixels, out.shape), np.uint8)
        render(self.block, self.meta, self.block, self.meta, j, seed, 0, self.index, temp, out,
               layout, fresh)


def _world(device: str):
    """(rank, world size): torchrun's when launched by it, else (0, 1)."""
    if dist.is_available() and int(os.environ.get('WORLD_SIZE', '1')) > 1:
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _parts_dir(output: str, settings: Settings, rank: int, world: int) -> str:
    parts = output + '.parts'
    want = json.dumps(asdict(settings), sort_keys=True)
    path = os.path.join(parts, 'settings.json')
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                if f.read() != want:
                    raise ConvertError(f'{parts}: holds a run with other settings; remove it or '
                                       'use the same command')
        else:
            with open(path + '.tmp', 'w') as f:
                f.write(want)
            os.replace(path + '.tmp', path)
    if world > 1:
        dist.barrier()
    return parts


def _save_chunk(path, records, topk):
    tmp = path + '.tmp.npz'
    np.savez(tmp, records=records.view(np.uint8), topk=topk.view(np.uint8))
    os.replace(tmp, path)


class ChunkSource:
    """The finished chunks, as ``write_beton`` reads them (image by image)."""

    def __init__(self, parts, recipe: Recipe, chunk: int):
        self.parts, self.recipe, self.chunk = parts, recipe, chunk
        self._loaded = (None, None, None)

    def get(self, index):
        c = index // self.chunk
        if self._loaded[0] != c:
            with np.load(os.path.join(self.parts, f'chunk_{c:06d}.npz')) as z:
                self._loaded = (c, z['records'].view(reinforcement_dtype(self.recipe)),
                                z['topk'].view(topk_dtype(self.recipe)))
        k = index - c * self.chunk
        n = self.recipe.num_samples
        return self._loaded[1][k * n:(k + 1) * n], self._loaded[2][k * n:(k + 1) * n]


def reinforce(images_dir: str, output: str, teacher: str = 'bundled:efficientnet_lite0',
              samples: int = 8, topk: int = 10, recipe: str = 'rrc+ra+re', size: int = 224,
              scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), ra_ops: int = 2, ra_magnitude: int = 9,
              erase_p: float = 0.25, batch_size: int = 64, device: str = 'cpu', seed: int = 0,
              checkpoints=(), chunk: int = 64, num_workers: int = None,
              max_resolution: int = None, pretrained: bool = True) -> dict:
    if recipe not in RECIPES:
        raise ConvertError(f'recipe {recipe!r} is not supported (choose from {", ".join(RECIPES)})')
    num_workers = num_workers or os.cpu_count()
    settings = Settings(teacher, tuple(checkpoints), recipe, samples, topk, size, tuple(scale),
                        tuple(ratio), ra_ops if '+ra' in recipe else 0, ra_magnitude,
                        erase_p if '+re' in recipe else 0.0, seed, chunk, batch_size,
                        max_resolution or 0)
    rank, world = _world(device)
    if device == 'cuda':
        device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
    out_dir = output_dir(output)
    images = list_images(images_dir)
    n = len(images.paths)
    probes = probe_images(images, max_resolution, num_workers)
    torch.set_num_threads(num_workers)  # importing FFCV sets it to 1
    model = load_teacher(teacher, checkpoints, pretrained, device)
    num_classes = int(model(torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)).shape[-1])
    rec = Recipe(num_samples=samples, topk=topk, num_classes=num_classes,
                 ra_ops=settings.ra_ops, erase='+re' in recipe, size=size)
    fresh = fresh_settings(rec, (size, size), scale, ratio, ra_magnitude, settings.erase_p)
    layout, key = render_layout(rec), np.uint64(seed)
    parts = _parts_dir(output, settings, rank, world)
    mine = [c for c in range((n + chunk - 1) // chunk) if c % world == rank]
    todo = [c for c in mine if not os.path.exists(os.path.join(parts, f'chunk_{c:06d}.npz'))]
    if len(todo) < len(mine):
        print(f'rank {rank}: resuming, {len(mine) - len(todo)} of {len(mine)} chunks already done',
              flush=True)
    bar = tqdm(total=sum(min(chunk, n - c * chunk) for c in todo) * world, unit='img',
               desc=f'reinforcing ({world} process{"es" if world > 1 else ""})', disable=rank != 0)
    per_group = max(1, batch_size // samples)  # images rendered together: about one batch
    start = time.perf_counter()
    with ThreadPoolExecutor(num_workers) as pool:
        def load(i):
            w, h, passthrough = probes[i]
            jpeg, sw, sh = read_jpeg(images.paths[i], w, h, passthrough, max_resolution)
            return _Image(i, jpeg, (w, h), (sw, sh), sample_records(rec, fresh, i, w, h, key))

        for c in todo:
            records, tops = [], []
            for g in range(c * chunk, min((c + 1) * chunk, n), per_group):
                group = list(pool.map(load, range(g, min(g + per_group, (c + 1) * chunk, n))))
                renders = np.empty((len(group) * samples, size, size, 3), np.uint8)
                list(pool.map(lambda kj: group[kj // samples].render(
                    kj % samples, rec, layout, fresh, key, renders[kj]), range(len(renders))))
                values, ids = model.probs(torch.from_numpy(renders), batch_size, device).topk(topk, dim=-1)
                top = np.zeros(len(renders), topk_dtype(rec))
                top['prob'], top['cls'] = values.numpy().astype(np.float16), ids.numpy()
                records += [im.records for im in group]
                tops.append(top)
                bar.update(len(group) * world)
            _save_chunk(os.path.join(parts, f'chunk_{c:06d}.npz'), np.concatenate(records),
                        np.concatenate(tops))
    bar.close()
    elapsed = time.perf_counter() - start
    if world > 1:
        dist.barrier()
    result = {'output': output, 'images': n, 'recipe': rec, 'seconds': elapsed}
    if rank == 0:
        scratch = tempfile.mkdtemp(prefix='.ffcv-dr-', dir=out_dir)
        try:
            result.update(write_beton(output, images, probes, ChunkSource(parts, rec, chunk),
                                      scratch, num_workers, max_resolution))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(parts)
    if world > 1:
        dist.barrier()
    return result
