"""Conversion of the real imagenet-sample + ml-dr fixtures, and what it stores."""
import json
import os
import pickle

import cv2
import numpy as np
import pytest

from conftest import HAVE_SHARED, IMAGES, MIXING, RANDAUG
from helpers import link_mldr_copy, read_mldr, write_torch_file
from ffcv_dr.beton import BetonFile
from ffcv_dr.cli import main
from ffcv_dr.convert import ConvertError, convert
from ffcv_dr.intake import list_images
from ffcv_dr.jpeg import seekable
from ffcv_dr.format import RA_OPS, Recipe, bytes_per_reinforcement
from ffcv_dr.mldr import MldrError, load_pickle, sample_limits



def test_imagenet_plus_record_fits_64_bytes():
    recipe = Recipe(num_samples=400, topk=10, num_classes=1000, ra_ops=2, erase=True)
    assert bytes_per_reinforcement(recipe) <= 64
    mixing = Recipe(num_samples=400, topk=10, num_classes=1000, ra_ops=2, erase=True, mixing=True)
    assert bytes_per_reinforcement(mixing) > bytes_per_reinforcement(recipe)


def test_stored_records_equal_the_source_pickles(randaug_beton):
    f = BetonFile(randaug_beton)
    images = list_images(IMAGES)
    assert len(f) == len(images.paths) == 500
    assert f.recipe == Recipe(num_samples=8, topk=10, num_classes=1000, ra_ops=2, erase=True, size=224)
    for i in range(0, 500, 7):
        index, samples = read_mldr(os.path.join(RANDAUG, f'{i}.pth.tar'))
        assert index == i
        assert f.label(i) == images.labels[i]
        meta = f.image_meta[i]
        # the original JPEG's coefficients pass through untouched, with restart markers
        stored, original = f.payload(i), np.fromfile(images.paths[i], np.uint8)
        assert seekable(stored) and not seekable(original)
        assert np.array_equal(cv2.imdecode(stored, cv2.IMREAD_UNCHANGED),
                              cv2.imdecode(original, cv2.IMREAD_UNCHANGED))
        for j, sample in enumerate(samples):
            got = f.describe(i, j)
            rrc, flip, ra, erase = sample['params']
            assert got['params']['crop'] == list(rrc)
            assert got['params']['flip'] == flip
            assert got['params']['rand_augment'] == [[RA_OPS[o], pytest.approx(m, abs=0)] for o, m in ra]
            assert got['params']['erase'] == (list(erase) if erase else None)
            want = dict(zip(sample['prob'][1], sample['prob'][0]))
            stored = dict(got['topk'])
            assert sorted(stored) == sorted(want)
            np.testing.assert_allclose([stored[c] for c in want], list(want.values()), atol=1e-3)
        assert rrc[0] + rrc[2] <= meta['orig_height'] and rrc[1] + rrc[3] <= meta['orig_width']


def test_targz_stream_gives_the_same_file(randaug_beton, randaug_targz, tmp_path):
    out = str(tmp_path / 'from_tar.beton')
    convert(IMAGES, out, randaug_targz, num_workers=2)
    a, b = BetonFile(randaug_beton), BetonFile(out)
    for i in range(len(a)):
        assert a.records(i).tobytes() == b.records(i).tobytes()
        assert a.topk(i).tobytes() == b.topk(i).tobytes()
        assert a.payload(i).tobytes() == b.payload(i).tobytes()


def test_mixing_recipe_imports(mixing_beton):
    f = BetonFile(mixing_beton)
    assert f.recipe.mixing and f.recipe.num_samples == 4
    checked = 0
    for i in range(len(f)):
        index, samples = read_mldr(os.path.join(MIXING, f'{i}.pth.tar'))
        for k, sample in enumerate(samples):
            pair, rrc, flip, ra, erase, mixup, cutmix = sample['params']
            got = f.describe(i, k)['params']
            assert got['pair'] == pair and (got['mixup'] is None) == (mixup is None)
            if pair is None:
                assert got['crop'] == list(rrc) and got['erase'] == (list(erase) if erase else None)
                continue
            assert got['crop'] == list(rrc[0]) and got['pair_params']['crop'] == list(rrc[1])
            assert got['pair_params']['erase'] == (list(erase[1]) if erase[1] else None)
            assert (got['cutmix'] is None) == (cutmix is None)
            if cutmix is not None:  # numpy integers in ml-dr's boxes
                assert got['cutmix']['box'] == [int(v) for v in cutmix[1:]]
                checked += 1
    assert checked > 10


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('touch ' + self.marker,))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = str(tmp_path / 'pwned')
    evil = _RunsCode()
    evil.marker = marker
    with pytest.raises(MldrError, match=r'evil\.pth\.tar: refused.*(posix|os)\.system'):
        load_pickle(pickle.dumps((0, [evil])), 'evil.pth.tar', sample_limits(1, 1))
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    write_torch_file(os.path.join(mldr, '3.pth.tar'), (3, [evil]))
    out = tmp_path / 'out.beton'
    with pytest.raises(ConvertError, match=r'3\.pth\.tar: refused'):
        convert(IMAGES, str(out), mldr, num_workers=2)
    assert not os.path.exists(marker)
    assert sorted(os.listdir(tmp_path)) == ['reinforced_data']


@pytest.mark.parametrize('corrupt, message', [
    (lambda s: s[1][2]['prob'][0].__setitem__(0, float('nan')), 'finite'),
    (lambda s: s[1][2]['prob'][0].__setitem__(0, -0.5), r'\[0, 1\]'),
    (lambda s: s[1][2]['prob'][1].__setitem__(0, 1000), r'class ids must be integers in 0\.\.999'),
    (lambda s: s[1][2]['params'].__setitem__(0, (0, 0, 5000, 10)), 'outside'),
    (lambda s: s[1].pop(), 'has 7 reinforcements'),
    (lambda s: s[1][2]['prob'][1].__setitem__(1, s[1][2]['prob'][1][0]), r'reinforcement 2\): class ids repeat'),
    (lambda s: s[1][2]['prob'][0].__setitem__(0, '0.5'), r'reinforcement 2\): expected 10 probabilities'),
    (lambda s: s[1][2]['params'].__setitem__(2, [(14, 0.5), (0, 0.0)]), r'reinforcement 2\): bad RandAugment op'),
    (lambda s: s[1][2]['params'].__setitem__(1, None), r'reinforcement 2\): flip must be a bool'),
])
def test_bad_reinforcements_fail_naming_the_file_and_leave_nothing(tmp_path, corrupt, message):
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    sample = read_mldr(os.path.join(RANDAUG, '17.pth.tar'))
    sample = (sample[0], [dict(s, prob=(list(s['prob'][0]), list(s['prob'][1])), params=list(s['params']))
                          for s in sample[1]])
    corrupt(sample)
    write_torch_file(os.path.join(mldr, '17.pth.tar'), sample)
    out = tmp_path / 'out.beton'
    with pytest.raises(ConvertError, match=r'17\.pth\.tar.*' + message):
        convert(IMAGES, str(out), mldr, num_workers=2)
    assert sorted(os.listdir(tmp_path)) == ['reinforced_data']


def test_missing_index_is_reported(tmp_path):
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    os.remove(os.path.join(mldr, '42.pth.tar'))
    with pytest.raises(ConvertError, match='first missing index: 42'):
        convert(IMAGES, str(tmp_path / 'out.beton'), mldr, num_workers=2)
    assert sorted(os.listdir(tmp_path)) == ['reinforced_data']


def restart_markers(jpeg: np.ndarray) -> int:
    """RSTn markers in a JPEG (entropy data stuffs every other 0xFF with 0x00)."""
    data = jpeg.tobytes()
    return sum(data.count(bytes([0xFF, 0xD0 + n])) for n in range(8))


def test_cli_info_and_replay(randaug_beton, tmp_path, capsys):
    assert main(['info', randaug_beton, '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['images'] == 500 and info['reinforcements_per_image'] == 8 and info['topk'] == 10
    assert info['bytes_per_reinforcement'] == 63
    assert info['param_bytes'] == 500 * 8 * 23 and info['prob_bytes'] == 500 * 8 * 40
    # the originals' coefficients with restart markers (their own markers dropped,
    # Huffman tables optimized): each marker costs its 2 bytes, at most a byte of
    # padding and the first DC difference of each component written in full
    # (at most 2 bytes each); on ImageNet's photos that is at most 2% more
    f = BetonFile(randaug_beton)
    payloads = [f.payload(i) for i in range(500)]
    assert info['image_bytes'] == sum(p.size for p in payloads)
    markers = sum(restart_markers(p) for p in payloads)
    original = sum(os.path.getsize(p) for p in list_images(IMAGES).paths)
    assert info['image_bytes'] - original <= markers * (2 + 1 + 2 * 3)
    if HAVE_SHARED:
        assert 1 < info['image_bytes'] / original <= 1.02
    assert info['stored_jpeg'] == info['seekable_jpeg'] == 500
    assert main(['replay', randaug_beton, '--index', '3', '--sample', '1', '--index', '9',
                 '--sample', '0', '--out', str(tmp_path / 'r')]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x['index'], x['sample']) for x in lines] == [(3, 1), (9, 0)]
    assert sorted(os.listdir(tmp_path / 'r')) == ['3_1.png', '9_0.png']
    assert main(['convert', IMAGES, str(tmp_path / 'x.beton'), '--mldr', str(tmp_path / 'nope')]) == 1
    assert 'nope: no such file' in capsys.readouterr().err


def test_bench_inputs_round_trip(randaug_beton, tmp_path):
    """The ml-dr folder `ffcv-dr bench` writes from a .beton converts back to the
    same records: the baselines it feeds read what the .beton holds; and so
    does its folder of every image twice (its conversion rounds), each copy
    in its place."""
    from ffcv_dr.bench import write_mldr_folder
    f = BetonFile(randaug_beton)
    images, mldr = write_mldr_folder(f, str(tmp_path))
    out = str(tmp_path / 'again.beton')
    convert(images, out, mldr, num_workers=2, num_classes=f.recipe.num_classes)
    g = BetonFile(out)
    classes = sorted({f.label(i) for i in range(len(f))})  # folders are numbered by label
    for i in range(0, 500, 7):
        assert g.label(i) == classes.index(f.label(i)) and np.array_equal(g.payload(i), f.payload(i))
        assert g.records(i).tobytes() == f.records(i).tobytes()
        for a, b in zip(g.topk(i), f.topk(i)):  # same (class, probability) pairs, any order
            assert dict(zip(a['cls'].tolist(), a['prob'].tolist())) == \
                pytest.approx(dict(zip(b['cls'].tolist(), b['prob'].tolist())), abs=1e-3)
    twice, twice_mldr = write_mldr_folder(f, str(tmp_path / 'twice'), copies=2)
    n = 2 * len(f)
    convert(twice, str(tmp_path / 'twice.beton'), twice_mldr, num_workers=2, num_classes=f.recipe.num_classes)
    h = BetonFile(str(tmp_path / 'twice.beton'))
    assert len(h) == n
    for j in range(0, n, 11):
        i = j // 2
        assert h.label(j) == g.label(i) and np.array_equal(h.payload(j), g.payload(i))
        assert h.records(j).tobytes() == g.records(i).tobytes()
