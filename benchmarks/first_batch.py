"""Time to the first batch in a new process, ffcv-dr against plain FFCV on the
same JPEG bytes with the same settings (batch, workers, side, os_cache),
rounds interleaved, and where ffcv-dr's time goes.

    .venv/bin/python benchmarks/first_batch.py out/imagenet-plus.beton [--rounds 3]

Each measurement is `ffcv-dr bench`'s: a new process builds the loader and
takes one batch (imports excluded). A first process per kind fills a fresh
numba cache; the rounds after it are the "second process" a user meets on
every later run. ``--profile`` then profiles one ffcv-dr first batch in the
pipeline's thread, where numba compiles FFCV's per-loader stage code.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

from ffcv_dr.bench import first_batch_seconds, write_plain_beton
from ffcv_dr.beton import BetonFile


def profile(path: str, size: int, batch_size: int, workers: int):
    """Seconds of the first batch, and of its numba compilation and LLVM finalisation."""
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv_dr.pipelines import Loader
    run, prof = EpochIterator.run, cProfile.Profile()

    def profiled(self):
        prof.enable()
        try:
            run(self)
        finally:
            prof.disable()
    EpochIterator.run = profiled
    loader = Loader(path, batch_size, workers, output_size=(size, size))
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    total = time.perf_counter() - start
    del it
    time.sleep(1)
    stats = pstats.Stats(prof).stats
    cumulative = {f'{os.path.basename(k[0])}:{k[2]}': v[3] for k, v in stats.items()}
    return {'first batch s': total,
            "numba compiles the stage code (FFCV's per-loader closures) s": cumulative.get('dispatcher.py:_compile_for_args', 0.0),
            "  of which LLVM links and optimises the cached kernels into it s": cumulative.get('codegen.py:finalize', 0.0)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('beton', help='an ffcv-dr .beton of original JPEG bytes')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--profile', action='store_true')
    args = p.parse_args()
    if args.profile:
        for key, value in profile(args.beton, args.size, args.batch_size, args.workers).items():
            print(f'{key:70s} {value:6.1f}')
        return
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, 'same_bytes.beton')
        write_plain_beton(BetonFile(args.beton), plain, args.workers)
        kinds = {'ffcv': plain, 'ffcv-dr': args.beton}
        cache = os.path.join(tmp, 'numba-cache')
        times = {k: [] for k in kinds}
        first = {k: first_batch_seconds(k, path, args.size, args.batch_size, args.workers, cache)
                 for k, path in kinds.items()}
        for _ in range(args.rounds):
            for k, path in kinds.items():
                times[k].append(first_batch_seconds(k, path, args.size, args.batch_size, args.workers, cache))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f'{args.size} px, batch {args.batch_size}, {args.workers} workers; seconds to the first batch')
    for k in kinds:
        print(f'  {k:8s} first process {first[k]:5.1f}   later processes {" ".join(f"{t:.1f}" for t in times[k])}'
              f'   median {median[k]:.1f}')
    print(f'ffcv-dr / plain FFCV, later processes: {median["ffcv-dr"] / median["ffcv"]:.2f}x')


if __name__ == '__main__':
    sys.exit(main())
