"""Hostile pickles within the allowed opcodes fail at once, naming the pickle
and the limit, before anything is unpickled or inflated: in a file, in a
torch.save zip, in a reinforced_data folder and inside a .tar.gz."""
import gzip
import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from conftest import IMAGES, RANDAUG
from ffcv_dr.convert import ConvertError, convert
from ffcv_dr.format import Recipe
from ffcv_dr.mldr import CONFIG_LIMITS, ImageSizes, MldrError, load_pickle, parse_file, sample_limits
from helpers import link_mldr_copy, read_mldr, write_targz

RECIPE = Recipe(num_samples=8, topk=10, num_classes=1000, ra_ops=2, erase=True)
LIMITS = sample_limits(RECIPE.num_samples, RECIPE.topk)
SIZES = ImageSizes(np.full(500, 4096), np.full(500, 4096))


def mldr_layout(params: bytes) -> bytes:
    """A pickle of ml-dr's layout, ``(7, [{"params": P, "prob": (values,
    ids)}] * 8)``, where the opcodes ``params`` push P (shared by all 8)."""
    prob = pickle.dumps(([0.1] * 10, list(range(10))), 2)[2:-1]
    sample = b'}(\x8c\x06params' + b'j\x00\x00\x01\x00' + b'\x8c\x04prob' + prob + b'u'
    return b'\x80\x02' + params + b'r\x00\x00\x01\x000' + b'K\x07](' + sample * 8 + b'e\x86.'


def laughs(levels=7, width=10) -> bytes:
    """Each list of level k holds ``width`` references to the one of level
    k - 1: 1 KB whose ``params`` unpickle to width**levels values (10**7)."""
    out = bytearray()
    for k in range(levels):
        item = b'K\x01' if k == 0 else b'j' + (k - 1).to_bytes(4, 'little')
        out += b']r' + k.to_bytes(4, 'little') + b'(' + item * width + b'e' + (b'0' if k < levels - 1 else b'')
    return mldr_layout(bytes(out))


def deep(depth=1500) -> bytes:
    """Each ``params`` one list nested ``depth`` deep: what repr cannot walk."""
    return mldr_layout(b']' * depth + b'a' * (depth - 1))


def torch_zip(pickle_bytes: bytes, compress=zipfile.ZIP_STORED) -> bytes:
    """A torch.save archive around ``pickle_bytes``, as ml-dr's files are."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compress) as zf:
        zf.writestr('archive/data.pkl', pickle_bytes)
        zf.writestr('archive/version', b'3\n')
    return buf.getvalue()


HOSTILE = {  # name -> (pickle bytes, what the error says)
    'laughs': (laughs(), f'expands to more than {LIMITS.items} values through shared references'),
    'bytes8': (b'\x80\x04\x8e' + (1 << 62).to_bytes(8, 'little') + b'.', r'declares \d+ bytes for one value, more than it holds'),
    'bytearray8': (b'\x80\x05\x96' + (1 << 40).to_bytes(8, 'little') + b'xx.', 'more than it holds'),
    'deep': (deep(), 'nests deeper than 24 levels'),
    'memo_key': (b'\x80\x02Nr\xff\xff\xff\x7f.', 'uses memo key 2147483647, out of range'),
    'recursive': (pickle.dumps((lambda x: (x.append(x), x)[1])([]), 2), 'changes a container after placing it'),
    'long_bomb': (b'\x80\x02(' + b'\x8b\x00\x00\x00\x40' + b'.', 'more than it holds'),
}


@pytest.mark.parametrize('name', HOSTILE)
@pytest.mark.parametrize('wrapped', [False, True], ids=['bare', 'zip'])
def test_hostile_pickles_are_refused_naming_the_pickle_and_the_limit(name, wrapped):
    data, message = HOSTILE[name]
    with pytest.raises(MldrError, match=rf'^7\.pth\.tar: refused: the pickle .*{message}'):
        parse_file(torch_zip(data) if wrapped else data, 7, RECIPE, SIZES, '7.pth.tar')


def test_the_limits_fit_ml_dr_files_of_each_size():
    """A file as large as the recipe allows, pickled as ml-dr does, passes;
    the limits grow with the number of reinforcements."""
    sample = {'params': [[1, 2, 3, 4], True, [(5, 0.3), (9, 7.0)], [10, 20, 30, 40]],
              'prob': ([0.1] * 10, list(range(10)))}
    for n in (1, 8, 400):
        limits = sample_limits(n, 10)
        obj = (3, [dict(sample, params=list(sample['params'])) for _ in range(n)])
        index, samples = load_pickle(pickle.dumps(obj, 2), 'x.pth.tar', limits)
        assert index == 3 and samples == obj[1]
    assert sample_limits(400, 10).items > 100 * sample_limits(1, 10).items


def test_a_shared_reference_within_the_limit_is_read():
    """Memo gets are how pickle writes repeated objects: counted, not refused."""
    row = [0.5] * 10
    obj = (0, [{'params': [[0, 0, 8, 8], False, None, None], 'prob': (row, list(range(10)))}] * 8)
    index, samples = load_pickle(pickle.dumps(obj, 2), 'x.pth.tar', LIMITS)
    assert samples == obj[1]


def test_a_zip_member_is_refused_by_its_declared_size_before_inflating():
    """16 KB of deflate that would inflate to 16 MB, 200 times the limit."""
    bomb = torch_zip(b'\x80\x02' + b'N0' * (8 << 20) + b'N.', zipfile.ZIP_DEFLATED)
    assert len(bomb) < 1 << 16
    with pytest.raises(MldrError, match=r'^b\.pth\.tar: refused: archive/data\.pkl declares 16777220 '
                                        r'bytes, more than the \d+ an ml-dr pickle of this recipe'):
        parse_file(bomb, 0, RECIPE, SIZES, 'b.pth.tar')


def test_an_oversized_config_is_refused():
    data = pickle.dumps({'reinforce': {'pad': 'x' * (2 << 20)}}, 2)
    with pytest.raises(MldrError, match=r'^config\.pth\.tar: refused: \d+ bytes, more than the'):
        load_pickle(data, 'config.pth.tar', CONFIG_LIMITS)


def _write_zip(path, pickle_bytes):
    if os.path.lexists(path):
        os.remove(path)
    with open(path, 'wb') as f:
        f.write(torch_zip(pickle_bytes))


@pytest.mark.parametrize('name', ['laughs', 'bytes8', 'deep'])
def test_convert_names_the_hostile_file(tmp_path, name):
    """Formerly "brambling.JPEG: MemoryError", minutes and gigabytes later."""
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    _write_zip(os.path.join(mldr, '3.pth.tar'), HOSTILE[name][0])
    with pytest.raises(ConvertError, match=rf'reinforced_data/3\.pth\.tar: refused: the pickle .*{HOSTILE[name][1]}'):
        convert(IMAGES, str(tmp_path / 'x.beton'), mldr, num_workers=2)
    assert sorted(os.listdir(tmp_path)) == ['reinforced_data']


def test_convert_refuses_an_oversized_file_unread(tmp_path):
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    os.remove(os.path.join(mldr, '5.pth.tar'))
    with open(os.path.join(mldr, '5.pth.tar'), 'wb') as f:
        f.truncate(64 << 30)  # sparse: 64 GB that take no disk
    with pytest.raises(ConvertError, match=r'5\.pth\.tar: refused: 68719476736 bytes, more than the \d+ '
                                           r'an ml-dr file of this recipe can need'):
        convert(IMAGES, str(tmp_path / 'x.beton'), mldr, num_workers=2)


def _members(replaced):
    names = ['config'] + list(range(500))
    return [(f'reinforced_data/{i}.pth.tar', replaced.get(i) or open(os.path.join(RANDAUG, f'{i}.pth.tar'), 'rb').read())
            for i in names]


def test_hostile_pickles_inside_anwrite_targz(tmp_path):
    path = write_targz(tmp_path / 'r.tar.gz', _members({4: torch_zip(laughs())}))
    with pytest.raises(ConvertError, match=r'r\.tar\.gz:reinforced_data/4\.pth\.tar: refused: the pickle '
                                           'expands to more than'):
        convert(IMAGES, str(tmp_path / 'x.beton'), path, num_workers=2)
    config = read_mldr(os.path.join(RANDAUG, 'config.pth.tar'))
    config['pad'] = [config['reinforce']] * 1000
    path = write_targz(tmp_path / 'c.tar.gz', _members({'config': torch_zip(pickle.dumps(config, 2))}))
    convert(IMAGES, str(tmp_path / 'y.beton'), path, num_workers=2)  # shared references, but few
    config['pad'] = [config['pad']] * 1000
    path = write_targz(tmp_path / 'd.tar.gz', _members({'config': torch_zip(pickle.dumps(config, 2))}))
    with pytest.raises(ConvertError, match=r'd\.tar\.gz:reinforced_data/config\.pth\.tar: refused: the '
                                           'pickle expands to more than 100000 values'):
        convert(IMAGES, str(tmp_path / 'z.beton'), path, num_workers=2)


def test_an_archive_member_is_refused_by_its_declared_size(tmp_path):
    """A header that declares 1 TB is refused before anything is read from it."""
    info = tarfile.TarInfo('reinforced_data/2.pth.tar')
    info.size = 1 << 40
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode='w')
    for name, data in _members({})[:3]:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    path = tmp_path / 'r.tar.gz'  # the members so far, then the header, and the archive ends
    path.write_bytes(gzip.compress(buf.getvalue()[:tar.offset] + info.tobuf() + b'\0' * 4096))
    with pytest.raises(ConvertError, match=r'r\.tar\.gz:reinforced_data/2\.pth\.tar: refused: declares '
                                           r'1099511627776 bytes, more than the \d+'):
        convert(IMAGES, str(tmp_path / 'x.beton'), str(path), num_workers=2)
