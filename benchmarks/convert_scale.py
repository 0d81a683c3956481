"""``ffcv-dr convert`` against FFCV's writer at scale: the per-image rate each
adds from a conversion of N images to one of 2N (the images of a ``.beton``
linked again as ``ffcv-dr bench`` does), so that neither's start-up counts.
FFCV's writer takes about half a second to start, which on a conversion of
a few hundred images is most of a second's run. Rounds interleaved, the first
a warm-up, medians.

    .venv/bin/python benchmarks/convert_scale.py out/imagenet-sample-ns400.beton [--images 2000]
"""
import argparse
import contextlib
import io
import os
import tempfile
import time

import numpy as np
from ffcv.fields import RGBImageField

from ffcv_dr.bench import ffcv_writer_rate, write_mldr_folder
from ffcv_dr.beton import BetonFile
from ffcv_dr.convert import convert


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('beton')
    parser.add_argument('--images', type=int, default=2000, help='N')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--workers', type=int, default=2)
    args = parser.parse_args()
    f = BetonFile(args.beton)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.beton))) as tmp:
        copies = [-(-k * args.images // len(f)) for k in (1, 2)]
        sets = [(*write_mldr_folder(f, os.path.join(tmp, f'x{c}'), c), c * len(f)) for c in copies]
        out, seconds = os.path.join(tmp, 'out.beton'), {}
        for r in range(args.rounds + 1):
            for folder, mldr, n in sets:
                with contextlib.redirect_stderr(io.StringIO()):
                    start = time.perf_counter()
                    convert(folder, out, mldr, num_workers=args.workers, num_classes=f.recipe.num_classes)
                    ours = time.perf_counter() - start
                    os.remove(out)
                    theirs = n / ffcv_writer_rate(folder, out, args.workers,
                                                  RGBImageField(write_mode='jpg', jpeg_quality=90))
                    os.remove(out)
                if r:
                    seconds.setdefault(n, []).append((ours, theirs))
    (n1, t1), (n2, t2) = [(n, np.median(v, axis=0)) for n, v in seconds.items()]
    print(f'{args.workers} workers, medians of {args.rounds} rounds; images/s '
          '(ffcv-dr convert, FFCV\'s writer, ratio):')
    for n, t in ((n1, t1), (n2, t2)):
        print(f'  {n:6d} images        {n / t[0]:6.0f} {n / t[1]:6.0f}  {t[1] / t[0]:.2f}')
    rate = (n2 - n1) / (t2 - t1)
    print(f'  the {n2 - n1} more  {rate[0]:6.0f} {rate[1]:6.0f}  {rate[0] / rate[1]:.2f}')
    start = t1 - n1 / rate
    print(f'start-up (s): ffcv-dr convert {start[0]:.2f}, FFCV\'s writer {start[1]:.2f}')


if __name__ == '__main__':
    main()
