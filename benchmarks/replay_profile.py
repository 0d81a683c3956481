"""Where ffcv-dr's replay spends its time, per image on one core: the stages of
:func:`render` run in a loop over every image of a ``.beton`` (one stored
reinforcement each), beside a full decode of the same JPEGs (bench's ceiling A)
and the rulebook's check of the record and top-k that each decoder makes
before replaying (:func:`ffcv_dr.rules.sample_problem`).

    .venv/bin/python benchmarks/replay_profile.py out/imagenet-sample-ns400.beton [--size 176]
"""
import argparse
import time

import numba as nb
import numpy as np

from ffcv_dr.bench import _decode_all
from ffcv_dr.beton import BetonFile
from ffcv_dr.render import (fresh_settings, render, render_layout, replay_view,
                                             temp_size)
from ffcv_dr.geometry import scale_box
from ffcv_dr.record_bytes import read_u16
from ffcv_dr.jpeg import decode_crop_resize
from ffcv_dr.rules import magnitude_limits, sample_problem


@nb.njit(nogil=True)
def _crops(blocks, offsets, meta, js, layout, outs):
    for i in range(len(js)):
        block = blocks[offsets[i]:offsets[i + 1]]
        rec = block[js[i] * layout.record_size:(js[i] + 1) * layout.record_size]
        c = layout.own.crop
        top, left, h, w = scale_box(read_u16(rec, c), read_u16(rec, c + 2), read_u16(rec, c + 4),
                                    read_u16(rec, c + 6), meta[i]['orig_height'],
                                    meta[i]['orig_width'], meta[i]['height'], meta[i]['width'])
        decode_crop_resize(block[layout.params_size:], np.int64(meta[i]['height']),
                           np.int64(meta[i]['width']), top, left, h, w, outs[i])


@nb.njit(nogil=True)
def _replays(blocks, offsets, js, layout, outs, scratch):
    for i in range(len(js)):
        block = blocks[offsets[i]:offsets[i + 1]]
        rec = block[js[i] * layout.record_size:(js[i] + 1) * layout.record_size]
        replay_view(outs[i], rec, layout.own, layout, scratch)


@nb.njit(nogil=True)
def _renders(blocks, offsets, meta, js, layout, fresh, temp, outs):
    for i in range(len(js)):
        block = blocks[offsets[i]:offsets[i + 1]]
        render(block, meta[i], block, meta[i], js[i], np.uint64(0), 0, i, temp, outs[i], layout, fresh)


@nb.njit(nogil=True)
def _checks(blocks, offsets, tops, top_offsets, js, layout, limits, topk, num_classes, orig_sizes):
    bad = 0
    for i in range(len(js)):
        bad += sample_problem(blocks[offsets[i]:offsets[i + 1]], tops[top_offsets[i]:top_offsets[i + 1]],
                              js[i], layout, limits, topk, num_classes, i, orig_sizes) != 0
    return bad


def best_ms(fn, n, repeats=5):
    """Milliseconds per image of the fastest of ``repeats`` runs, after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e3


def profiled_file(description: str) -> tuple:
    """(the .beton, the output side) from the command line: a file of stored
    reinforcements of a recipe without mixing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('beton')
    parser.add_argument('--size', type=int, default=None, help="output side (default: the recipe's)")
    args = parser.parse_args()
    f = BetonFile(args.beton)
    if f.recipe.mixing or not f.recipe.num_samples:
        raise SystemExit(f'{args.beton}: profiles stored reinforcements of a recipe without mixing')
    return f, args.size or f.recipe.size


def main():
    f, size = profiled_file(__doc__.split('\n\n')[0])
    n = len(f)
    blocks = [np.array(f.image_block(i)) for i in range(n)]
    offsets = np.concatenate([[0], np.cumsum([b.size for b in blocks])])
    data, meta = np.concatenate(blocks), f.image_meta
    js = np.random.default_rng(0).integers(0, f.recipe.num_samples, n)
    layout, fresh = render_layout(f.recipe), fresh_settings(f.recipe)
    outs = np.empty((n, size, size, 3), np.uint8)
    scratch = np.empty((size, size, 3), np.uint8)
    temp = np.empty(temp_size(f.recipe, (size, size)), np.uint8)
    jpegs = [np.array(f.payload(i)) for i in range(n)]
    jpeg_data, jpeg_offsets = np.concatenate(jpegs), np.concatenate([[0], np.cumsum([j.size for j in jpegs])])
    heights, widths = meta['height'].copy(), meta['width'].copy()
    tops = [np.array(f.block(f.target_meta[i]['data_ptr'])) for i in range(n)]
    top_data, top_offsets = np.concatenate(tops), np.concatenate([[0], np.cumsum([t.size for t in tops])])
    limits = magnitude_limits(f.recipe)
    buf = np.empty(int((meta['height'].astype(np.int64) * meta['width']).max()) * 3, np.uint8)
    rows = [('full decode (bench A)',
             lambda: _decode_all(jpeg_data, jpeg_offsets, heights, widths, buf)),
            ('region decode + resize', lambda: _crops(data, offsets, meta, js, layout, outs)),
            ('flip + RandAugment + erasing', lambda: _replays(data, offsets, js, layout, outs, scratch)),
            ('whole replay (render)', lambda: _renders(data, offsets, meta, js, layout, fresh, temp, outs)),
            ('rules check, record + top-k', lambda: _checks(data, offsets, top_data, top_offsets, js, layout,
                                                             limits, f.recipe.topk, f.recipe.num_classes,
                                                             f.orig_sizes))]
    print(f'{n} images, one stored reinforcement each, {size} px, one core')
    for name, fn in rows:
        print(f'{name:30s} {best_ms(fn, n):7.4f} ms/image')


if __name__ == '__main__':
    main()
