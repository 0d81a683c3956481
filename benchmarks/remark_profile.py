"""What adding restart markers costs the writer: per image on one core, the
splicer (``_restarts.c``) and libjpeg's route through the coefficients beside
a full decode of the same JPEGs, with the size of what each writes; then
``ffcv-dr convert`` with each (and with no markers, as before they existed)
against FFCV's own writer (jpg, quality 90), rounds interleaved, the first
round a warm-up. These rounds are of the folder's images as they are (500 for
the sample), which compares the routes with each other; against FFCV's
writer, whose start-up (about half a second) they count too, the rate at
scale is ``convert_scale.py``'s.

    .venv/bin/python benchmarks/remark_profile.py ../shared/data/imagenet-sample/train \\
        --mldr ../shared/fixtures/mldr-randaug-ns400/reinforced_data
"""
import argparse
import contextlib
import functools
import glob
import io
import os
import tempfile
import time

import cv2
import numpy as np
from ffcv.fields import RGBImageField

import ffcv_dr.storage
from ffcv_dr.bench import ffcv_writer_rate
from ffcv_dr.convert import convert
from ffcv_dr.jpeg import add_restarts

from convert_profile import best_ms   # benchmarks/, the script's own folder

ROUTES = {'splicer': functools.partial(add_restarts, splice=True),
          "libjpeg's coefficients": functools.partial(add_restarts, splice=False),
          'no markers (before)': lambda data: data}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('images', help='an ImageFolder of JPEGs')
    parser.add_argument('--mldr', help='its ml-dr reinforcements, for the convert rounds')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--workers', type=int, default=2)
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.images, '**', '*.JPEG'), recursive=True) +
                   glob.glob(os.path.join(args.images, '**', '*.jpg'), recursive=True))
    jpegs = [np.fromfile(p, np.uint8) for p in paths]
    original = sum(d.size for d in jpegs)
    print(f'{len(jpegs)} JPEGs, {original / len(jpegs) / 1e3:.0f} KB on average, one core')
    print(f'{"full decode (OpenCV)":28s} {best_ms(lambda d: cv2.imdecode(d, cv2.IMREAD_COLOR), jpegs):6.3f} ms/image')
    for label, route in list(ROUTES.items())[:2]:
        size = sum(route(d).size for d in jpegs)
        print(f'{label:28s} {best_ms(route, jpegs):6.3f} ms/image, {100 * (size / original - 1):+.2f}% bytes')
    if not args.mldr:
        return
    n, rates = len(jpegs), {label: [] for label in [*ROUTES, "FFCV's writer"]}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'out.beton')
        for r in range(args.rounds + 1):
            for label, route in ROUTES.items():
                ffcv_dr.storage.add_restarts = route   # what every stored JPEG goes through
                start = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):
                    convert(args.images, out, args.mldr, num_workers=args.workers)
                rates[label].append(n / (time.perf_counter() - start))
                os.remove(out)
            with contextlib.redirect_stderr(io.StringIO()):
                rates["FFCV's writer"].append(ffcv_writer_rate(
                    args.images, out, args.workers, RGBImageField(write_mode='jpg', jpeg_quality=90)))
            os.remove(out)
    ffcv = np.median(rates["FFCV's writer"][1:])
    print(f'convert, {args.workers} workers, median of {args.rounds} rounds (images/s, / FFCV\'s writer):')
    for label, values in rates.items():
        rate = np.median(values[1:])
        print(f'  {label:28s} {rate:7.0f}  {rate / ffcv:5.2f}')


if __name__ == '__main__':
    main()
