"""The compiled pickle reader gives what the restricted unpickler gives, or nothing."""
import io
import os

import numpy as np
import pytest
import torch

from conftest import RANDAUG, SHARED, needs_shared
from ffcv_dr.mldr import (CONFIG_LIMITS, ImageSizes, load_pickle, parse_file, parse_sample,
                          recipe_from_config, sample_limits, unzip_pickle)
from ffcv_dr.mldr.reader import read_views
from ffcv_dr.mldr.records import _view_arrays

NS400 = os.path.join(SHARED, 'fixtures', 'mldr-randaug-ns400', 'reinforced_data')


def _recipe(folder):
    path = os.path.join(folder, 'config.pth.tar')
    return recipe_from_config(load_pickle(open(path, 'rb').read(), path, CONFIG_LIMITS), path, 1000)


def _limits(recipe):
    return sample_limits(recipe.num_samples, recipe.topk)


def _torch_save(obj, protocol):
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    return buf.getvalue()


def _unpickled_views(obj, recipe):
    """What parse_sample reads from an unpickled sample, as read_views lays it out."""
    index, samples = obj
    v = _view_arrays([s['params'] for s in samples], np.arange(len(samples)), recipe, 'x')
    values = np.array([s['prob'][0] for s in samples], np.float64)
    ids = np.array([s['prob'][1] for s in samples])
    return index, v.crops, v.flips, v.has_ra, v.ra, v.has_re, v.erase, values, ids


def _assert_same(got, want):
    assert got[0] == want[0]
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('folder, protocol', [(RANDAUG, None), pytest.param(NS400, None, marks=needs_shared),
                                              pytest.param(NS400, 2, marks=needs_shared)])
def test_reads_mldr_files_as_the_unpickler_does(folder, protocol):
    """ml-dr's own files (protocol 4, framed), and the same content as
    torch.save's default protocol 2 writes it (no frames, other memo opcodes)."""
    recipe = _recipe(folder)
    for i in range(0, 500, 50):
        name = os.path.join(folder, f'{i}.pth.tar')
        data = open(name, 'rb').read()
        obj = load_pickle(data, name, _limits(recipe))
        if protocol:
            data = _torch_save(obj, protocol)
        views = read_views(unzip_pickle(data, name, _limits(recipe)), recipe.ra_ops, recipe.topk)
        assert views is not None
        _assert_same(views, _unpickled_views(obj, recipe))
        sizes = ImageSizes(np.full(500, 4096), np.full(500, 4096))
        fast, slow = parse_file(data, i, recipe, sizes, name), parse_sample(obj, i, recipe, sizes, name)
        assert fast[0].tobytes() == slow[0].tobytes() and fast[1].tobytes() == slow[1].tobytes()


def test_numpy_scalars_are_left_to_the_unpickler():
    recipe = _recipe(RANDAUG)
    name = os.path.join(RANDAUG, '3.pth.tar')
    index, samples = load_pickle(open(name, 'rb').read(), name, _limits(recipe))
    samples[0]['params'][3] = tuple(np.int64(v) for v in samples[0]['params'][3] or (0, 0, 8, 8))
    data = _torch_save((index, samples), 2)
    assert read_views(unzip_pickle(data, name, _limits(recipe)), recipe.ra_ops, recipe.topk) is None
    sizes = ImageSizes(np.full(500, 4096), np.full(500, 4096))
    records, _ = parse_file(data, 3, recipe, sizes, name)
    assert records['erase'][0].tolist() == [int(v) for v in samples[0]['params'][3]]


def test_damaged_bytes_give_nothing_or_what_the_unpickler_gives():
    """Every truncation, and random byte changes: the reader never reads out
    of bounds, and whatever it accepts unpickles to the same values."""
    recipe = _recipe(RANDAUG)
    raw = unzip_pickle(open(os.path.join(RANDAUG, '11.pth.tar'), 'rb').read(), '11.pth.tar', _limits(recipe))
    for cut in range(len(raw)):
        assert read_views(raw[:cut], recipe.ra_ops, recipe.topk) is None
    rng = np.random.default_rng(0)
    accepted = 0
    for _ in range(3000):
        bad = np.frombuffer(raw, np.uint8).copy()
        at = rng.integers(len(bad), size=rng.integers(1, 4))
        bad[at] = rng.integers(256, size=len(at))
        views = read_views(bad.tobytes(), recipe.ra_ops, recipe.topk)
        if views is None:
            continue
        accepted += 1
        obj = load_pickle(bad.tobytes(), "damaged", _limits(recipe))
        _assert_same(views, _unpickled_views(obj, recipe))
    assert accepted > 100  # changed numbers are read, not refused


@pytest.mark.parametrize('protocol', [2, 4])
def test_lists_pickled_in_batches(protocol):
    """Pickle appends over 1000 items in batches; the reader moves the list's
    items to keep them together."""
    recipe = _recipe(RANDAUG)
    name = os.path.join(RANDAUG, '9.pth.tar')
    index, samples = load_pickle(open(name, 'rb').read(), name, _limits(recipe))
    obj = (index, [dict(s, params=list(s['params'])) for s in samples * 200])  # 1600, not all shared
    views = read_views(unzip_pickle(_torch_save(obj, protocol), name, sample_limits(1600, recipe.topk)),
                       recipe.ra_ops, recipe.topk)
    assert views is not None and len(views[1]) == 1600
    _assert_same(views, _unpickled_views(obj, recipe))
