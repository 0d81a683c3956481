"""How each image's pixels are stored: FFCV's ``RGBImageField`` choices.

``original`` (the default) keeps each JPEG's own coefficients and re-encodes
only what the loader cannot take (CMYK, PNG, palette...) or what
``max_resolution`` shrinks. The other modes mean what they mean to FFCV's
``RGBImageField``, as ffcv-imagenet writes ImageNet
(``write_mode='proportion', compress_probability=0.5, max_resolution=500,
jpeg_quality=90``): every image is decoded to RGB, shrunk with INTER_AREA
when its longer side exceeds ``max_resolution``, then stored as

- ``jpg``: a JPEG re-encoded by OpenCV at ``jpeg_quality`` (4:2:0);
- ``raw``: its pixels, which the loader crops without decoding;
- ``proportion``: a JPEG with probability ``compress_probability``, else raw;
- ``smart``: raw, or a JPEG when the pixels take more than ``smart_threshold`` bytes.

Every stored JPEG is then rewritten losslessly with restart markers
(:func:`ffcv_dr.jpeg.add_restarts`, its Huffman-coded data re-marked without
decoding to pixels): the same pixels, and the loader entropy-decodes only
the part of it that a crop covers.

FFCV draws ``proportion``'s coin from the global numpy state; here it is a
pure function of the image's index, so ``reinforce`` (which renders each
image as it will be stored, before writing) and the writer agree, and a
rerun writes the same file. Stored boxes always stay in original-image
pixels; the loader maps them onto the stored size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from .format import STORED_JPEG, STORED_RAW
from .jobs import ConvertError
from .jpeg import add_restarts, check_jpeg
from .replay_clock import uniform

WRITE_MODES = ('original', 'jpg', 'raw', 'proportion', 'smart')
FORMAT_REENCODE = dict(quality=95, subsampling=0)   # original mode: keep the detail of CMYK, PNG...
_PROPORTION_SEED = 0x50524F50                        # seed word of proportion's coin ('PROP')


@dataclass(frozen=True)
class Storage:
    write_mode: str = 'original'
    max_resolution: Optional[int] = None
    compress_probability: float = 0.5
    jpeg_quality: int = 90
    smart_threshold: Optional[int] = None

    def __post_init__(self):
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f'write mode must be one of {", ".join(WRITE_MODES)}, got {self.write_mode!r}')
        if self.max_resolution is not None and self.max_resolution < 1:
            raise ValueError(f'max resolution must be at least 1, got {self.max_resolution}')
        if not 0 <= self.compress_probability <= 1:
            raise ValueError(f'compress probability must be in [0, 1], got {self.compress_probability}')
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f'JPEG quality must be in 1..100, got {self.jpeg_quality}')

    def stored_size(self, width: int, height: int) -> tuple:
        """The size an image of ``width`` x ``height`` is stored at (FFCV's resizer)."""
        ratio = self.max_resolution / max(width, height) if self.max_resolution else 1.0
        if ratio >= 1:
            return width, height
        return max(1, int(ratio * width)), max(1, int(ratio * height))

    def mode_for(self, index: int, width: int, height: int) -> str:
        """'jpg' or 'raw' for an FFCV write mode; the stored size decides 'smart'."""
        if self.write_mode == 'proportion':
            return 'jpg' if uniform(_PROPORTION_SEED, 0, index, 0) < self.compress_probability else 'raw'
        if self.write_mode == 'smart':
            big = self.smart_threshold is not None and width * height * 3 > self.smart_threshold
            return 'jpg' if big else 'raw'
        return self.write_mode


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert('RGB'))  # what ml-dr's PIL loader sees


def _shrink(rgb: np.ndarray, size: tuple) -> np.ndarray:
    import cv2
    if size == (rgb.shape[1], rgb.shape[0]):
        return rgb
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """OpenCV's JPEG, as FFCV's RGBImageField encodes it."""
    import cv2
    ok, data = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError('OpenCV could not encode the image as JPEG')
    return add_restarts(data.reshape(-1))


def stored_image(path: str, index: int, width: int, height: int, passthrough: bool,
                 storage: Storage) -> tuple:
    """(payload, stored width, stored height, mode) of image ``index``: the
    bytes to store and ``STORED_JPEG`` or ``STORED_RAW``. ``passthrough``
    (from the header probe): a JPEG the loader takes as it is."""
    size = storage.stored_size(width, height)
    if storage.write_mode == 'original':
        if passthrough and size == (width, height):
            with open(path, 'rb') as f:
                data = np.frombuffer(f.read(), np.uint8)
            stored = add_restarts(data)
            if stored is data:   # not re-marked: an 8-bit grey or colour JPEG only when damaged
                problem = check_jpeg(data)[0]
                if problem:
                    raise ConvertError(f'{path}: {problem}: it does not decode completely '
                                       '(--skip-bad leaves such images out)')
            return stored, width, height, STORED_JPEG
        rgb = _rgb(path)
        if size != (width, height):
            return encode_jpeg(_shrink(rgb, size), storage.jpeg_quality), *size, STORED_JPEG
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format='JPEG', **FORMAT_REENCODE)
        return add_restarts(np.frombuffer(buf.getvalue(), np.uint8)), width, height, STORED_JPEG
    rgb = _shrink(_rgb(path), size)
    if storage.mode_for(index, *size) == 'jpg':
        return encode_jpeg(rgb, storage.jpeg_quality), *size, STORED_JPEG
    return np.ascontiguousarray(rgb).reshape(-1), *size, STORED_RAW
