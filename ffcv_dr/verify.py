"""``ffcv-dr verify DATA.beton``: check every record of a file.

The file is opened through FFCV's Reader (header, format version, field
descriptors, metadata, allocation table) and its structure checked by
:mod:`ffcv_dr.rules` (the recipes of both fields agree; every data pointer
starts a block of the right size inside the file; image sizes, storage modes
and labels are valid), which also refuses a bad file wherever one is opened.
Then, for every image whose structure is sound:

- the CRC32s of the image and target metadata with their blocks match, so
  any flipped byte in a JPEG, a reinforcement record, a top-k record or the
  metadata is caught;
- every reinforcement record and top-k passes :func:`ffcv_dr.rules.sample_problem`,
  the rule the loader applies before replaying one: crop boxes inside the
  original image, known flag bits, RandAugment op ids and magnitudes that
  RandAugment can draw, erase boxes inside the output and, in mixing recipes,
  the paired image's index, lambdas in [0, 1] and CutMix boxes; top-k
  probabilities in [0, 1] summing to at most 1, distinct class ids below
  ``num_classes``;
- a stored JPEG decodes in full (at 1/8 scale) without libjpeg warnings, at
  its stored size.

Images are checked in chunks on threads: zlib and libjpeg (through ctypes)
release the GIL.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .beton import BetonFile
from .render import render_layout
from .format import STORED_JPEG, block_crc
from .jpeg import check_jpeg
from .rules import PROBLEMS, file_problems, image_problems, magnitude_limits

CHUNK = 256


@dataclass
class Report:
    path: str
    images: int = 0
    problems: Counter = field(default_factory=Counter)   # kind -> count
    examples: list = field(default_factory=list)         # the first messages
    samples: set = field(default_factory=set)            # the samples found wrong
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, sample: int = None, limit: int = 20):
        self.problems[kind] += 1
        if sample is not None:
            self.samples.add(sample)
        if len(self.examples) < limit:
            self.examples.append(message)

    def summary(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        head = f'{self.path}: {self.images} images checked in {self.seconds:.1f} s ({rate:.0f} images/s)'
        if self.ok:
            return head + ', no problems'
        n = sum(self.problems.values())
        lines = [head + f', {n} problem{"s" if n != 1 else ""}:']
        lines += [f'  {n} x {kind}' for kind, n in self.problems.most_common()]
        lines += ['first ones:'] + [f'  {m}' for m in self.examples]
        return '\n'.join(lines)


def verify(path: str, workers: int = None) -> Report:
    start = time.perf_counter()
    report = Report(path)
    try:
        f = BetonFile(path, check=False)
    except (ValueError, OSError) as e:
        report.add('unreadable file', str(e))
        return report
    n = len(f)
    report.images = n
    problems, unsound = file_problems(f)
    for kind, message in problems:
        report.add(kind, f'{path}: {message}')
    if unsound.all():
        return report
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for problems in pool.map(lambda lo: _check_chunk(f, lo, min(lo + CHUNK, n), unsound),
                                 range(0, n, CHUNK)):
            for kind, message, sample in problems:
                report.add(kind, f'{path}: {message}', sample)
    report.seconds = time.perf_counter() - start
    return report


def _check_chunk(f: BetonFile, lo: int, hi: int, unsound) -> list:
    """The per-image checks, on the images whose structure :mod:`rules` passed."""
    problems = []
    r = f.recipe
    layout, limits = render_layout(r), magnitude_limits(r)
    found = np.zeros(r.num_samples, np.int64)
    for i in range(lo, hi):
        if unsound[i]:
            continue
        im, tg = f.image_meta[i], f.target_meta[i]
        block, top = f.block(im['data_ptr']), f.block(tg['data_ptr'])
        if block_crc(im, block) != im['crc32']:
            problems.append(('image checksum', f'image {i}: CRC32 mismatch in its image, '
                                               'reinforcement records or metadata', i))
            continue
        if block_crc(tg, top) != tg['crc32']:
            problems.append(('target checksum', f'image {i}: CRC32 mismatch in its top-k records '
                                                'or label', i))
            continue
        if im['mode'] == STORED_JPEG:  # raw pixels: rules checked their size
            problem, w, h = check_jpeg(block[f.params_size:])
            if problem or (w, h) != (im['width'], im['height']):
                problems.append(('jpeg', f'image {i}: {problem or f"JPEG is {w}x{h}, metadata says "}'
                                         + ('' if problem else f'{im["width"]}x{im["height"]}'), i))
        image_problems(block, top, layout, limits, r.topk, r.num_classes, i, f.orig_sizes, found)
        for code in np.unique(found[found > 0]):
            j = int(np.flatnonzero(found == code)[0])
            problems.append((PROBLEMS[code], f'image {i} (reinforcement {j}): {PROBLEMS[code]} '
                                             'out of bounds', i))
    return problems
