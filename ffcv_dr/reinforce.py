"""``ffcv-dr reinforce``: make a reinforced ``.beton`` with a teacher.

For every image it draws N augmentations from the counter-based schedule
(a pure function of seed, reinforcement and image index), renders them with
:func:`ffcv_dr.render.render` -- the loader's own kernel, so
the teacher sees exactly the pixels the student will -- and keeps the
teacher's top-k probabilities.

Work is split in resumable chunks (:mod:`ffcv_dr.chunks`); under torchrun
each rank takes every ``world``-th chunk. Rank 0 then assembles the
``.beton`` (written aside and renamed when complete) and removes the parts.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .format import (DEFAULT_CUTMIX, DEFAULT_ERASE_P, DEFAULT_MIXUP, DEFAULT_RA_MAGNITUDE, DEFAULT_RA_OPS,
                     DEFAULT_RATIO, DEFAULT_SCALE, FORMAT_VERSION, HAS_CUTMIX, HAS_MIXUP, HAS_PAIR,
                     IMAGE_METADATA, RECIPES, Recipe, parse_recipe, reinforcement_dtype, topk_dtype)
from .chunks import (ChunkSource, assemble, barrier, chunk_saver, chunks_to_do, images_of, parts_dir,
                     rows_of, run_chunks, teacher_job, topk_records)
from .intake import list_images, probe_images, readable
from .jobs import ConvertError, digest, images_digest
from .render import draw_view, fresh_settings, render, render_layout, temp_size
from .replay_clock import splitmix64
from .storage import Storage, stored_image
from .teachers import load_teacher
from .writer import FolderImages

_PAIR_VIEW = np.uint64(0x50414952)   # seed offset of the paired image's view ('PAIR')
_MIXING = 0x4D4958                   # seed-sequence word of the mixing draws ('MIX')


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output; a resumed run must match it."""
    teacher: str
    checkpoints: tuple
    teacher_size: int
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
    storage: Storage
    mixup: tuple = (0.0, 0.0, 1.0)   # (p, alpha, div_by), as ml-dr's MixUp
    cutmix: tuple = (0.0, 0.0)       # (p, alpha), as ml-dr's CutMix


def _draw_mixing(rec, settings: Settings, num_images: int, size: int, seed, j, index) -> int:
    """MixUp and CutMix as ml-dr draws them (each with its own coin; lam of
    MixUp divided by div_by; CutMix's box from its lam, clipped to the image).
    Returns the paired image, or -1 when neither applies. ml-dr pairs images
    inside a generation batch; here the partner is drawn from the whole
    dataset, so the file does not depend on batching or the number of ranks."""
    rng = np.random.default_rng([int(seed), j, index, _MIXING])
    (mix_p, mix_alpha, div_by), (cut_p, cut_alpha) = settings.mixup, settings.cutmix
    flags = 0
    if mix_alpha > 0 and rng.random() < mix_p:
        rec['mixup_lam'] = rng.beta(mix_alpha, mix_alpha) / div_by
        flags |= HAS_MIXUP
    if cut_alpha > 0 and rng.random() < cut_p:
        lam = rng.beta(cut_alpha, cut_alpha)
        cut = int(size * np.sqrt(1.0 - lam))
        cy, cx = rng.integers(size), rng.integers(size)
        rec['cutmix_lam'] = lam
        rec['cutmix_box'] = np.clip([cy - cut // 2, cx - cut // 2, cy + cut // 2, cx + cut // 2],
                                    0, size)
        flags |= HAS_CUTMIX
    if not flags:
        return -1
    rec['pair'] = rng.integers(num_images)
    rec['mix_flags'] = flags | HAS_PAIR
    return int(rec['pair'])


def sample_records(recipe: Recipe, settings: Settings, fresh, index: int, sizes, seed):
    """N reinforcement records for image ``index``: reinforcement j draws from
    the schedule at (seed, j, index), with the fresh-sample kernels; in mixing
    recipes the paired image's view draws from a seed derived from ``seed``.
    ``sizes`` holds the original (width, height) of every image."""
    records = np.zeros(recipe.num_samples, reinforcement_dtype(recipe))
    raw = records.view(np.uint8).reshape(len(records), -1)
    layout = render_layout(recipe)
    orig_w, orig_h = sizes[index]
    pair_seed = splitmix64(seed ^ _PAIR_VIEW)
    for j, rec in enumerate(records):
        draw_view(raw[j], layout.own, layout, fresh, orig_h, orig_w, seed, j, index)
        if recipe.mixing:
            pair = _draw_mixing(rec, settings, len(sizes), recipe.size, seed, j, index)
            if pair >= 0:
                pair_w, pair_h = sizes[pair]
                draw_view(raw[j], layout.paired, layout, fresh, pair_h, pair_w, pair_seed, j, index)
    return records


class _Image:
    """One image's stored bytes and sampled records, rendered as the loader would."""

    def __init__(self, index, payload, orig, stored, mode, records):
        self.index, self.records = index, records
        self.meta = np.zeros(1, IMAGE_METADATA)[0]
        self.meta['orig_width'], self.meta['orig_height'] = orig
        self.meta['width'], self.meta['height'] = stored
        self.meta['mode'] = mode
        self.block = np.concatenate([records.view(np.uint8).reshape(-1), payload])

    def render(self, j, pair: '_Image', recipe, layout, fresh, seed, out):
        """Reinforcement j into ``out``; ``pair`` is its paired image (or self)."""
        temp = np.empty(temp_size(recipe, out.shape), np.uint8)
        render(self.block, self.meta, pair.block, pair.meta, j, seed, 0, self.index, temp, out,
               layout, fresh)


def _pairs(records) -> np.ndarray:
    """The paired images of those records that mix."""
    if 'mix_flags' not in records.dtype.names:
        return np.zeros(0, np.int64)
    return records['pair'][records['mix_flags'] & HAS_PAIR != 0]


class _NoReinforcements:
    """What ``write_beton`` stores for a file of images and labels only."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.empty = np.zeros(0, reinforcement_dtype(recipe)), np.zeros(0, topk_dtype(recipe))

    def get(self, index):
        return self.empty

    def name(self, index):
        return f'image {index}'


def check_class_space(images, teacher_classes: int, images_dir: str, teacher: str):
    """Refuse labels outside the teacher's classes; warn where the folders'
    classes are not the teacher's (the soft targets are over the teacher's)."""
    if images.labels.size and images.labels.max() >= teacher_classes:
        raise ConvertError(f'{images_dir}: {len(images.classes)} class folders, but the teacher {teacher} '
                           f'predicts {teacher_classes} classes, so the labels fall outside its classes; '
                           'fine-tune a teacher on these classes first (ffcv-dr train, then --checkpoint)')
    if images.num_classes != teacher_classes:
        warnings.warn(f'{images_dir}: its {len(images.classes)} class folders are not ImageNet-1k synsets, '
                      f'and the teacher {teacher} predicts {teacher_classes} classes: the soft targets are '
                      f"over the teacher's classes, which the folders' labels (0..{images.num_classes - 1}) "
                      'do not name; fine-tune a teacher on these classes (ffcv-dr train, then --checkpoint) '
                      'unless that is what you want', stacklevel=2)


def reinforce(images_dir: str, output: str, teacher: str = 'bundled:efficientnet_lite0',
              samples: int = 8, topk: int = 10, recipe: str = 'rrc+ra+re', size: int = 224,
              scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO, ra_ops: int = DEFAULT_RA_OPS,
              ra_magnitude: int = DEFAULT_RA_MAGNITUDE, erase_p: float = DEFAULT_ERASE_P,
              batch_size: int = 64, device: str = 'cpu', seed: int = 0,
              checkpoints=(), chunk: int = 64, num_workers: int = None,
              storage: Storage = Storage(), pretrained: bool = True,
              mixup=DEFAULT_MIXUP, cutmix=DEFAULT_CUTMIX, skip_bad: bool = False,
              teacher_size: int = None, restart: bool = False) -> dict:
    """Reinforce the ImageFolder ``images_dir`` into ``output`` (see the module
    docstring). ``mixup`` is (p, alpha, div_by) and ``cutmix`` (p, alpha), used
    by the ``+mix`` recipes; the defaults are ImageNet+'s. With ``skip_bad``,
    unreadable images are left out and listed in ``skipped``. ``teacher_size``:
    the side teachers see (default: their pretrained config's). ``samples=0``
    writes the images, labels and recipe only, without a teacher: a file for
    training on fresh augmentations (``train.mode=erm``), e.g. a teacher.
    ``storage``: how images are stored (the teacher sees them as stored).
    Finished chunks are reused only by a run with the same fingerprint (the
    image list, the teachers' weights, every setting); ``restart`` throws
    away those of another run instead of refusing."""
    if recipe not in RECIPES:
        raise ConvertError(f'recipe {recipe!r} is not supported (choose from {", ".join(RECIPES)})')
    drawn = parse_recipe(recipe)
    num_workers = num_workers or os.cpu_count()
    settings = Settings(teacher, tuple(checkpoints), teacher_size or 0, recipe, samples, topk, size, tuple(scale),
                        tuple(ratio), ra_ops if drawn.ra else 0, ra_magnitude,
                        erase_p if drawn.erase else 0.0, seed, chunk, batch_size,
                        storage, *((tuple(mixup), tuple(cutmix)) if drawn.mixing else ()))
    with teacher_job(output, [images_dir, *checkpoints], device) as (rank, world, device):
        images = list_images(images_dir)
        images, probes, skipped = readable(images, probe_images(images, storage.max_resolution,
                                                                num_workers, skip_bad))
        n = len(images.paths)
        images = replace(images, indices=np.arange(n))  # chunks are indexed by position in the file
        torch.set_num_threads(num_workers)  # importing FFCV sets it to 1
        num_classes = images.num_classes  # without reinforcements: the labels' space
        if samples:
            model = load_teacher(teacher, checkpoints, pretrained, device, teacher_size)
            probe = torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)
            num_classes = int(model(probe).shape[-1])
            check_class_space(images, num_classes, images_dir, teacher)
        rec = Recipe(num_samples=samples, topk=topk, num_classes=num_classes,
                     ra_ops=settings.ra_ops, erase=drawn.erase, mixing=drawn.mixing, size=size,
                     scale=scale, ratio=ratio, ra_magnitude=ra_magnitude, erase_p=settings.erase_p)
        fresh = fresh_settings(rec)
        layout, key = render_layout(rec), np.uint64(seed)
        fingerprint = {'format': FORMAT_VERSION, 'settings': asdict(settings), 'image_count': n,
                       'images': images_digest(images_dir, images.paths, images.labels),
                       'teachers': model.digests if samples else []}
        parts = parts_dir(output, fingerprint, rank, world, restart)
        run = digest(fingerprint)
        chunks = (n + chunk - 1) // chunk if samples else 0  # without reinforcements, nothing to generate
        todo = chunks_to_do(parts, chunks, rank, world)
        sizes = [probe[:2] for probe in probes]
        save = chunk_saver(parts, run, output, todo, chunks,
                           lambda: sum(os.path.getsize(p) for p in images.paths))
        with ThreadPoolExecutor(num_workers) as pool:
            def load(i, sampled=True):
                w, h, passthrough = probes[i]
                payload, sw, sh, mode = stored_image(images.paths[i], i, w, h, passthrough, storage)
                records = (sample_records(rec, settings, fresh, i, sizes, key) if sampled
                           else np.zeros(samples, reinforcement_dtype(rec)))  # only its pixels are used
                return _Image(i, payload, (w, h), (sw, sh), mode, records)

            last = {}  # the previous group's images: an image's reinforcements may span groups

            def prepare(start, stop):
                """Reinforcements start..stop-1: their sampled records, and their renders."""
                nonlocal last
                first = start // samples
                group = list(pool.map(lambda i: last[i] if i in last else load(i),
                                      images_of(start, stop, samples)))
                last = {im.index: im for im in group}
                records = rows_of([im.records for im in group], start, stop, samples)
                pairs = dict(last)
                partners = sorted({int(p) for p in _pairs(records)} - pairs.keys())
                pairs.update(zip(partners, pool.map(lambda i: load(i, sampled=False), partners)))
                renders = np.empty((stop - start, size, size, 3), np.uint8)

                def draw(k):
                    pair = _pairs(records[k:k + 1])
                    im = group[(start + k) // samples - first]
                    im.render((start + k) % samples, pairs[int(pair[0])] if len(pair) else im, rec,
                              layout, fresh, key, renders[k])
                list(pool.map(draw, range(len(renders))))
                return records, renders

            def label(renders, start, stop):
                return topk_records(model.probs(torch.from_numpy(renders), batch_size, device), rec)

            timing = run_chunks(todo, chunk, n, samples, batch_size, prepare, label, save, device, rank,
                                world, 'reinforcing')
        result = {'output': output, 'images': n, 'recipe': rec, 'skipped': skipped, **timing}
        if rank == 0:
            source = ChunkSource(parts, rec, chunk, run) if samples else _NoReinforcements(rec)
            result.update(assemble(output, parts, FolderImages(images, probes, storage), source,
                                   num_workers, model.entries() if samples else None))
        barrier(world)
        return result

