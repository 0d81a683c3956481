"""Crop-aware decoding against PIL's decode of the whole image."""
import io

import cv2
import numpy as np
from PIL import Image

from helpers import psnr
from ffcv_dr.beton import BetonFile
from ffcv_dr.jpeg import dct_scale, decode_crop_resize



def test_region_decode_matches_pils_crop_and_resize(randaug_beton):
    """Only the needed rows and iMCU columns are decoded, scaled in the IDCT when
    the crop is twice the output or more, and resized like PIL's bilinear filter
    (ml-dr's front end), closer to it than OpenCV's INTER_AREA gets."""
    f = BetonFile(randaug_beton)
    scores = {True: [], False: []}
    area_scores = []
    for i in range(0, 500, 5):
        meta = f.image_meta[i]
        h_img, w_img = int(meta['height']), int(meta['width'])
        img = Image.open(io.BytesIO(f.payload(i).tobytes())).convert('RGB')
        for size in (224, 64):
            top, left, h, w = (int(v) for v in f.records(i)[0]['crop'])
            out = np.empty((size, size, 3), np.uint8)
            assert decode_crop_resize(np.array(f.payload(i)), h_img, w_img, top, left, h, w, out)
            crop = img.crop((left, top, left + w, top + h))
            pil = np.array(crop.resize((size, size), Image.BILINEAR))
            scaled = dct_scale(h, w, size, size) > 1
            scores[scaled].append(psnr(out, pil))
            if not scaled:
                area = cv2.resize(np.array(crop), (size, size), interpolation=cv2.INTER_AREA)
                area_scores.append(psnr(area, pil))
    exact, dct = scores[False], scores[True]
    # The same libjpeg decode: what differs is the resampler.
    assert np.median(exact) > 45 and min(exact) > 30, sorted(exact)
    assert np.median(exact) > np.median(area_scores) + 2
    # The scaled crop is snapped to the scaled pixel grid: up to half an output pixel off.
    assert len(dct) > 20 and np.median(dct) > 30 and min(dct) > 20, sorted(dct)


def test_corrupt_jpeg_gives_a_black_image_not_a_crash(randaug_beton):
    f = BetonFile(randaug_beton)
    meta = f.image_meta[0]
    jpeg = np.array(f.payload(0))[:200]
    out = np.full((32, 32, 3), 7, np.uint8)
    h, w = int(meta['height']), int(meta['width'])
    assert not decode_crop_resize(jpeg, h, w, 0, 0, h, w, out)
    assert not out.any()
