"""``ffcv-dr subset`` against copying the file, and what ImageNet+-Small's
shape costs per image against ImageNet+'s, extrapolated to ImageNet's
1,281,167 images beside the paper's sizes of Apple's files (61 GB of
reinforcements for ImageNet+, 400 per image with the top-10; 10.6 GB for
ImageNet+-Small, 100 with the top-5).

    .venv/bin/python benchmarks/subset_speed.py out/imagenet-sample-ns400.beton
"""
import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time

from ffcv_dr.beton import BetonFile
from ffcv_dr.subset import subset

IMAGENET = 1_281_167
PAPER_GB = {(400, 10): 61.0, (100, 5): 10.6}


def best_seconds(fn, repeats):
    times = []
    for _ in range(repeats + 1):   # the first imports and compiles: a warm-up
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('beton', help='an ImageNet+-shaped file (400 reinforcements, top-10)')
    parser.add_argument('--samples', type=int, default=100)
    parser.add_argument('--topk', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--workers', type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.beton))) as tmp:
        out, copy = os.path.join(tmp, 'small.beton'), os.path.join(tmp, 'copy.beton')

        def cut():
            with contextlib.redirect_stderr(io.StringIO()):
                subset(args.beton, out, args.samples, args.topk, num_workers=args.workers)
        cut_s = best_seconds(cut, args.repeats)
        copy_s = best_seconds(lambda: shutil.copyfile(args.beton, copy), args.repeats)
        small, big = BetonFile(out), BetonFile(args.beton)
        print(f'subset to {args.samples} reinforcements, top-{args.topk}: {os.path.getsize(out) / 1e6:.1f} MB '
              f'in {cut_s:.2f} s ({os.path.getsize(out) / cut_s / 1e9:.2f} GB/s of output); copying the '
              f'{os.path.getsize(args.beton) / 1e6:.1f} MB input: {copy_s:.2f} s '
              f'({os.path.getsize(args.beton) / copy_s / 1e9:.2f} GB/s)')
        for f in (big, small):
            r = f.recipe
            per_image = r.num_samples * (f.record_dtype.itemsize + f.topk_dtype.itemsize)
            paper = PAPER_GB.get((r.num_samples, r.topk))
            print(f'{r.num_samples} reinforcements, top-{r.topk}: {per_image} bytes of reinforcements '
                  f'per image, {per_image * IMAGENET / 1e9:.1f} GB at ImageNet\'s count'
                  + (f' (Apple\'s files: {paper} GB)' if paper else '')
                  + f'; images {f.image_bytes() / len(f) / 1e3:.0f} KB each as stored here')


if __name__ == '__main__':
    main()
