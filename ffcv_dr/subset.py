"""``ffcv-dr subset``: a smaller file cut from an ffcv-dr ``.beton``, as the
paper's ImageNet+-Small is cut from ImageNet+ (100 of the 400 reinforcements
per image and the top-5 of the top-10).

Reinforcement k of the output is reinforcement k of the input (k < N), with
the K most probable classes of its stored top-k; images and augmentation
records are copied byte for byte, nothing is decoded or rendered, so the
output replays the same pixels. Optionally only some images are kept (in the
input's order); for a mixing recipe every kept reinforcement's partner must
be kept too. The output records its teachers (the input's) and what it was
cut from (:class:`ffcv_dr.format.CutFrom`, shown by ``ffcv-dr info``). It is
written under a temporary name beside the output and renamed when complete,
as ``convert`` writes.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

import numpy as np

from .beton import BetonFile, metadata_crc
from .format import HAS_PAIR, CutFrom, block_crc, topk_dtype
from .jobs import JobError, OutputLock, check_output, scratch_dir
from .writer import BetonImages, output_dir, write_beton


def read_indices(path: str, num_images: int) -> np.ndarray:
    """The sorted image indices listed in ``path`` (integers separated by
    whitespace or commas), each within the file and listed once."""
    try:
        with open(path) as f:
            words = f.read().replace(',', ' ').split()
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f'{path}: cannot read the image indices ({type(e).__name__}: {e})') from None
    try:
        indices = np.array([int(w) for w in words], np.int64)
    except ValueError as e:
        raise JobError(f'{path}: image indices must be integers ({e})') from None
    if not len(indices):
        raise JobError(f'{path}: lists no images')
    bad = indices[(indices < 0) | (indices >= num_images)]
    if len(bad):
        raise JobError(f'{path}: image index {bad[0]} is outside the input\'s 0..{num_images - 1}')
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise JobError(f'{path}: image index {unique[counts > 1][0]} is listed {counts.max()} times')
    return unique


class _Cut:
    """What ``write_beton`` reads for each kept image: reinforcements 0..N-1
    and the K most probable classes of each one's top-k."""

    def __init__(self, f: BetonFile, recipe):
        self.f, self.recipe = f, recipe
        self.dtype = topk_dtype(recipe)

    def name(self, i) -> str:
        return f'{self.f.path} (sample {i})'

    def get(self, i):
        f, n, k = self.f, self.recipe.num_samples, self.recipe.topk
        image, target = f.image_block(i), f.block(f.target_meta[i]['data_ptr'])
        if (block_crc(f.image_meta[i], image) != f.image_meta[i]['crc32']
                or block_crc(f.target_meta[i], target) != f.target_meta[i]['crc32']):
            raise JobError(f'{f.path}: sample {i} fails its CRC32: the file is damaged '
                           '(`ffcv-dr verify` lists every damaged sample)')
        stored = f.topk_records(target)[:n]
        # the K largest, highest first (a stable sort keeps ties in their stored order)
        best = np.argsort(-stored['prob'].astype(np.float32), axis=1, kind='stable')[:, :k]
        top = np.empty(n, self.dtype)
        top['cls'] = np.take_along_axis(stored['cls'], best, axis=1)
        top['prob'] = np.take_along_axis(stored['prob'], best, axis=1)
        return f.records(i)[:n], top


def subset(input_path: str, output: str, samples: int, topk: int, images: str = None,
           num_workers: int = None) -> dict:
    """Write ``output``: ``input_path`` cut to ``samples`` reinforcements per
    image and the top-``topk`` (and to the images listed in the file
    ``images``, if given). Refuses a damaged input, counts beyond the
    input's, and an output that is the input."""
    num_workers = num_workers or os.cpu_count()
    output_dir(output)
    check_output(output, [input_path])
    try:
        f = BetonFile(input_path)   # a damaged file is refused, naming the first problem
    except ValueError as e:
        raise JobError(f'cannot cut: {e}') from None
    r = f.recipe
    if not 1 <= samples <= r.num_samples:
        raise JobError(f'--samples {samples}: {input_path} holds {r.num_samples} reinforcements per '
                       f'image; keep 1 to {r.num_samples}')
    if not 1 <= topk <= r.topk:
        raise JobError(f'--topk {topk}: {input_path} stores the top-{r.topk}; keep 1 to {r.topk}')
    kept = np.arange(len(f)) if images is None else read_indices(images, len(f))
    if r.mixing:
        _check_partners(f, kept, samples)
    recipe = replace(r, num_samples=samples, topk=topk)
    cut = CutFrom(os.path.basename(input_path), r.num_samples, r.topk, len(f),
                  metadata_crc(f.reader.metadata))
    with OutputLock(output):
        scratch = scratch_dir(output)
        try:
            result = write_beton(output, BetonImages(f, kept), _Cut(f, recipe), scratch, num_workers,
                                 f.teachers, cut)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {**result, 'cut_from': cut}


def _check_partners(f: BetonFile, kept: np.ndarray, samples: int):
    """Refuse a choice of images that leaves out the MixUp/CutMix partner of
    a kept reinforcement, naming both."""
    inside = np.zeros(len(f), bool)
    inside[kept] = True
    for i in kept:
        records = f.records(int(i))[:samples]
        paired = (records['mix_flags'] & HAS_PAIR) != 0
        missing = records['pair'][paired][~inside[records['pair'][paired]]]
        if len(missing):
            raise JobError(f'{f.path}: sample {i} is mixed with sample {missing[0]}, which the image '
                           'list leaves out; keep both')
