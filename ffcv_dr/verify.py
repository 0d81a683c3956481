"""``ffcv-dr verify DATA.beton``: check every record of a file.

The file is opened through FFCV's Reader (header, format version, field
descriptors, metadata, allocation table). Then, for every image:

- its data blocks lie inside the file, where the allocation table says;
- the CRC32s of the image and target metadata with their blocks match, so
  any flipped byte in a JPEG, a reinforcement record, a top-k record or the
  metadata is caught;
- every reinforcement record is in bounds: crop boxes inside the original
  image, known flag bits, RandAugment op ids, finite magnitudes, erase boxes
  inside the output and, in mixing recipes, the paired image's index,
  lambdas in [0, 1] and CutMix boxes -- the loader trusts all of these;
- top-k probabilities are finite, in [0, 1] and sum to at most 1, class ids
  and labels lie below ``num_classes`` and the two label copies agree;
- a stored JPEG decodes in full (at 1/8 scale) without libjpeg warnings, at
  its stored size; raw pixels are exactly as many as the stored size says.

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
from .format import (FLIP, HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR, HAS_RA, RA_OPS,
                     STORED_JPEG, STORED_RAW, block_crc, topk_block_size)
from .jpeg import check_jpeg

CHUNK = 256


@dataclass
class Report:
    path: str
    images: int = 0
    problems: Counter = field(default_factory=Counter)   # kind -> count
    examples: list = field(default_factory=list)         # the first messages
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, limit: int = 20):
        self.problems[kind] += 1
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
        f = BetonFile(path)
    except (ValueError, OSError) as e:
        report.add('unreadable file', str(e))
        return report
    n = len(f)
    report.images = n
    if len(f.image_meta) != n or len(f.target_meta) != n:
        report.add('counts', f'{path}: {n} samples but {len(f.image_meta)} image and '
                             f'{len(f.target_meta)} target metadata rows')
        return report
    size = os.path.getsize(path)
    ends = f._ptrs.astype(np.uint64) + f._sizes.astype(np.uint64)
    if len(ends) != 2 * n or (len(ends) and int(ends.max()) > size):
        report.add('truncated file', f'{path}: the allocation table holds {len(ends)} blocks for '
                                     f'{n} images, ending at byte {int(ends.max()) if len(ends) else 0} '
                                     f'of {size}: the file is truncated or damaged')
        return report
    labels = _label_field(f)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for problems in pool.map(lambda lo: _check_chunk(f, lo, min(lo + CHUNK, n), labels),
                                 range(0, n, CHUNK)):
            for kind, message in problems:
                report.add(kind, f'{path}: {message}')
    report.seconds = time.perf_counter() - start
    return report


def _label_field(f: BetonFile):
    names = f.reader.field_names
    return f.reader.metadata[f'f{names.index("label")}'] if 'label' in names else None


def _check_chunk(f: BetonFile, lo: int, hi: int, labels) -> list:
    problems, records, rows = [], [], []
    recipe = f.recipe
    for i in range(lo, hi):
        im, tg = f.image_meta[i], f.target_meta[i]
        try:
            block, top = f.block(im['data_ptr']), f.block(tg['data_ptr'])
        except ValueError:
            block = top = None
        if block is None or block.size < f.params_size \
                or top.size != topk_block_size(recipe):
            problems.append(('bad block pointer', f'image {i}: its data pointers do not match the '
                                                  'allocation table'))
            continue
        if block_crc(im, block) != im['crc32']:
            problems.append(('image checksum', f'image {i}: CRC32 mismatch in its image, '
                                               'reinforcement records or metadata'))
            continue
        if block_crc(tg, top) != tg['crc32']:
            problems.append(('target checksum', f'image {i}: CRC32 mismatch in its top-k records '
                                                'or label'))
            continue
        payload = block[f.params_size:]
        if im['mode'] == STORED_RAW:
            if payload.size != 3 * int(im['width']) * int(im['height']):
                problems.append(('raw', f'image {i}: {payload.size} bytes of raw pixels, metadata '
                                        f'says {im["width"]}x{im["height"]}x3'))
        elif im['mode'] != STORED_JPEG:
            problems.append(('storage mode', f'image {i}: unknown storage mode {im["mode"]}'))
        else:
            problem, w, h = check_jpeg(payload)
            if problem or (w, h) != (im['width'], im['height']):
                problems.append(('jpeg', f'image {i}: {problem or f"JPEG is {w}x{h}, metadata says "}'
                                         + ('' if problem else f'{im["width"]}x{im["height"]}')))
        if tg['label'] >= recipe.num_classes or (labels is not None and labels[i] != tg['label']):
            problems.append(('label', f'image {i}: label {tg["label"]} (label field: '
                                      f'{labels[i] if labels is not None else "-"}) is not a class '
                                      f'id below {recipe.num_classes} or the two disagree'))
        records.append(block[:f.params_size].view(f.record_dtype))
        rows.append(i)
        problems += _topk_problems(i, f.topk_records(top), recipe.num_classes)
    if records:
        problems += _record_problems(f, np.array(rows), np.stack(records))
    return problems


def _topk_problems(i, top, num_classes) -> list:
    probs = top['prob'].astype(np.float32)
    bad = ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (probs > 1).any(1) \
        | (probs.sum(1) > 1.01) | (top['cls'] >= num_classes).any(1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        return [('top-k', f'image {i} (reinforcement {j}): top-k {probs[j].tolist()} of classes '
                          f'{top["cls"][j].tolist()} are not probabilities of classes below {num_classes}')]
    return []


def _record_problems(f: BetonFile, rows, rec) -> list:
    """Bounds of the reinforcement records of images ``rows`` (rec: images x N)."""
    recipe, n = f.recipe, len(f)
    meta = f.image_meta
    orig_h = meta['orig_height'][rows].astype(np.int64)[:, None]
    orig_w = meta['orig_width'][rows].astype(np.int64)[:, None]
    checks = _view_checks(rec, '', recipe, orig_h, orig_w)
    if recipe.mixing:
        flags = rec['mix_flags']
        paired = (flags & HAS_PAIR) != 0
        pair = np.where(paired, rec['pair'], 0).astype(np.int64)
        checks['mixing flags'] = (flags & ~np.uint8(HAS_PAIR | HAS_MIXUP | HAS_CUTMIX) != 0) | (
            (flags & (HAS_MIXUP | HAS_CUTMIX) != 0) & ~paired)
        checks['paired image index'] = paired & (pair >= n)
        pair = np.minimum(pair, n - 1)
        for kind, bad in _view_checks(rec, 'pair_', recipe, meta['orig_height'][pair].astype(np.int64),
                                      meta['orig_width'][pair].astype(np.int64)).items():
            checks['paired ' + kind] = bad & paired
        lam = rec['mixup_lam']
        checks['MixUp lambda'] = ((flags & HAS_MIXUP) != 0) & ~((lam >= 0) & (lam <= 1))
        box = rec['cutmix_box'].astype(np.int64)
        clam = rec['cutmix_lam']
        checks['CutMix box'] = ((flags & HAS_CUTMIX) != 0) & (
            ~((clam >= 0) & (clam <= 1)) | (box[..., 0] > box[..., 2]) | (box[..., 1] > box[..., 3])
            | (box[..., 2] > recipe.size) | (box[..., 3] > recipe.size))
    problems = []
    for kind, bad in checks.items():
        if bad.any():
            r, j = (int(v[0]) for v in np.nonzero(bad))
            problems.append((kind, f'image {rows[r]} (reinforcement {j}): {kind} out of bounds'))
    return problems


def _view_checks(rec, prefix, recipe, orig_h, orig_w) -> dict:
    crop = rec[prefix + 'crop'].astype(np.int64)
    top, left, h, w = crop[..., 0], crop[..., 1], crop[..., 2], crop[..., 3]
    flags = rec[prefix + 'flags']
    known = FLIP | (HAS_RA if recipe.ra_ops else 0) | (HAS_ERASE if recipe.erase else 0)
    checks = {'crop box': (h < 1) | (w < 1) | (top + h > orig_h) | (left + w > orig_w),
              'flags': (flags & ~np.uint8(known)) != 0}
    if recipe.ra_ops:
        has = ((flags & HAS_RA) != 0)[..., None]
        checks['RandAugment op'] = (has & ((rec[prefix + 'ra_op'] >= len(RA_OPS))
                                           | ~np.isfinite(rec[prefix + 'ra_mag']))).any(-1)
    if recipe.erase:
        box = rec[prefix + 'erase'].astype(np.int64)
        checks['erase box'] = ((flags & HAS_ERASE) != 0) & (
            (box[..., 0] + box[..., 2] > recipe.size) | (box[..., 1] + box[..., 3] > recipe.size))
    return checks
