"""Image intake: an ImageFolder listed in torchvision's order, with ImageNet
class ids where the folders are ImageNet synsets, and every image's size and
storage decision read from its header (in parallel for large folders)."""
from __future__ import annotations

import functools
import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .format import MAX_SIDE
from .jobs import ConvertError, printable, regular_file
from .jpeg import check_jpeg, jpeg_header
from .mldr import ImageSizes

_FORK = mp.get_context('fork')


@dataclass
class ImageList:
    paths: list
    labels: np.ndarray
    classes: list
    num_classes: int
    class_space: str
    indices: np.ndarray = None   # ImageFolder index of each image (differs after skipping)

    def __post_init__(self):
        if self.indices is None:
            self.indices = np.arange(len(self.paths))


@functools.lru_cache(maxsize=1)
def _imagenet_synsets() -> tuple:
    from timm.data import ImageNetInfo
    return tuple(ImageNetInfo('imagenet-1k').label_names())


def list_images(images_dir: str, num_classes: int = None) -> ImageList:
    """Images in ``torchvision.datasets.ImageFolder`` order (index i = i-th sample).

    When every class folder is an ImageNet-1k synset (wnid), labels are
    ImageNet-1k class indices, the space teachers' probabilities live in."""
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(images_dir):
        raise ConvertError(f'{images_dir}: not a directory')
    _folders_once(images_dir)
    try:
        folder = ImageFolder(images_dir, loader=lambda p: p)
    except (FileNotFoundError, RuntimeError) as e:
        raise ConvertError(f'{images_dir}: not an image folder ({e})') from None
    paths = [regular_file(p, missing_ok=True) for p, _ in folder.samples]  # the probe reports those
    labels = np.array([y for _, y in folder.samples], np.int64)
    classes, space = folder.classes, 'folder'
    synsets = _imagenet_synsets()
    if (num_classes in (None, len(synsets))) and set(classes) <= set(synsets):
        index = {s: k for k, s in enumerate(synsets)}
        labels = np.array([index[classes[y]] for y in labels], np.int64)
        classes, space = list(synsets), 'imagenet-1k'
    if num_classes is None:
        num_classes = len(classes)
    if labels.size and labels.max() >= num_classes:
        raise ConvertError(f'{images_dir}: {len(classes)} classes do not fit --num-classes {num_classes}')
    return ImageList(paths, labels, classes, num_classes, space)


def _folders_once(root: str):
    """Refuse a folder that symbolic links reach twice: ImageFolder follows
    them, so a link to an ancestor lists its images without end (until the
    path is too long) and two links to one folder list them twice."""
    seen = {}
    for folder, _, _ in os.walk(root, followlinks=True):
        st = os.stat(folder)
        first = seen.setdefault((st.st_dev, st.st_ino), folder)
        if first != folder:
            raise ConvertError(f'{printable(folder)}: is {printable(first)} again, through a symbolic '
                               'link (a cycle, or two links to one folder): its images would be listed '
                               'more than once')


def _probe_image(args):
    """(path, (width, height, passthrough) or None, problem or None) of an image.
    JPEGs of 1 or 3 components (what PIL opens as L or RGB) are read by
    libjpeg from their header, in a tenth of PIL's time; anything else by PIL.
    With ``decode_all`` (``--skip-bad``) every JPEG is decoded (at 1/8 scale)
    to find those that do not decode completely; otherwise only those without
    an end marker are, and the writer refuses the others when it re-marks
    them (:func:`ffcv_dr.storage.stored_image`)."""
    path, max_resolution, decode_all = args
    try:
        with open(path, 'rb') as f:
            data = f.read()
        header = jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS  # beyond it, PIL warns or refuses
        if header and header[2] in (1, 3) and header[3] == 8 and (not limit or header[0] * header[1] <= limit):
            (width, height), passthrough = header[:2], True
        else:
            with Image.open(path) as img:
                width, height = img.size
                passthrough = img.format == 'JPEG' and img.mode in ('RGB', 'L')
        if passthrough:
            problem = check_jpeg(data)[0] if decode_all else _truncated_jpeg(data)
            if problem:
                return path, None, f'{path}: {problem}'
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return path, None, f'{path}: unreadable image ({type(e).__name__}: {e})'
    if max_resolution and max(width, height) > max_resolution:
        passthrough = False
    return path, (width, height, passthrough), None


def _truncated_jpeg(data: bytes):
    """A problem with a JPEG that does not end in an EOI marker (the mark of an
    interrupted download), found by decoding it; None otherwise. Whole files
    are decoded only then: decoding every image would double the conversion
    time."""
    if b'\xff\xd9' in data[-64:].rstrip(b'\x00\r\n '):
        return None
    return check_jpeg(data)[0]


# Images per work item of FFCV's writer; its default (100) leaves workers idle
# at the end of small datasets.


POOL_MIN_IMAGES = 2000


def probe_images(images: ImageList, max_resolution, num_workers, skip_bad: bool = False):
    """(width, height, passthrough) of every image, read from headers in parallel.
    An unreadable image stops everything, or with ``skip_bad`` is reported and
    gets None."""
    work = [(p, max_resolution, skip_bad) for p in images.paths]
    # A header takes ~60 us to read; starting a pool (forking a process that
    # has torch loaded) ~0.1 s: small folders are read faster in-process.
    pool = _FORK.Pool(num_workers) if len(work) > POOL_MIN_IMAGES else None
    try:
        probes = []
        for path, probe, error in tqdm(pool.imap(_probe_image, work, chunksize=64) if pool else
                                       map(_probe_image, work), total=len(work),
                                       desc='reading image headers', unit='img'):
            if error and not skip_bad:
                raise ConvertError(error)
            if error:
                tqdm.write(f'skipping {printable(error)}')
            probes.append(probe)
    finally:
        if pool:
            pool.terminate()
    for path, probe in zip(images.paths, probes):
        if probe and max(probe[:2]) > MAX_SIDE:
            raise ConvertError(f'{path}: {probe[0]}x{probe[1]} is larger than the {MAX_SIDE} pixels a side '
                               'that crop boxes address; shrink it before converting')
    return probes


def readable(images: ImageList, probes):
    """The images (and probes) that :func:`probe_images` could read, and the
    paths of the others."""
    keep = np.array([p is not None for p in probes], bool)
    kept = ImageList([p for p, k in zip(images.paths, keep) if k], images.labels[keep],
                     images.classes, images.num_classes, images.class_space, images.indices[keep])
    return kept, [p for p in probes if p is not None], [p for p, k in zip(images.paths, keep) if not k]


def image_sizes(probes) -> ImageSizes:
    """Original sizes by ImageFolder index; 0x0 for skipped images."""
    return ImageSizes(np.array([p[0] if p else 0 for p in probes], np.int64),
                      np.array([p[1] if p else 0 for p in probes], np.int64))
