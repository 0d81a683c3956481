"""Restart markers added losslessly at write time, and the decoder that cuts a
crop's intervals out of them: on scikit-image's photos in every chroma
subsampling, grayscale and progressive, the stored JPEG decodes to the
original's pixels and every crop, at every DCT scale, to the same pixels as a
full decode; a file written without markers replays exactly as one with."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from ffcv_dr.jpeg import NOT_SPLICED, _splice_restarts, add_restarts, decode_region, seekable

SCALES = (1, 2, 4, 8)


def _jpegs():
    """{name: JPEG bytes}: photos at odd sizes (partial MCUs at the right and
    bottom edges), in 4:4:4, 4:2:2, 4:2:0, grayscale and progressive, and one
    whose MCUs per row are prime (a marker every MCU); with standard Huffman
    tables (the splicer writes optimal ones) and with optimized ones (which
    it keeps, copying the AC bits)."""
    import skimage.data
    coffee = Image.fromarray(skimage.data.coffee()).resize((301, 203))
    chelsea = Image.fromarray(skimage.data.chelsea()).resize((243, 187))
    out = {}
    for sub, name in ((0, '4:4:4'), (1, '4:2:2'), (2, '4:2:0')):
        for photo, image in (('coffee', coffee), ('chelsea', chelsea)):
            buf = io.BytesIO()
            image.save(buf, format='JPEG', quality=88, subsampling=sub, optimize=photo == 'chelsea')
            out[f'{photo} {name}' + ', optimized' * (photo == 'chelsea')] = buf.getvalue()
    for name, image, kw in (('grayscale', coffee.convert('L'), {}),
                            ('grayscale, optimized', chelsea.convert('L'), dict(optimize=True)),
                            ('progressive 4:2:0', chelsea, dict(progressive=True, subsampling=2)),
                            ('13 MCUs a row', coffee.resize((104, 77)), dict(subsampling=0))):
        buf = io.BytesIO()
        image.save(buf, format='JPEG', quality=90, **kw)
        out[name] = buf.getvalue()
    return {name: np.frombuffer(data, np.uint8) for name, data in out.items()}


JPEGS = _jpegs()


def _decode(data):
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize('name', JPEGS)
def test_restart_markers_keep_every_pixel(name):
    original = JPEGS[name]
    stored = add_restarts(original)
    assert seekable(stored) and not seekable(original)
    assert np.array_equal(_decode(stored), _decode(original))
    # at most a marker, its padding and a longer DC code an 8x8 block: a
    # marker every MCU where a row's MCUs are prime (31 at 243 px in 4:4:4)
    h, w = _decode(original).shape[:2]
    assert stored.size <= 1.02 * original.size + 3 * -(-h // 8) * -(-w // 8), (stored.size, original.size)


def _other_encoders():
    """Sequential JPEGs as other writers make them: OpenCV's with restart
    markers of its own and Pillow's with optimized tables, EXIF and a
    comment (segments the stored file leaves out)."""
    import skimage.data
    photo = skimage.data.astronaut()[::2, ::2][:203, :241]
    out = {}
    for rst, optimize in ((1, 0), (5, 0), (5, 1)):
        ok, data = cv2.imencode('.jpg', photo, [int(cv2.IMWRITE_JPEG_RST_INTERVAL), rst,
                                                int(cv2.IMWRITE_JPEG_OPTIMIZE), optimize])
        out[f'OpenCV, a marker every {rst} MCUs' + ', optimized' * optimize] = data.reshape(-1)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x010F] = 'ffcv-dr test'
    Image.fromarray(photo).save(buf, format='JPEG', optimize=True, exif=exif, comment=b'a comment')
    out['Pillow, optimized, EXIF and COM'] = np.frombuffer(buf.getvalue(), np.uint8)
    return out


def _entropy_data(data: bytes) -> bytes:
    sos = data.index(b'\xff\xda')
    return data[sos + 2 + (data[sos + 2] << 8 | data[sos + 3]):]


@pytest.mark.parametrize('name', [*JPEGS, *_other_encoders()])
def test_sequential_jpegs_are_remarked_as_libjpeg_would(name):
    """The splicer (``_restarts.c``) takes every sequential JPEG and writes
    the entropy data that libjpeg's route through the coefficients writes,
    byte for byte, whether it rewrites the AC symbols with optimal tables or
    copies them where the source's tables are optimal already; a progressive
    JPEG goes through libjpeg."""
    original = {**JPEGS, **_other_encoders()}[name]
    out = np.empty(2 * original.size + 65536, np.uint8)
    n = _splice_restarts(original.tobytes(), original.size, 4, out.ctypes.data, out.size)
    if name.startswith('progressive'):
        assert n == NOT_SPLICED
        return
    spliced, through_libjpeg = out[:n], add_restarts(original, splice=False)
    assert np.array_equal(add_restarts(original), spliced)
    assert _entropy_data(spliced.tobytes()) == _entropy_data(through_libjpeg.tobytes())
    assert np.array_equal(_decode(spliced), _decode(original))
    assert seekable(spliced) and b'ffcv-dr test' not in spliced.tobytes()


def _crops(h, w, rng):
    """Edges, corners, the whole image, one-pixel rows and columns, and random boxes."""
    fixed = [(0, h, 0, w), (0, 1, 0, 1), (h - 1, 1, w - 1, 1), (0, h, w - 1, 1), (h - 1, 1, 0, w),
             (0, h // 3, 0, w // 3), (h - h // 3, h // 3, w - w // 3, w // 3), (0, h, w // 2, 1),
             (h // 2, 1, 0, w), (h // 2, h - h // 2, w // 2, w - w // 2)]
    random = []
    for _ in range(40):
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        random.append((int(rng.integers(0, h - ch + 1)), ch, int(rng.integers(0, w - cw + 1)), cw))
    return [(t, ch, l, cw) for t, ch, l, cw in fixed + random if ch > 0 and cw > 0]


@pytest.mark.parametrize('name', JPEGS)
def test_every_crop_at_every_scale_equals_a_full_decode(name):
    original, rng = JPEGS[name], np.random.default_rng(0)
    stored = add_restarts(original)
    h_img, w_img = _decode(original).shape[:2]
    for denom in SCALES:
        h, w = -(-h_img // denom), -(-w_img // denom)
        full = decode_region(original, denom, 0, h, 0, w)
        assert full.shape[:2] == (h, w)
        for top, ch, left, cw in _crops(h, w, rng):
            want = full[top:top + ch, left:left + cw]
            for data in (stored, original):  # cut to its intervals; today's path
                got = decode_region(data, denom, top, ch, left, cw)
                assert np.array_equal(got, want), (name, denom, top, ch, left, cw)


def test_what_cannot_be_remarked_is_stored_as_it_is():
    import skimage.data
    cmyk = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).convert('CMYK').save(cmyk, format='JPEG')
    data = np.frombuffer(cmyk.getvalue(), np.uint8)
    assert add_restarts(data) is data                    # four components
    truncated = JPEGS['coffee 4:2:0'][:3000]
    assert add_restarts(truncated) is truncated          # libjpeg would pad the missing data
    assert add_restarts(data[:100]) is not None and not seekable(data[:100])


def test_a_file_written_without_markers_replays_identically(tmp_path, monkeypatch):
    """Files written before restart markers load through today's path, and
    give exactly the replays of a file written with them."""
    import ffcv_dr.storage as storage
    from ffcv_dr.beton import BetonFile
    from ffcv_dr.reinforce import reinforce
    folder = tmp_path / 'images'
    for k, (name, data) in enumerate(JPEGS.items()):
        (folder / f'c{k % 3}').mkdir(parents=True, exist_ok=True)
        (folder / f'c{k % 3}' / f'{k}.jpg').write_bytes(data.tobytes())
    settings = dict(samples=3, topk=5, size=64, chunk=4, batch_size=8, num_workers=2)
    reinforce(str(folder), str(tmp_path / 'after.beton'), **settings)
    with monkeypatch.context() as m:
        m.setattr(storage, 'add_restarts', lambda data: data)
        reinforce(str(folder), str(tmp_path / 'before.beton'), **settings)
    before, after = BetonFile(str(tmp_path / 'before.beton')), BetonFile(str(tmp_path / 'after.beton'))
    assert not any(seekable(before.payload(i)) for i in range(len(before)))
    assert all(seekable(after.payload(i)) for i in range(len(after)))
    for i in range(len(after)):
        assert np.array_equal(after.topk(i), before.topk(i))
        for j in range(3):
            for size in (64, 176):
                assert np.array_equal(after.render(i, j, size=size), before.render(i, j, size=size))
