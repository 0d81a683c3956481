"""Epochs that really come from disk: images/s, bytes read and memory, side by side.

Before every epoch the file is dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``), so each epoch reads what it needs
from the disk, as it does when the file is bigger than memory; the bytes
come from ``/proc/self/io`` (``read_bytes``: what this process made the
block layer fetch, readahead included), the peak RSS from ``VmHWM``, reset
before each epoch. Loaders, all ``os_cache=False`` (FFCV's process cache):

  B_imagenet  FFCV's RandomResizedCrop + flip + labels on ImageNet as
              ffcv-imagenet writes it (FFCV's writer, 500 / 0.5 / 90), with
              FFCV's QUASI_RANDOM order: the baseline users run from disk;
  C_orig      ffcv-dr's full recipe + soft targets, original JPEG bytes;
  C_matched   the same, stored as B_imagenet;
  C_mix       the MixUp/CutMix recipe (ml-dr's mixing fixture), partners
              spread over the whole file;
  ... and B_imagenet, C_orig, C_matched in RANDOM order, for contrast, and
  B_imagenet and C_matched in memory (``os_cache=True``, the file read into
  the page cache first), for the in-memory ratio in the same run.

The files hold the source images ``--copies`` times over (duplicated entries,
so a file can be made as large as wanted): ``--copies 16`` of the 500
ImageNet photos with ImageNet+-size records (400 reinforcements) is about
1.1 GB as C_orig, 2.5 GB as C_matched. Rounds are interleaved; round 0 compiles and is left out.
Then C_orig's memory alone, in new processes: RSS after each of three epochs,
on this file and on one ``--rss-scale`` times larger.

    .venv/bin/python benchmarks/disk_epochs.py --out out/disk [--copies 8 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader as FFCVLoader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, ToTensor
from ffcv.writer import DatasetWriter

from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile
from ffcv_dr.bench import FFCV_IMAGENET
from ffcv_dr.convert import convert
from ffcv_dr.format import HAS_PAIR
from ffcv_dr.jobs import scratch_dir
from ffcv_dr.relabel import BetonImages
from ffcv_dr.storage import Storage
from ffcv_dr.writer import WRITER_CHUNK, write_beton

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared')
ORDERS = {'QUASI_RANDOM': OrderOption.QUASI_RANDOM, 'RANDOM': OrderOption.RANDOM}


class _TiledImages(BetonImages):
    """``count`` images: a file's, over and over (sample i is its i % n)."""

    def __init__(self, f: BetonFile, count: int):
        super().__init__(f)
        self.n = len(f)
        self.indices = np.arange(count)
        self.labels = self.labels[self.indices % self.n]
        self.orig_sizes = self.orig_sizes[self.indices % self.n]

    def stored(self, i) -> tuple:
        return super().stored(i % self.n)

    def payload_bytes(self) -> int:
        return -(-self.f.image_bytes() * len(self.indices) // self.n)


class _TiledSource:
    """A file's records and top-k for the tiled images. A mixing partner
    becomes the same image in a random copy, so partners lie all over the file."""

    def __init__(self, f: BetonFile, count: int):
        self.f, self.recipe, self.count = f, f.recipe, count

    def name(self, i) -> str:
        return f'{self.f.path} (sample {i % len(self.f)})'

    def get(self, i):
        records = self.f.records(i % len(self.f)).copy()
        if self.recipe.mixing:
            n = len(self.f)
            paired = (records['mix_flags'] & HAS_PAIR) != 0
            copy = np.random.default_rng(i).integers(self.count // n, size=len(records))
            records['pair'][paired] += (n * copy[paired]).astype(records['pair'].dtype)
        return records, self.f.topk(i % len(self.f)).copy()


def tile(path: str, out: str, count: int, workers: int) -> str:
    """``out``: ``count`` samples, those of ``path`` over and over."""
    if not os.path.exists(out):
        f, scratch = BetonFile(path), scratch_dir(out)
        try:
            write_beton(out, _TiledImages(f, count), _TiledSource(f, count), scratch, workers, f.teachers)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


class _TiledFolder(torch.utils.data.Dataset):
    def __init__(self, images: str, copies: int):
        from torchvision.datasets import ImageFolder
        self.folder, self.copies = ImageFolder(images), copies

    def __len__(self):
        return len(self.folder) * self.copies

    def __getitem__(self, i):
        return self.folder[i % len(self.folder)]


def ffcv_imagenet_file(images: str, out: str, copies: int, workers: int) -> str:
    """ImageNet as ffcv-imagenet writes it (FFCV's writer, 500 / 0.5 / 90), tiled."""
    if not os.path.exists(out):
        DatasetWriter(out, {'image': RGBImageField(**FFCV_IMAGENET), 'label': IntField()},
                      num_workers=workers).from_indexed_dataset(_TiledFolder(images, copies),
                                                                chunksize=WRITER_CHUNK)
    return out


def first_images(images: str, n: int, root: str) -> str:
    """An ImageFolder of symlinks to the first ``n`` images (the mixing fixture covers 64)."""
    from ffcv_dr.intake import list_images
    if not os.path.isdir(root):
        for path in list_images(images).paths[:n]:
            cls = os.path.join(root, os.path.basename(os.path.dirname(path)))
            os.makedirs(cls, exist_ok=True)
            os.symlink(os.path.abspath(path), os.path.join(cls, os.path.basename(path)))
    return root


def evict(path: str):
    """Drop ``path`` from the page cache: the next reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes() -> int:
    return int(dict(line.split(': ') for line in open('/proc/self/io'))['read_bytes'])


def rss() -> tuple:
    """(current, peak since the last reset) resident set size, bytes."""
    status = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return int(status['VmRSS'].split()[0]) * 1024, int(status['VmHWM'].split()[0]) * 1024


def reset_peak_rss():
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def warm(path: str):
    """Read ``path`` through, so that it is in the page cache."""
    with open(path, 'rb', buffering=0) as f:
        while f.read(8 << 20):
            pass


def disk_epoch(loader, path: str, in_memory: bool = False) -> dict:
    """One epoch of ``loader`` after ``path`` left the page cache (or, with
    ``in_memory``, after it was read into it)."""
    warm(path) if in_memory else evict(path)
    reset_peak_rss()
    before, start, count = read_bytes(), time.perf_counter(), 0
    for batch in loader:
        count += len(batch[0])
    seconds = time.perf_counter() - start
    return {'rate': count / seconds, 'read': read_bytes() - before, 'peak_rss': rss()[1]}


def plain_loader(path, order, args, os_cache=False):
    return FFCVLoader(path, batch_size=args.batch_size, num_workers=args.workers, order=order,
                      os_cache=os_cache, drop_last=True, seed=0, custom_fields={'image': RGBImageField},
                      pipelines={'image': [RandomResizedCropRGBImageDecoder((args.size, args.size)),
                                           RandomHorizontalFlip(), ToTensor()],
                                 'label': [IntDecoder(), ToTensor()]})


def ours(path, order, args, os_cache=False):
    return Loader(path, batch_size=args.batch_size, num_workers=args.workers, order=order,
                  os_cache=os_cache, seed=0, output_size=(args.size, args.size))


def child(mode: list, args):
    """What this script prints in ``mode``, run in a new process."""
    out = subprocess.run([sys.executable, __file__, *mode, '--size', str(args.size), '--rounds',
                          str(args.rounds), '--batch-size', str(args.batch_size), '--workers',
                          str(args.workers)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_memory(b_imagenet: str, c_matched: str, args) -> dict:
    """B_imagenet and C_matched with os_cache=True and RANDOM order, as
    ffcv-imagenet trains from memory, the files in the page cache, rounds
    interleaved (round 0 compiles)."""
    runs = {'B_imagenet RANDOM in memory': (plain_loader(b_imagenet, OrderOption.RANDOM, args, True), b_imagenet),
            'C_matched RANDOM in memory': (ours(c_matched, OrderOption.RANDOM, args, True), c_matched)}
    results = {}
    for r in range(args.rounds + 1):
        for name, (loader, path) in runs.items():
            epoch = disk_epoch(loader, path, in_memory=True)
            if r:
                results.setdefault(name, []).append(epoch)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='out/disk')
    p.add_argument('--images', default=os.path.join(SHARED, 'data', 'imagenet-sample', 'train'))
    p.add_argument('--mldr', default=os.path.join(SHARED, 'fixtures', 'mldr-randaug-ns400', 'reinforced_data'))
    p.add_argument('--mixing-mldr', default=os.path.join(SHARED, 'fixtures', 'mldr-mixing', 'reinforced_data'))
    p.add_argument('--copies', type=int, default=16, help='the source images this many times over')
    p.add_argument('--rss-scale', type=int, default=4, help='the larger file for the RSS check, this many times')
    p.add_argument('--size', type=int, default=176)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--rss-of', help=argparse.SUPPRESS)
    p.add_argument('--in-memory', nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.in_memory:
        print(json.dumps(in_memory(*args.in_memory, args)))
        return
    if args.rss_of:
        loader = ours(args.rss_of, OrderOption.QUASI_RANDOM, args)
        print(json.dumps([disk_epoch(loader, args.rss_of) | {'path': args.rss_of} for _ in range(3)]))
        return

    os.makedirs(args.out, exist_ok=True)
    o = lambda name: os.path.join(args.out, name)  # noqa: E731
    w = args.workers
    if not os.path.exists(o('orig1.beton')):
        convert(args.images, o('orig1.beton'), args.mldr, num_workers=w)
    if not os.path.exists(o('matched1.beton')):
        convert(args.images, o('matched1.beton'), args.mldr, num_workers=w, storage=Storage(**FFCV_IMAGENET))
    if not os.path.exists(o('mix1.beton')):
        convert(first_images(args.images, 64, o('mix-images')), o('mix1.beton'), args.mixing_mldr, num_workers=w)
    count = len(BetonFile(o('orig1.beton'))) * args.copies
    files = {'B_imagenet': ffcv_imagenet_file(args.images, o(f'imagenet{args.copies}.beton'), args.copies, w),
             'C_orig': tile(o('orig1.beton'), o(f'orig{args.copies}.beton'), count, w),
             'C_matched': tile(o('matched1.beton'), o(f'matched{args.copies}.beton'), count, w),
             'C_mix': tile(o('mix1.beton'), o(f'mix{args.copies}.beton'), count // 64 * 64, w)}
    runs = {}
    for order in ('QUASI_RANDOM', 'RANDOM'):
        for kind, path in files.items():
            if order == 'RANDOM' and kind == 'C_mix':
                continue
            make = plain_loader if kind.startswith('B') else ours
            runs[f'{kind} {order}'] = (make(path, ORDERS[order], args), path)
    results = {}
    for r in range(args.rounds + 1):
        for name, (loader, path) in runs.items():
            epoch = disk_epoch(loader, path)
            if r:
                results.setdefault(name, []).append(epoch)
            print(f'round {r} {name}: {epoch["rate"]:.0f} images/s, read {epoch["read"] / 2**20:.0f} MiB '
                  f'({epoch["read"] / os.path.getsize(path):.2f}x the file), peak RSS '
                  f'{epoch["peak_rss"] / 2**20:.0f} MiB', flush=True)
    del runs
    # In memory, for the ratio in the same run: in a new process, as a file mapped
    # by os_cache=True stays in the page cache, which would spoil the disk epochs.
    results.update(child(['--in-memory', files['B_imagenet'], files['C_matched']], args))
    big = tile(o('orig1.beton'), o(f'orig{args.copies * args.rss_scale}.beton'), count * args.rss_scale, w)
    memory = {'C_orig': child(['--rss-of', files['C_orig']], args),
              f'C_orig x{args.rss_scale}': child(['--rss-of', big], args)}
    report(results, files, memory, args)


def report(results, files, memory, args):
    med = {k: {m: statistics.median(e[m] for e in v) for m in ('rate', 'read', 'peak_rss')}
           for k, v in results.items()}
    base = med['B_imagenet QUASI_RANDOM']['rate']
    print(f'\n{args.copies} copies, {args.size} px, batch {args.batch_size}, {args.workers} workers, '
          f'os_cache=False, the file evicted before each epoch; median of {args.rounds} rounds\n')
    print(f'| loader, order (os_cache=False unless in memory) | file GB | images/s | / B_imagenet QUASI_RANDOM | read per epoch / file | peak RSS MiB |')
    print('|---|---|---|---|---|---|')
    for name, m in med.items():
        path = files[name.split()[0]]
        size = os.path.getsize(path)
        print(f'| {name} | {size / 1e9:.2f} | {m["rate"]:.0f} | {m["rate"] / base:.2f} | '
              f'{m["read"] / size:.2f} | {m["peak_rss"] / 2**20:.0f} |')
    print('\nC_orig QUASI_RANDOM alone, new processes: peak RSS in epochs 1, 2, 3 (MiB)')
    for name, epochs in memory.items():
        print(f'{name} ({os.path.getsize(epochs[0]["path"]) / 1e9:.2f} GB): '
              + ', '.join(f'{e["peak_rss"] / 2**20:.0f}' for e in epochs)
              + f' ({epochs[-1]["rate"]:.0f} images/s, read {epochs[-1]["read"] / 2**20:.0f} MiB)')
    with open(os.path.join(args.out, 'disk.json'), 'w') as f:
        json.dump({'median': med, 'memory': memory, 'files': {k: os.path.getsize(v) for k, v in files.items()},
                   'args': vars(args)}, f, indent=1)


if __name__ == '__main__':
    main()
