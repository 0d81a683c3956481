"""The tests' data where ``../shared`` is absent (a contributor's clone), made
here with ffcv-dr's own tools: an ImageFolder shaped like ``../shared``'s
ImageNet sample (500 JPEGs in ImageNet synset folders, a few grayscale, sizes
from 56 px to 800 px), cut from the photos that ship with scikit-image, and
ml-dr reinforcements of it labelled by the bundled EfficientNet-Lite0 and
written in ml-dr's own format (:mod:`ffcv_dr.mldr.export`). Built once per
machine (about two minutes on two cores) into the temporary folder, named for
this file's contents so that a change rebuilds it."""
import hashlib
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

NUM_IMAGES = 500
MIXING_IMAGES = 64
ROOT = os.path.join(tempfile.gettempdir(), 'ffcv-dr-test-data-' + hashlib.sha256(
    open(__file__, 'rb').read()).hexdigest()[:12])
IMAGES = os.path.join(ROOT, 'imagenet-like', 'train')
RANDAUG = os.path.join(ROOT, 'mldr-randaug', 'reinforced_data')
MIXING = os.path.join(ROOT, 'mldr-mixing', 'reinforced_data')


def _write_images(root: str, n: int):
    """``n`` JPEGs cut from scikit-image's photos, one per ImageNet synset (every
    other one, sorted), shaped as ImageNet's: crops of 20-100% of a photo in
    ImageNet's usual aspect ratios, 56 to 800 px on the long side, flipped or
    not, 2% grayscale, quality 70-95, 4:2:0 or 4:4:4."""
    import skimage.data
    from ffcv_dr.demo import PHOTOS
    from ffcv_dr.intake import _imagenet_synsets
    photos = [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(_imagenet_synsets()[::2][:n]):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        aspect = rng.choice([4 / 3, 4 / 3, 3 / 4, 1.0, 3 / 2]) * rng.uniform(0.95, 1.05)  # width / height
        cw = min(w, int(np.sqrt(rng.uniform(0.2, 1.0) * h * w * aspect)))
        ch = min(h, int(cw / aspect))
        top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        img = Image.fromarray(photo[top:top + ch, left:left + cw])
        side = int(rng.integers(56, 801))
        img = img.resize((side, max(1, round(side * ch / cw))) if cw >= ch else
                         (max(1, round(side * cw / ch)), side), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = img.convert('L' if rng.random() < 0.02 or img.mode == 'L' and rng.random() < 0.1 else 'RGB')
        os.makedirs(os.path.join(root, wnid))
        img.save(os.path.join(root, wnid, f'{wnid}_{k}.JPEG'), quality=int(rng.integers(70, 96)),
                 subsampling=int(rng.choice([0, 2])))


def _reinforced(images: str, work: str, mldr: str, **settings):
    """Reinforce ``images`` with the bundled teacher, then write ml-dr's files."""
    from ffcv_dr.beton import BetonFile
    from ffcv_dr.mldr.export import write_mldr_files
    from ffcv_dr.reinforce import reinforce
    beton = os.path.join(work, 'reinforced.beton')
    reinforce(images, beton, topk=10, size=224, num_workers=os.cpu_count(), **settings)
    write_mldr_files(BetonFile(beton), mldr)
    os.remove(beton)


def build() -> str:
    """Make the data unless it is there; returns its root."""
    if os.path.isdir(ROOT):
        return ROOT
    tmp = tempfile.mkdtemp(prefix=os.path.basename(ROOT) + '.', dir=os.path.dirname(ROOT))
    try:
        images = os.path.join(tmp, 'imagenet-like', 'train')
        _write_images(images, NUM_IMAGES)
        _reinforced(images, tmp, os.path.join(tmp, 'mldr-randaug', 'reinforced_data'),
                    samples=8, recipe='rrc+ra+re')
        first = os.path.join(tmp, 'first')
        for wnid in sorted(os.listdir(images))[:MIXING_IMAGES]:
            shutil.copytree(os.path.join(images, wnid), os.path.join(first, wnid))
        _reinforced(first, tmp, os.path.join(tmp, 'mldr-mixing', 'reinforced_data'),
                    samples=4, recipe='rrc+ra+re+mix')
        shutil.rmtree(first)
        os.rename(tmp, ROOT)  # whole or not at all; a concurrent build may have won
    except OSError:
        if not os.path.isdir(ROOT):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ROOT
