"""Replays against ml-dr's own: the golden PNGs its training loader (PIL path)
produced for the stored parameters of images 0..63, reinforcements 0 and 1."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, needs_shared
from helpers import psnr
from ffcv_dr.beton import BetonFile
from ffcv_dr.render import render_layout, replay_mixing, replay_view

pytestmark = needs_shared
GOLDEN = {name: os.path.join(SHARED, 'fixtures', f'mldr-{name}', 'golden')
          for name in ('randaug', 'mixing')}


def goldens(name):
    with open(os.path.join(GOLDEN[name], 'index.json')) as f:
        for entry in json.load(f):
            png = os.path.join(GOLDEN[name], entry['png'])
            yield entry['index'], entry['sample'], np.asarray(Image.open(png).convert('RGB'))


@pytest.fixture(params=['randaug', 'mixing'])
def fixture(request):
    return request.param, BetonFile(request.getfixturevalue(f'{request.param}_beton'))


def pil_crop(f: BetonFile, index, params):
    """ml-dr's front end: PIL decode, then torchvision's resized_crop on PIL."""
    top, left, h, w = params['crop']
    img = Image.open(io.BytesIO(f.payload(index).tobytes())).convert('RGB')
    return np.array(img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR))


def test_kernels_after_the_resize_reproduce_mldr_exactly(fixture):
    """Given PIL's decoded and resized crop, flip + RandAugment + erasing + mixing
    are bit-exact: every remaining difference comes from decode and resampling."""
    name, f = fixture
    layout = render_layout(f.recipe)
    size = f.record_dtype.itemsize
    for index, sample, golden in goldens(name):
        rec = f.image_block(index)[sample * size:(sample + 1) * size]
        params = f.describe(index, sample)['params']
        out = pil_crop(f, index, params)
        replay_view(out, rec, layout.own, layout, np.empty_like(out))
        if params.get('pair') is not None:
            paired = pil_crop(f, params['pair'], params['pair_params'])
            replay_view(paired, rec, layout.paired, layout, np.empty_like(paired))
            replay_mixing(out, paired, rec, layout)
        np.testing.assert_array_equal(out, golden, err_msg=f'{name} {index}_{sample}: {params}')


def _tags(params):
    """The op names (and erase/mix steps) a replay involves, for the table."""
    views = [params] + ([params['pair_params']] if params.get('pair_params') else [])
    tags = {op for v in views for op, _ in (v.get('rand_augment') or [])}
    tags |= {'RandomErasing' for v in views if v.get('erase')}
    tags |= {step for step in ('mixup', 'cutmix') if params.get(step) is not None}
    return tags or {'crop+flip only'}


def test_replay_matches_mldr_goldens(fixture, capsys):
    name, f = fixture
    scores, by_tag, wrong = [], {}, []
    for index, sample, golden in goldens(name):
        score = psnr(f.render(index, sample), golden)
        scores.append(score)
        for tag in _tags(f.describe(index, sample)['params']):
            by_tag.setdefault(tag, []).append(score)
        wrong.append(psnr(f.render(index, 1 - sample), golden))  # the other reinforcement
    scores = np.array(scores)
    with capsys.disabled():
        print(f'\n{name}: {len(scores)} goldens, PSNR median {np.median(scores):.1f} dB, '
              f'p5 {np.percentile(scores, 5):.1f}, min {scores.min():.1f}')
        print(f'  {"op":16s} {"count":>5s} {"median":>7s} {"worst":>6s}')
        for tag, s in sorted(by_tag.items(), key=lambda kv: min(kv[1])):
            print(f'  {tag:16s} {len(s):5d} {np.median(s):7.1f} {min(s):6.1f}')
    assert np.median(scores) >= 32 and np.percentile(scores, 5) >= 26 and scores.min() >= 20
    assert max(wrong) < 20  # the test tells reinforcements apart
