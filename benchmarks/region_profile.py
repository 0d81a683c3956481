"""Where a region decode's time goes, per image on one core. For every image
of a ``.beton``, the crop of one stored reinforcement (drawn as
``replay_profile.py`` draws them) is decoded by ffcv-dr's region decoder and
split into its stages: cutting the restart intervals it needs into a small
JPEG, that piece's entropy decoding (libjpeg's ``jpeg_read_coefficients``),
the rest of the piece's decode (inverse DCT, upsampling, colour), then the
resize to the output; beside a full decode of the same image and its entropy
decoding. Each stage is the fastest of 5 runs on the image, summed over the
images. Builds ``region_profile.c`` (which includes ``ffcv_dr/_jpeg.c``)
with the system's C compiler.

    .venv/bin/python benchmarks/region_profile.py out/imagenet-sample-ns400.beton [--size 176]
"""
import ctypes
import os
import subprocess
import sysconfig
import tempfile
import time

import numpy as np

from ffcv_dr import _resize
from ffcv_dr.geometry import scale_box
from ffcv_dr.jpeg import decode_region, scaled_region
from ffcv_dr.record_bytes import read_u16
from ffcv_dr.render import render_layout

from replay_profile import profiled_file   # benchmarks/, the script's own folder

REPS = 5
HERE = os.path.dirname(os.path.abspath(__file__))
P, U32, U64, INT = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
REGION = [U32] * 5


def build(folder):
    """The timers of region_profile.c, compiled and loaded."""
    lib = os.path.join(folder, 'region_profile.so')
    subprocess.run(['cc', '-O2', '-shared', '-fPIC', '-o', lib, os.path.join(HERE, 'region_profile.c'),
                    os.path.join(HERE, '..', 'ffcv_dr', '_restarts.c'), '-I' + sysconfig.get_paths()['include'],
                    '-ljpeg'], check=True)
    c = ctypes.CDLL(lib)
    c.profile_piece.restype = P
    c.profile_piece.argtypes = [P, U64] + REGION + [P, P, P]
    c.profile_decode.argtypes = [P, U64] + REGION + [P, U64, INT, INT]
    c.profile_cut.argtypes = [P, U64] + REGION + [INT]
    c.profile_entropy.argtypes = [P, U64, INT]
    for name in ('profile_decode', 'profile_cut', 'profile_entropy'):
        getattr(c, name).restype = ctypes.c_double
    return c


def resize_seconds(pixels, out):
    """The fastest of REPS resizes of the decoded crop (it blurs its input, so each gets a copy)."""
    fn = ctypes.CDLL(_resize.__file__).ffcv_dr_resize_crop
    fn.argtypes = [P] + [U32] * 6 + [P, U32, U32]
    best = float('inf')
    for _ in range(REPS):
        src = np.ascontiguousarray(pixels)
        start = time.perf_counter()
        status = fn(src.ctypes.data, src.shape[0], src.shape[1], 0, src.shape[0], 0, src.shape[1],
                    out.ctypes.data, out.shape[0], out.shape[1])
        best = min(best, time.perf_counter() - start)
        assert status == 0
    return best


def main():
    f, size = profiled_file(__doc__.split('\n\n')[0])
    layout, meta = render_layout(f.recipe), f.image_meta
    js = np.random.default_rng(0).integers(0, f.recipe.num_samples, len(f))
    out = np.empty((size, size, 3), np.uint8)
    t = dict.fromkeys(('region', 'cut', 'piece', 'piece entropy', 'resize', 'full', 'full entropy'), 0.0)
    piece_bytes = image_bytes = spliced = 0
    with tempfile.TemporaryDirectory() as folder:
        c = build(folder)
        for i in range(len(f)):
            block, jpeg = np.array(f.image_block(i)), np.array(f.payload(i))
            rec = block[js[i] * layout.record_size:(js[i] + 1) * layout.record_size]
            o, (img_h, img_w) = layout.own.crop, (int(meta[i]['height']), int(meta[i]['width']))
            top, left, h, w = scale_box(*(read_u16(rec, o + k) for k in (0, 2, 4, 6)),
                                        meta[i]['orig_height'], meta[i]['orig_width'], img_h, img_w)
            d, sw, r0, r1, c0, c1 = scaled_region(img_h, img_w, top, left, h, w, size, size)
            region = (d, r0, r1 - r0, c0, c1 - c0)
            buf = np.empty(img_h * img_w * 3, np.uint8)
            t['region'] += c.profile_decode(jpeg.ctypes.data, jpeg.size, *region, buf.ctypes.data, buf.size,
                                            1, REPS)
            n, dy, dx = U64(), U32(), U32()
            piece = c.profile_piece(jpeg.ctypes.data, jpeg.size, *region, ctypes.byref(n), ctypes.byref(dy),
                                    ctypes.byref(dx))
            if piece:
                spliced += 1
                src, nbytes = piece, n.value
                region = (d, r0 - dy.value, r1 - r0, c0 - dx.value, c1 - c0)
                t['cut'] += c.profile_cut(jpeg.ctypes.data, jpeg.size, d, r0, r1 - r0, c0, c1 - c0, REPS)
            else:
                src, nbytes = jpeg.ctypes.data, jpeg.size
            t['piece'] += c.profile_decode(src, nbytes, *region, buf.ctypes.data, buf.size, 0, REPS)
            t['piece entropy'] += c.profile_entropy(src, nbytes, REPS)
            piece_bytes += nbytes
            if piece:
                ctypes.CDLL(None).free(ctypes.c_void_p(piece))
            t['resize'] += resize_seconds(decode_region(jpeg, d, r0, r1 - r0, c0, c1 - c0), out)
            t['full'] += c.profile_decode(jpeg.ctypes.data, jpeg.size, 1, 0, img_h, 0, img_w, buf.ctypes.data,
                                          buf.size, 0, REPS)
            t['full entropy'] += c.profile_entropy(jpeg.ctypes.data, jpeg.size, REPS)
            image_bytes += jpeg.size
    ms = {k: v / len(f) * 1e3 for k, v in t.items()}
    print(f'{len(f)} images ({spliced} cut to their crop), one stored reinforcement each, {size} px, one core')
    for name, value in [('region decode', ms['region']),
                        ('  cutting the intervals', ms['cut']),
                        ("  the piece's entropy decoding", ms['piece entropy']),
                        ("  the rest of the piece's decode", ms['piece'] - ms['piece entropy']),
                        ('resize to the output', ms['resize']),
                        ('full decode of the image', ms['full']),
                        ('  its entropy decoding', ms['full entropy'])]:
        print(f'{name:34s} {value:7.4f} ms/image')
    print(f"pieces' bytes / images' bytes {piece_bytes / image_bytes:.3f}; "
          f"region decode / full decode {ms['region'] / ms['full']:.3f}; "
          f"(region decode + resize) / full decode {(ms['region'] + ms['resize']) / ms['full']:.2f}")


if __name__ == '__main__':
    main()
