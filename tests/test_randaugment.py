"""Each RandAugment kernel against torchvision.transforms.v2.functional.

On PIL images, v2 runs Pillow's own code, which is what ml-dr replays with:
there the kernels must agree exactly. On uint8 tensors torchvision uses its
own arithmetic: geometric ops then differ only where a sampling position
falls on a rounding boundary, photometric ops by at most one level.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from conftest import IMAGES
from ffcv_dr.intake import list_images
from ffcv_dr.format import RA_OPS
from ffcv_dr.randaugment import _inverse_affine, _rotation, apply_op, magnitude_table

NEAREST = InterpolationMode.NEAREST
GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')


def torchvision_op(img, op, m):
    """What torchvision's RandAugment does for one (op, magnitude)."""
    if op in ('ShearX', 'ShearY'):
        shear = math.degrees(math.atan(m))
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, interpolation=NEAREST,
                        shear=[shear, 0.0] if op == 'ShearX' else [0.0, shear], fill=0,
                        center=[0, 0])
    if op in ('TranslateX', 'TranslateY'):
        return F.affine(img, angle=0.0, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST,
                        translate=[int(m), 0] if op == 'TranslateX' else [0, int(m)], fill=0)
    return {
        'Identity': lambda: img,
        'Rotate': lambda: F.rotate(img, m, interpolation=NEAREST, fill=0),
        'Brightness': lambda: F.adjust_brightness(img, 1.0 + m),
        'Color': lambda: F.adjust_saturation(img, 1.0 + m),
        'Contrast': lambda: F.adjust_contrast(img, 1.0 + m),
        'Sharpness': lambda: F.adjust_sharpness(img, 1.0 + m),
        'Posterize': lambda: F.posterize(img, int(m)),
        'Solarize': lambda: F.solarize(img, m),
        'AutoContrast': lambda: F.autocontrast(img),
        'Equalize': lambda: F.equalize(img),
    }[op]()


def ours(img: np.ndarray, op: str, m: float) -> np.ndarray:
    out = img.copy()
    apply_op(out, np.empty_like(out), np.uint8(RA_OPS.index(op)), np.float32(m), 1.0, 1.0)
    return out


def cases():
    """Every op at ml-dr's magnitude (bin 9 of 31), both signs, and at the largest one."""
    out = []
    for magnitude in (9, 30):
        mags, signed = magnitude_table(224, 224, magnitude)
        for k, op in enumerate(RA_OPS):
            m = float(mags[k])
            out += [(op, m)] + ([(op, -m)] if signed[k] and m else [])
    return sorted(set(out))


@pytest.fixture(scope='module')
def inputs():
    """224x224 RGB crops of real photos (one grayscale), as RandAugment sees them."""
    paths = list_images(IMAGES).paths
    picks = [paths[i] for i in (0, 7, 123, 250, 499)]
    picks.append(next(p for p in paths if Image.open(p).mode == 'L'))
    return [np.array(Image.open(p).convert('RGB').resize((224, 224), Image.BILINEAR))
            for p in picks]


@pytest.mark.parametrize('op, m', cases())
def test_op_equals_torchvision_on_pil_images(inputs, op, m):
    for img in inputs:
        expected = np.asarray(torchvision_op(Image.fromarray(img), op, m))
        np.testing.assert_array_equal(ours(img, op, m), expected, err_msg=f'{op} {m}')


def _source_positions(op, m, h, w):
    """Where each output pixel samples the input, in continuous pixel coordinates."""
    if op == 'Rotate':
        a = _rotation(m, w, h)
    elif op in ('ShearX', 'ShearY'):
        shear = math.degrees(math.atan(m))
        a = _inverse_affine(0.0, 0.0, 0.0, 0.0, 0.0, *((shear, 0.0) if op == 'ShearX' else (0.0, shear)))
    else:
        t = float(int(m))
        a = _inverse_affine(w / 2, h / 2, 0.0, *((t, 0.0) if op == 'TranslateX' else (0.0, t)), 0.0, 0.0)
    y, x = np.mgrid[0:h, 0:w] + 0.5
    return a[0] * x + a[1] * y + a[2], a[3] * x + a[4] * y + a[5]


@pytest.mark.parametrize('op, m', cases())
def test_op_close_to_torchvision_on_tensors(inputs, op, m):
    for img in inputs:
        got = ours(img, op, m).astype(int)
        tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        expected = torchvision_op(tensor, op, m).permute(1, 2, 0).numpy().astype(int)
        if op in GEOMETRIC:
            u, v = _source_positions(op, m, *img.shape[:2])
            boundary = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v))) < 0.02
            differs = (got != expected).any(axis=2)
            assert not (differs & ~boundary).any(), f'{op} {m}: differs off rounding boundaries'
            assert differs.mean() < 0.01, f'{op} {m}: {differs.mean():.2%} of pixels differ'
        else:
            assert np.abs(got - expected).max() <= 1, f'{op} {m}'


def test_kernels_keep_their_arithmetic_inside_ffcvs_fastmath_pipeline():
    """FFCV compiles decoders with fastmath=True; called from such code, the ops
    must still round as Pillow does. AutoContrast of a [0, 18] image is a case
    where a fused or reassociated multiply-add ends one level lower."""
    import numba as nb
    from PIL import ImageOps

    op = np.uint8(RA_OPS.index('AutoContrast'))

    @nb.njit(fastmath=True)
    def inside_ffcv(img, scratch):
        apply_op(img, scratch, op, np.float32(0.0), 1.0, 1.0)

    rng = np.random.default_rng(0)
    for hi in range(2, 256):
        img = rng.integers(0, hi + 1, (16, 16, 3)).astype(np.uint8)
        img[0, 0], img[0, 1] = 0, hi
        got = img.copy()
        inside_ffcv(got, np.empty_like(got))
        np.testing.assert_array_equal(got, np.asarray(ImageOps.autocontrast(Image.fromarray(img))))
