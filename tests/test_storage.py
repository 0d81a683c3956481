"""FFCV's storage choices (raw pixels, re-encoded JPEGs, a proportion of
each, shrunk to a maximum side): what is stored, and that the loader replays
the stored boxes on it as ml-dr does on the original image."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import needs_shared
from helpers import psnr
from test_fidelity import goldens
from ffcv_dr.beton import BetonFile
from ffcv_dr.cli import main
from ffcv_dr.format import STORED_JPEG, STORED_RAW
from ffcv_dr.storage import Storage
from ffcv_dr.verify import verify



def test_what_is_stored(stored_beton, randaug_beton):
    mode, path = stored_beton
    f, orig = BetonFile(path), BetonFile(randaug_beton)
    kinds = f.image_meta['mode']
    storage = Storage('proportion', 500, 0.5, 90)
    if mode == 'raw':
        assert (kinds == STORED_RAW).all()
    else:  # FFCV's proportion: a coin per image, here a pure function of the index
        assert 20 <= (kinds == STORED_JPEG).sum() <= 44 and set(kinds) == {STORED_JPEG, STORED_RAW}
        assert [storage.mode_for(i, 1, 1) == 'jpg' for i in range(64)] == list(kinds == STORED_JPEG)
    shrunk = 0
    for i in range(64):
        m, o = f.image_meta[i], orig.image_meta[i]
        assert (m['orig_width'], m['orig_height']) == (o['width'], o['height'])  # the boxes' pixels
        np.testing.assert_array_equal(f.records(i), orig.records(i))
        rgb = np.asarray(Image.open(io.BytesIO(orig.payload(i).tobytes())).convert('RGB'))
        if m['mode'] == STORED_RAW:
            stored = f.payload(i).reshape(m['height'], m['width'], 3)
        else:
            stored = np.asarray(Image.open(io.BytesIO(f.payload(i).tobytes())).convert('RGB'))
        assert stored.shape == (m['height'], m['width'], 3)
        if mode == 'raw':
            np.testing.assert_array_equal(stored, rgb)  # the decoded original, untouched
        elif max(rgb.shape[:2]) > 500:  # FFCV's resizer: INTER_AREA, sides rounded down
            assert stored.shape[:2] == storage.stored_size(rgb.shape[1], rgb.shape[0])[::-1]
            assert 499 <= max(stored.shape[:2]) <= 500
            shrunk += 1
        else:
            assert stored.shape == rgb.shape and psnr(stored, rgb) > 25  # q90, 4:2:0 chroma
    assert mode == 'raw' or shrunk >= 2
    assert verify(path).ok


@needs_shared
def test_stored_boxes_replay_as_mldr_on_every_storage(stored_beton, randaug_beton, capsys):
    """Each mode's replays against ml-dr's goldens; raw pixels, never re-encoded
    nor DCT-scaled, come closer than the original JPEG bytes."""
    mode, path = stored_beton
    f, orig = BetonFile(path), BetonFile(randaug_beton)
    scores = {STORED_JPEG: [], STORED_RAW: []}
    base = []
    for index, sample, golden in goldens('randaug'):
        scores[int(f.image_meta[index]['mode'])].append(psnr(f.render(index, sample), golden))
        base.append(psnr(orig.render(index, sample), golden))
    with capsys.disabled():
        for kind, s in scores.items():
            if s:
                print(f'\n{mode}, stored {"raw" if kind else "JPEG"}: {len(s)} goldens, PSNR median '
                      f'{np.median(s):.1f} dB, p5 {np.percentile(s, 5):.1f}, min {min(s):.1f} '
                      f'(original bytes: median {np.median(base):.1f})')
    everything = np.array(scores[STORED_JPEG] + scores[STORED_RAW])
    assert np.median(everything) >= 30 and np.percentile(everything, 5) >= 22
    if mode == 'raw':
        assert np.median(everything) > np.median(base) and everything.min() >= 20


def test_loader_and_info_on_a_proportion_file(stored_beton, capsys):
    from ffcv.loader import OrderOption
    from ffcv_dr import Loader
    mode, path = stored_beton
    f = BetonFile(path)
    loader = Loader(path, batch_size=16, num_workers=2, order=OrderOption.SEQUENTIAL, seed=1,
                    indices=np.arange(32), reinforcement_index=True)
    for b, (images, targets, js) in enumerate(loader):
        for k in range(16):
            i = 16 * b + k
            np.testing.assert_array_equal(images[k].numpy(), f.render(i, int(js[k]), 1, loader.clock.epoch))
    assert main(['info', path, '--json']) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    raw = int((f.image_meta['mode'] == STORED_RAW).sum())
    assert (info['stored_jpeg'], info['stored_raw']) == (64 - raw, raw)
    assert info['image_bytes'] == sum(f.payload(i).size for i in range(64))


def test_storage_settings_are_checked():
    with pytest.raises(ValueError, match='write mode must be one of'):
        Storage('png')
    with pytest.raises(ValueError, match='compress probability'):
        Storage('proportion', compress_probability=1.5)
    assert Storage(max_resolution=500).stored_size(2400, 1632) == (500, 340)  # FFCV's rounding down
    assert Storage('smart', smart_threshold=100 * 100 * 3).mode_for(0, 100, 101) == 'jpg'
    assert Storage('smart', smart_threshold=100 * 100 * 3).mode_for(0, 100, 100) == 'raw'
