"""Where ``ffcv-dr convert`` spends its time reading ml-dr's pickles, per image
on one core: the ``.beton``'s reinforcements written back as ml-dr's files
(``torch.save``, as ``ffcv-dr bench`` does), then read file by file by each
stage of :func:`ffcv_dr.mldr.records.parse_file`, beside the unpickling path that it
falls back to (and that was the only one before it).

    .venv/bin/python benchmarks/convert_profile.py out/imagenet-sample-ns400.beton
"""
import argparse
import os
import tempfile
import time

import numpy as np

from ffcv_dr.bench import write_mldr_folder
from ffcv_dr.beton import BetonFile
from ffcv_dr.mldr import ImageSizes, load_pickle, parse_file, parse_sample, sample_limits, unzip_pickle
from ffcv_dr.mldr.reader import read_views


def best_ms(fn, items, repeats=5):
    """Milliseconds per item of the fastest of ``repeats`` passes, after a warm-up."""
    fn(items[0])
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(items)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('beton')
    args = parser.parse_args()
    f = BetonFile(args.beton)
    r, n = f.recipe, len(f)
    limits = sample_limits(r.num_samples, r.topk)
    sizes = ImageSizes(f.image_meta['orig_width'].astype(np.int64), f.image_meta['orig_height'].astype(np.int64))
    with tempfile.TemporaryDirectory() as tmp:
        _, mldr = write_mldr_folder(f, tmp)
        names = [os.path.join(mldr, f'{i}.pth.tar') for i in range(n)]
        files = [open(p, 'rb').read() for p in names]
        pickles = [unzip_pickle(d, p, limits) for d, p in zip(files, names)]
        items = list(range(n))
        stages = {
            'read the file': lambda i: open(names[i], 'rb').read(),
            'unzip (zipfile)': lambda i: unzip_pickle(files[i], names[i], limits),
            'compiled reader (read_views)': lambda i: read_views(pickles[i], r.ra_ops, r.topk),
            'all of parse_file, from the bytes': lambda i: parse_file(files[i], i, r, sizes, names[i]),
            'restricted unpickler': lambda i: load_pickle(files[i], names[i], limits),
            'unpickler + parse_sample (fallback)':
                lambda i: parse_sample(load_pickle(files[i], names[i], limits), i, r, sizes, names[i]),
        }
        print(f'{n} files of {r.num_samples} reinforcements, {np.mean([len(d) for d in files]) / 1e3:.0f} KB '
              'each on average, one core')
        for label, fn in stages.items():
            print(f'{label:36s} {best_ms(fn, items):6.3f} ms/image')


if __name__ == '__main__':
    main()
