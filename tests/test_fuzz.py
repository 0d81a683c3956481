"""No file can crash the loader: valid small files (scikit-image photos,
reinforced here with the bundled teacher), mutated field by field, opened and
loaded in child processes (tests/fuzz.py). A signal, a hang, or a soft target
that is not finite and normalised fails; a clear error naming the file, or a
correct load, passes. A damaged record falls back to a fresh augmentation with
its label, in image and target alike, and ``verify`` flags exactly the samples
the loader found damaged."""
import os

import numpy as np
import pytest
from PIL import Image

import fuzz
from ffcv_dr.format import RECIPE_DTYPE
from ffcv_dr.verify import verify


def _photos(root, per_photo):
    """An ImageFolder of scikit-image photos, each as ``per_photo`` crops of
    different sizes (64 to 190 px), so that files stay small."""
    import skimage.data
    from ffcv_dr.demo import PHOTOS
    for name in PHOTOS:
        rgb = np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert('RGB'))
        os.makedirs(root / name)
        for k in range(per_photo):
            side = 64 + 18 * k
            Image.fromarray(rgb[k * 7:, k * 5:]).resize((side, side + 9 * (k % 3))).save(
                root / name / f'{k}.jpg', quality=90)
    return str(root)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """(ImageNet+ recipe file of 16 images, mixing recipe file of 64)."""
    from ffcv_dr.reinforce import reinforce
    root = tmp_path_factory.mktemp('fuzz')
    out = {}
    for recipe, per_photo in (('rrc+ra+re', 2), ('rrc+ra+re+mix', 8)):
        path = str(root / f'{recipe}.beton')
        reinforce(_photos(root / recipe, per_photo), path, samples=2, topk=5, recipe=recipe, size=64,
                  batch_size=32, num_workers=2, chunk=64)
        out[recipe] = path
    return out['rrc+ra+re'], out['rrc+ra+re+mix']


def _recipe_offset(path, field, name):
    args = fuzz.arguments_offset(path, field)
    return args, args + RECIPE_DTYPE.fields[name][1]


def _metadata_offset(path, field, column, sample):
    from ffcv.types import HeaderType
    from ffcv_dr.beton import BetonFile
    f = BetonFile(path)
    dtype = f.reader.metadata.dtype
    start = HeaderType.itemsize + f.reader.field_descriptors.nbytes
    k = f.reader.field_names.index(field)
    return start + sample * dtype.itemsize + dtype.fields[f'f{k}'][1] + dtype.fields[f'f{k}'][0].fields[column][1]


def _recipe(field, name, value, dtype, fix=True):
    """A structure mutation of one recipe field, its CRC made to match (as a
    crafted file would) unless ``fix`` is False."""
    def make(path):
        args, at = _recipe_offset(path, field, name)
        return at, np.array(value).astype(dtype).tobytes(), fuzz.crc_span_of(args, RECIPE_DTYPE) if fix else None
    return make


def _meta(field, column, value, dtype, sample=3):
    def make(path):
        return _metadata_offset(path, field, column, sample), np.array(value).astype(dtype).tobytes(), None
    return make


def _records(field, value, dtype, samples):
    """``field`` (its first element) of every record of ``samples``, written in
    place (verify's CRCs are not the loader's concern)."""
    def make(path):
        from ffcv_dr.beton import BetonFile
        f = BetonFile(path)
        at = f.record_dtype.fields[field][1]
        raw = np.array(value).astype(dtype).tobytes()
        writes = []
        for i in samples:
            for j in range(f.recipe.num_samples):
                writes.append((int(f.image_meta[i]['data_ptr']) + j * f.record_dtype.itemsize + at, raw))
        return writes, None, None
    return make


def _stored_size(make_size, sample=3):
    """The stored width and height of ``sample`` replaced by ``make_size(width, height)``."""
    def make(path):
        from ffcv_dr.beton import BetonFile
        meta = BetonFile(path).image_meta[sample]
        width, height = make_size(int(meta['width']), int(meta['height']))
        assert (width, height) != (meta['width'], meta['height'])
        return [(_metadata_offset(path, 'image', 'width', sample), np.uint16(width).tobytes()),
                (_metadata_offset(path, 'image', 'height', sample), np.uint16(height).tobytes())], None, None
    return make


def _header(name, value, dtype):
    def make(path):
        from ffcv.types import HeaderType
        return HeaderType.fields[name][1], np.array(value).astype(dtype).tobytes(), None
    return make


def _both(name, value, dtype):
    """The same recipe change in both fields' copies, as a crafted file would make it."""
    return [_recipe('image', name, value, dtype), _recipe('target', name, value, dtype)]


RECORDS = ('damaged records: partner index past the end, RandAugment op ids out of range, '
           'a RandAugment magnitude of 1e9')
# The crash classes found by patching single fields of a valid file (issue 16),
# each on the file where it applies: (name, plain or mixing file, mutations,
# whether it must be refused; the others must load correctly).
CRASH_CLASSES = [
    ('top-k larger than the recipe allows', 0, [_recipe('target', 'topk', 266, '<u2')], True),
    ('top-k larger in both copies of the recipe', 0, _both('topk', 266, '<u2'), True),
    ('class count below the stored class ids', 0, _both('num_classes', 8, '<u4'), False),
    ('mixing switched on in a file without partners', 0, _both('mixing', 1, 'u1'), False),
    (RECORDS, 1,
     [_records('pair', 10 ** 6, '<u4', range(0, 20)), _records('ra_op', 200, 'u1', range(20, 40)),
      _records('ra_mag', 1e9, '<f4', range(40, 60))], False),
    ('huge label (one-hot path)', 0, [_meta('target', 'label', 2 ** 31, '<u4')], True),
    ('more reinforcements claimed than stored', 0, _both('num_samples', 40, '<u2'), True),
    ('one flipped bit in the target copy of the recipe', 0,
     [_recipe('target', 'topk', 5 ^ 0x100, '<u2', fix=False)], True),
    ('more samples claimed than the file holds', 0, [_header('num_samples', 10 ** 6, '<u8')], True),
    ('2^40 samples claimed', 0, [_header('num_samples', 2 ** 40, '<u8')], True),
    ('NaN recipe setting', 0, _both('erase_p', np.nan, '<f8'), True),
    ('huge data pointer', 0, [_meta('image', 'data_ptr', 2 ** 50, '<u8')], True),
    ('recipe size no GPU could hold', 0, _both('size', 65535, '<u2'), True),
    ('another format version', 0, _both('version', 4, '<u2'), True),
]
# storage metadata that lies about the image (issue 27): refused when opened, or damage
STORAGE_LIES = [
    ('stored width and height swapped', 0, [_stored_size(lambda w, h: (h, w))], True),
    ('original width 2^32-1', 0, [_meta('image', 'orig_width', 2 ** 32 - 1, '<u4')], True),
    ('original size 2^32-1 by 2^32-1', 0, [_meta('image', 'orig_width', 2 ** 32 - 1, '<u4'),
                                           _meta('image', 'orig_height', 2 ** 32 - 1, '<u4')], True),
    ('stored larger than the original', 0, [_stored_size(lambda w, h: (w + 1, h + 1))], True),
    ('a JPEG said to be half its size', 0, [_stored_size(lambda w, h: (w // 2, h // 2))], False),
    ('raw mode for a JPEG', 0, [_meta('image', 'mode', 1, 'u1')], True),
]
CRASH_CLASSES += STORAGE_LIES


def test_crash_classes(files, tmp_path):
    """Each crash class of the issue is refused with the file's name, or loads
    with finite, normalised targets (damaged samples replaced); none crashes
    or hangs."""
    jobs = []
    for k, (name, which, makers, must_refuse) in enumerate(CRASH_CLASSES):
        path = str(tmp_path / f'{k}.beton')
        source = files[which]
        for make in makers:
            fuzz.write_structure(source, path + '.next', *make(files[which]))
            os.replace(path + '.next', path)
            source = path
        jobs.append({'name': name, 'path': path})
        if not must_refuse:
            jobs.append({'name': f'{name} (load)', 'path': path, 'p': 1.0})
    empty = tmp_path / 'empty.beton'
    empty.touch()
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter
    plain = str(tmp_path / 'plain.beton')
    DatasetWriter(plain, {'label': IntField()}, num_workers=1).from_indexed_dataset([(1,), (2,)])
    jobs += [{'name': 'empty file', 'path': str(empty)}, {'name': 'plain FFCV file', 'path': plain},
             {'name': 'plain FFCV file (load)', 'path': plain, 'p': 1.0}]
    results = fuzz.run_jobs(jobs, timeout=900)
    for name, r in results.items():
        assert r['status'] in ('ok', 'refused'), (name, r)
        assert r['status'] == 'ok' or r['named'], (name, r['message'])
        assert not r.get('bad_targets'), (name, r)
    for name, _, _, refused in CRASH_CLASSES:
        assert (results[name]['status'] == 'refused') == refused, (name, results[name])
    for name in ('empty file', 'plain FFCV file', 'plain FFCV file (load)'):
        assert results[name]['status'] == 'refused', (name, results[name])
    assert results['class count below the stored class ids (load)']['damaged']  # found, and replaced
    assert results['a JPEG said to be half its size (load)']['damaged'] == [3]   # not a wrong crop
    for k, (name, _, _, _) in enumerate(CRASH_CLASSES):   # verify sees every lie too
        if name in {c[0] for c in STORAGE_LIES}:
            assert not verify(str(tmp_path / f'{k}.beton')).ok, name
    damaged = set(results[f'{RECORDS} (load)']['damaged'])
    assert {20, 40} <= damaged <= set(range(60)) and damaged & set(range(20)), str(sorted(damaged))


def test_every_field_at_its_boundaries(files, tmp_path, capsys):
    """Every header, recipe and metadata field and every record field, at 0,
    max, negative, NaN and random values: clear errors or correct loads."""
    _, mixing = files
    results, merged = fuzz.sweep(mixing, str(tmp_path), np.random.default_rng(0), loads=1)
    counts = {}
    for name, r in results.items():
        counts[r['status']] = counts.get(r['status'], 0) + 1
        assert r['status'] in ('ok', 'refused'), (name, r)
        assert r['status'] == 'ok' or r['named'], (name, r['message'])
        assert not r.get('bad_targets'), (name, r)
    with capsys.disabled():
        print(f'\nfuzz: {len(results)} mutated files and merged loads: {counts}, crashes and hangs: 0')
    assert counts.get('refused', 0) > 100 and counts.get('ok', 0) > 10
    for name, (path, hits) in merged.items():  # record mutations: loader, replay and verify agree
        r = results[name]
        damaged, refused = set(r['damaged']), set(r['replay_refused'])
        assert set(r['fallbacks']) == damaged and damaged <= refused <= set(hits), (name, r)
        assert verify(path).samples == refused, name
        assert len(refused) > len(hits) // 3, (name, len(refused))


def test_what_the_decoder_splices_cannot_crash_it(tmp_path):
    """Restart intervals, frame size and sampling, the markers themselves,
    Huffman tables, scan headers, truncations and flipped bits of JPEGs
    stored with restart markers (4:2:0 and 4:4:4 photos): every crop at
    every DCT scale decodes or comes out black, in a child process that must
    neither crash nor hang; the writer's splicer takes only the mutations
    that libjpeg reads without a warning, and keeps their pixels."""
    import io
    import json
    import skimage.data
    from ffcv_dr.jpeg import add_restarts
    rng = np.random.default_rng(0)
    jobs = []
    for sub in (2, 0):
        buf = io.BytesIO()
        Image.fromarray(skimage.data.coffee()).resize((403, 301)).save(buf, format='JPEG', subsampling=sub)
        good = add_restarts(np.frombuffer(buf.getvalue(), np.uint8)).tobytes()
        for name, data in [('unchanged', good)] + fuzz.jpeg_mutations(good, rng):
            path = str(tmp_path / f'{len(jobs)}.jpg')
            open(path, 'wb').write(data)
            json.dump({'height': 301, 'width': 403}, open(path + '.json', 'w'))
            jobs.append({'name': f'{sub} {name}', 'path': path, 'jpeg': True})
    results = fuzz.run_jobs(jobs, timeout=600)
    assert len(results) == len(jobs) > 60
    for name, r in results.items():
        assert r['status'] == 'ok', (name, r)
        assert not r['spliced'] or (r['source_clean'] and r['same_pixels']), (name, r)
    assert results['2 unchanged']['decoded'] == results['0 unchanged']['decoded'] == 21
    assert results['2 unchanged']['spliced'] and results['0 unchanged']['spliced']
    assert sum(r['spliced'] for r in results.values()) < len(results) // 2
