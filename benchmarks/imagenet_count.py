"""A file with ImageNet's sample count (1,281,167) from disk: time to open,
time to the first batch, one QUASI_RANDOM epoch with ``os_cache=False``, and
memory, against a 10,000-sample file made the same way.

The samples are the 500 ImageNet photos of ``../shared`` shrunk to at most
``--max-resolution`` pixels (small images keep the epoch short; the count is
what is measured), with 8 reinforcements each, repeated to the count. Each
file is measured in a new process, its pages dropped from the page cache first.

    .venv/bin/python benchmarks/imagenet_count.py --out out/count
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ffcv.loader import OrderOption

from disk_epochs import SHARED, evict, read_bytes, rss, tile
from ffcv_dr import Loader
from ffcv_dr.convert import convert
from ffcv_dr.storage import Storage

IMAGENET = 1_281_167


def measure(path: str, args) -> dict:
    """Open, first batch and one epoch of ``path``, in this (new) process."""
    evict(path)
    start = time.perf_counter()
    loader = Loader(path, batch_size=args.batch_size, num_workers=args.workers, seed=0,
                    order=OrderOption.QUASI_RANDOM, os_cache=False, output_size=(args.size, args.size))
    opened = time.perf_counter() - start
    rss_open = rss()[0]
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    rss_first = rss()[0]
    count, epoch_start = args.batch_size, time.perf_counter()
    for batch in it:
        count += len(batch[0])
    seconds = time.perf_counter() - epoch_start
    return {'samples': len(loader.reader.metadata), 'file_bytes': os.path.getsize(path),
            'open_s': opened, 'first_batch_s': first, 'epoch_s': seconds + first - opened,
            'images_per_s': count / (seconds + first - opened), 'read_bytes': read_bytes(),
            'rss_open': rss_open, 'rss_first_batch': rss_first, 'rss_end': rss()[0], 'peak_rss': rss()[1]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='out/count')
    p.add_argument('--images', default=os.path.join(SHARED, 'data', 'imagenet-sample', 'train'))
    p.add_argument('--mldr', default=os.path.join(SHARED, 'fixtures', 'mldr-randaug', 'reinforced_data'))
    p.add_argument('--max-resolution', type=int, default=64)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--measure', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    os.makedirs(args.out, exist_ok=True)
    small = os.path.join(args.out, 'small.beton')
    if not os.path.exists(small):
        convert(args.images, small, args.mldr, num_workers=args.workers,
                storage=Storage('jpg', args.max_resolution))
    results = {}
    for count in (10_000, IMAGENET):
        path = tile(small, os.path.join(args.out, f'{count}.beton'), count, args.workers)
        out = subprocess.run([sys.executable, __file__, '--measure', path, '--size', str(args.size),
                              '--batch-size', str(args.batch_size), '--workers', str(args.workers)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results[count] = json.loads(out.stdout.strip().splitlines()[-1])
        print(count, results[count], flush=True)
    print(f'\n{args.size} px, batch {args.batch_size}, {args.workers} workers, QUASI_RANDOM, os_cache=False\n')
    print('| samples | file GB | open s | first batch s | epoch s | images/s | RSS open / first batch / end MiB | peak RSS MiB |')
    print('|---|---|---|---|---|---|---|---|')
    for count, r in results.items():
        print(f'| {count:,} | {r["file_bytes"] / 1e9:.2f} | {r["open_s"]:.1f} | {r["first_batch_s"]:.1f} | '
              f'{r["epoch_s"]:.0f} | {r["images_per_s"]:.0f} | {r["rss_open"] / 2**20:.0f} / '
              f'{r["rss_first_batch"] / 2**20:.0f} / {r["rss_end"] / 2**20:.0f} | {r["peak_rss"] / 2**20:.0f} |')
    with open(os.path.join(args.out, 'count.json'), 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
