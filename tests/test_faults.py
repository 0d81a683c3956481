"""Bad input and faults: every case converts correctly or stops with a message
naming the file and the problem, leaving nothing half-written behind."""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES, MIXING, RANDAUG
from ffcv_dr.beton import BetonFile
from ffcv_dr.cli import main
from ffcv_dr.convert import ConvertError, convert
from ffcv_dr.intake import list_images
from ffcv_dr.jpeg import decode_crop_resize
from ffcv_dr.reinforce import reinforce
from ffcv_dr.verify import verify
from helpers import link_mldr_copy, on_small_disk, psnr, read_mldr, write_targz, write_torch_file

WNID = 'n01440764'  # an ImageNet class folder, so labels are ImageNet ids


def photo(size=(320, 240)) -> Image.Image:
    with Image.open(list_images(IMAGES).paths[3]) as img:
        return img.convert('RGB').resize(size)


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return save(photo(), path, format='JPEG', quality=92, exif=exif.tobytes())


READABLE = {  # name -> writer of a file that must convert correctly
    'cmyk.JPEG': lambda p: save(photo().convert('CMYK'), p, format='JPEG', quality=92),
    'png_inside.JPEG': lambda p: save(photo(), p, format='PNG'),
    'gray.JPEG': lambda p: save(photo().convert('L'), p, format='JPEG', quality=92),
    'palette.png': lambda p: save(photo().convert('P', palette=Image.ADAPTIVE), p, format='PNG'),
    'progressive.JPEG': lambda p: save(photo(), p, format='JPEG', quality=92, progressive=True),
    'exif_rotated.JPEG': exif_rotated,
    'one_pixel.JPEG': lambda p: save(Image.new('RGB', (1, 1), (200, 30, 60)), p, format='JPEG'),
    'very_wide.JPEG': lambda p: save(photo((10000, 300)), p, format='JPEG', quality=85),
}


def truncated(path):
    data = open(list_images(IMAGES).paths[5], 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) * 2 // 3])
    return path


def header_only(path):
    """A JPEG header claiming 9000x9000, its scan holding no data, then an end marker."""
    data = open(list_images(IMAGES).paths[5], 'rb').read()
    sof = max(data.find(b'\xff\xc0'), data.find(b'\xff\xc2'))
    sos = data.find(b'\xff\xda')
    data = data[:sof + 5] + (9000).to_bytes(2, 'big') * 2 + data[sof + 9:]
    with open(path, 'wb') as f:
        f.write(data[:sos + 2 + (data[sos + 2] << 8 | data[sos + 3])] + b'\xff\xd9')
    return path


def truncated_with_eoi(path):
    truncated(path)
    with open(path, 'ab') as f:
        f.write(b'\xff\xd9')
    return path


UNREADABLE = {  # name -> (writer, what the error says)
    'truncated.JPEG': (truncated, 'truncated or corrupt JPEG'),
    'header_only.JPEG': (header_only, 'truncated or corrupt JPEG'),
    'truncated_with_eoi.JPEG': (truncated_with_eoi, 'truncated or corrupt JPEG'),
    'empty.JPEG': (lambda p: open(p, 'wb').close(), 'unreadable image'),
    'dangling.JPEG': (lambda p: os.symlink(p + '.gone', p), 'unreadable image'),
    'garbage.JPEG': (lambda p: open(p, 'wb').write(os.urandom(5000)), 'unreadable image'),
}


def pil_rgb(path) -> np.ndarray:
    """What ml-dr's ImageFolder loader sees: PIL, RGB, EXIF orientation ignored."""
    with Image.open(path) as img:
        return np.asarray(img.convert('RGB'))


def stored_pixels(f: BetonFile, i) -> np.ndarray:
    """The stored JPEG decoded in full by the loader's own decoder."""
    m = f.image_meta[i]
    h, w = int(m['height']), int(m['width'])
    out = np.empty((h, w, 3), np.uint8)
    assert decode_crop_resize(f.payload(i), h, w, 0, 0, h, w, out)
    return out


@pytest.fixture(scope='module')
def faulty_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('faulty') / 'images'
    os.makedirs(root / WNID)
    shutil.copy(list_images(IMAGES).paths[0], root / WNID / 'good.JPEG')
    for name, write in READABLE.items():
        write(str(root / WNID / name))
    for name, (write, _) in UNREADABLE.items():
        write(str(root / WNID / name))
    return root


@pytest.fixture(scope='module')
def skipped_run(faulty_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('skip') / 'faulty.beton')
    result = reinforce(str(faulty_folder), out, teacher='resnet18', pretrained=False, samples=2,
                       topk=5, batch_size=8, num_workers=2, chunk=4, skip_bad=True)
    return out, result


def test_unreadable_images_stop_the_run_naming_the_file(faulty_folder, tmp_path):
    out = tmp_path / 'x.beton'
    with pytest.raises(ConvertError) as e:
        reinforce(str(faulty_folder), str(out), teacher='resnet18', pretrained=False, samples=2,
                  num_workers=2)
    first = sorted(UNREADABLE)[0]  # ImageFolder order: dangling.JPEG
    assert f'{WNID}/{first}: {UNREADABLE[first][1]}' in str(e.value)
    assert os.listdir(tmp_path) == []


def test_jpeg_headers_read_by_libjpeg_agree_with_pil(faulty_folder, monkeypatch):
    """The probe reads JPEG headers with libjpeg and leaves the rest to PIL:
    sizes, pass-through and problems come out as PIL alone gives them."""
    import ffcv_dr.intake as intake
    paths = list_images(IMAGES).paths + sorted(str(p) for p in (faulty_folder / WNID).iterdir())
    fast = [intake._probe_image((p, None, True)) for p in paths]
    monkeypatch.setattr(intake, 'jpeg_header', lambda data: None)
    assert fast == [intake._probe_image((p, None, True)) for p in paths]
    assert sum(probe is None for _, probe, _ in fast) == len(UNREADABLE)


@pytest.mark.parametrize('job', ['convert', 'reinforce'])
def test_jpegs_that_do_not_decode_completely_are_refused_when_written(job, tmp_path):
    """Without --skip-bad only JPEGs without an end marker are decoded up
    front; one that has one but does not decode completely (a header with no
    data, a truncated file with an end marker added) is refused when the
    writer re-marks it, naming it: no output, no finished chunk, and the same
    command with --skip-bad then leaves the image out."""
    from ffcv_dr.convert import convert
    from conftest import RANDAUG, first_reinforcements
    root = tmp_path / 'images'
    os.makedirs(root / WNID)
    shutil.copy(list_images(IMAGES).paths[0], root / WNID / 'a_good.JPEG')
    truncated_with_eoi(str(root / WNID / 'b_bad.JPEG'))
    out = tmp_path / 'out' / 'x.beton'
    out.parent.mkdir()
    mldr = first_reinforcements(tmp_path / 'mldr', RANDAUG, 2)

    def run(skip_bad):
        if job == 'convert':
            return convert(str(root), str(out), mldr, num_workers=2, skip_bad=skip_bad)
        return reinforce(str(root), str(out), teacher='resnet18', pretrained=False, samples=2,
                         num_workers=2, skip_bad=skip_bad)
    with pytest.raises(ConvertError, match=f'{WNID}/b_bad.JPEG: truncated or corrupt JPEG data: it '
                                           'does not decode completely'):
        run(False)
    assert not os.listdir(out.parent)  # no .parts folder without a finished chunk
    result = run(True)
    assert [os.path.basename(p) for p in result['skipped']] == ['b_bad.JPEG'] and len(BetonFile(str(out))) == 1


def test_a_bad_image_after_a_finished_chunk_keeps_that_chunk(tmp_path):
    """The teacher's finished work is never thrown away by a failure: only a
    parts folder without a finished chunk is removed."""
    root = tmp_path / 'images'
    os.makedirs(root / WNID)
    for k, path in enumerate(list_images(IMAGES).paths[:4]):  # chunks 0 and 1; chunk 2 fails (rendered ahead)
        shutil.copy(path, root / WNID / f'{k}_good.JPEG')
    truncated_with_eoi(str(root / WNID / 'z_bad.JPEG'))
    out = tmp_path / 'x.beton'
    with pytest.raises(ConvertError, match='z_bad.JPEG: truncated or corrupt JPEG data'):
        reinforce(str(root), str(out), teacher='resnet18', pretrained=False, samples=2, chunk=2,
                  batch_size=4, size=64, num_workers=1)
    assert 'chunk_000000.npz' in os.listdir(str(out) + '.parts')


def test_a_folder_reached_twice_through_links_is_refused(tmp_path):
    """A symbolic link to an ancestor (a cycle) or a second link to one
    folder would list images more than once: refused, naming both paths."""
    from ffcv_dr.intake import list_images as listed
    root = tmp_path / 'images'
    os.makedirs(root / WNID)
    shutil.copy(list_images(IMAGES).paths[0], root / WNID / 'a.JPEG')
    os.symlink('..', root / WNID / 'loop')
    with pytest.raises(ConvertError, match=rf'{WNID}/loop: is .*images again, through a symbolic link'):
        listed(str(root))
    os.remove(root / WNID / 'loop')
    os.symlink(root / WNID, root / 'n01443537')
    with pytest.raises(ConvertError, match='again, through a symbolic link'):
        listed(str(root))
    os.remove(root / 'n01443537')
    assert len(listed(str(root)).paths) == 1


def test_skip_bad_reports_each_unreadable_image(skipped_run, faulty_folder):
    out, result = skipped_run
    found = len(os.listdir(faulty_folder / WNID))
    assert sorted(os.path.basename(p) for p in result['skipped']) == sorted(UNREADABLE)
    assert result['images'] == len(BetonFile(out)) == found - len(UNREADABLE) == 1 + len(READABLE)


def test_odd_images_come_out_rgb_as_mldr_saw_them(skipped_run, faulty_folder):
    """CMYK, PNG bytes, grayscale, palette, progressive, EXIF-rotated, 1x1 and
    10,000 px wide images: stored at their original size, boxes in PIL's
    (EXIF-ignoring) pixel space, pixels as PIL decodes them."""
    f = BetonFile(skipped_run[0])
    names = sorted(['good.JPEG', *READABLE])
    for i, name in enumerate(names):
        want = pil_rgb(faulty_folder / WNID / name)
        m = f.image_meta[i]
        assert (m['orig_height'], m['orig_width']) == want.shape[:2], name
        got = stored_pixels(f, i)
        assert got.shape == want.shape, name
        assert psnr(got, want) > 33, name  # re-encoded ones pass through JPEG quality 95, 4:4:4
        for j in range(2):
            img = f.render(i, j)
            assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    exif = names.index('exif_rotated.JPEG')
    assert f.image_meta[exif]['orig_width'] == 320  # not turned to 240 x 320


def test_verify_accepts_the_odd_images(skipped_run):
    assert verify(skipped_run[0]).ok


@pytest.fixture(scope='module')
def good_beton(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('good') / 'good.beton')
    convert(IMAGES, out, RANDAUG, num_workers=2)
    return out


def flip(path, offset):
    with open(path, 'r+b') as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x10]))


def test_verify_catches_any_flipped_byte(good_beton, tmp_path, capsys):
    assert main(['verify', good_beton]) == 0
    assert 'no problems' in capsys.readouterr().out
    f = BetonFile(good_beton)
    rng = np.random.default_rng(0)
    spots = {'a JPEG': int(f.image_meta[7]['data_ptr']) + f.params_size + 900,
             'a reinforcement record': int(f.image_meta[9]['data_ptr']) + 5,
             'a top-k record': int(f.target_meta[11]['data_ptr']) + 3,
             'an original width': _image_meta_offset(f, 13) + 8}
    for ptr, size in zip(f._ptrs[rng.integers(0, len(f._ptrs), 4)], f._sizes):  # anywhere in a block
        spots[f'block at {ptr}'] = int(ptr) + int(rng.integers(0, size))
    for what, offset in spots.items():
        bad = tmp_path / 'flipped.beton'
        shutil.copy(good_beton, bad)
        flip(bad, offset)
        assert not verify(str(bad)).ok, what
        assert main(['verify', str(bad)]) == 1
        assert '1 problem:' in capsys.readouterr().out


def test_verify_catches_a_truncated_file(good_beton, tmp_path):
    bad = tmp_path / 'short.beton'
    with open(good_beton, 'rb') as src, open(bad, 'wb') as dst:
        dst.write(src.read(os.path.getsize(good_beton) * 3 // 4))
    report = verify(str(bad))
    assert not report.ok
    assert 'short.beton' in report.summary()


def test_verify_catches_out_of_bounds_records_that_checksums_match(good_beton, tmp_path):
    """A file written with bad records (as a buggy writer would) fails on bounds,
    not only on its checksum: the loader trusts these values."""
    from ffcv_dr.fields.reinforced_image import ReinforcedImageField
    from ffcv_dr.format import IMAGE_METADATA
    f = BetonFile(good_beton)
    recs = f.records(4).copy()
    recs['crop'][1] = (0, 0, 60000, 10)   # far outside the image
    recs['ra_op'][2] = (200, 0)            # no such op
    meta = np.zeros(1, IMAGE_METADATA)
    buf = np.zeros(1 << 20, np.uint8)
    m = f.image_meta[4]
    ReinforcedImageField(f.recipe).encode(meta[0], (f.payload(4).copy(), m['orig_width'], m['orig_height'],
                                                    m['width'], m['height'], m['mode'], recs),
                                          lambda n: (int(m['data_ptr']), buf[:n]))
    bad = tmp_path / 'bounds.beton'
    shutil.copy(good_beton, bad)
    block = buf[:f.image_block(4).size]
    with open(bad, 'r+b') as fh:
        fh.seek(int(m['data_ptr']))
        fh.write(block.tobytes())
        meta_offset = _image_meta_offset(f, 4)
        fh.seek(meta_offset)
        fh.write(meta.tobytes())
    kinds = set(verify(str(bad)).problems)
    assert {'crop box', 'RandAugment op'} <= kinds, kinds


def _image_meta_offset(f: BetonFile, index):
    """Byte offset of image ``index``'s metadata row inside the file (FFCV puts
    the metadata table after its header and field descriptors)."""
    start = f.reader.header.dtype.itemsize + f.reader.field_descriptors.nbytes
    return start + index * f.reader.metadata.dtype.itemsize + f.reader.metadata.dtype.fields['f0'][1]


def test_skipping_an_image_keeps_the_others_aligned(tmp_path):
    """--skip-bad in convert: the skipped image's reinforcements are dropped and
    every other image keeps its own (ml-dr indices are ImageFolder indices)."""
    root = tmp_path / 'images'
    paths = list_images(IMAGES).paths
    for k, path in enumerate(paths):
        cls = os.path.basename(os.path.dirname(path))
        os.makedirs(root / cls, exist_ok=True)
        if k == 2:
            truncated(str(root / cls / os.path.basename(path)))
        else:
            os.symlink(path, root / cls / os.path.basename(path))
    out = tmp_path / 'skip.beton'
    with pytest.raises(ConvertError, match=os.path.basename(paths[2]) + ': truncated'):
        convert(str(root), str(out), RANDAUG, num_workers=2)
    result = convert(str(root), str(out), RANDAUG, num_workers=2, skip_bad=True)
    assert result['skipped'] == [str(root / os.path.basename(os.path.dirname(paths[2]))
                                     / os.path.basename(paths[2]))]
    f = BetonFile(str(out))
    assert len(f) == len(paths) - 1
    for position, source in ((1, 1), (2, 3), (3, 4)):
        want = read_mldr(os.path.join(RANDAUG, f'{source}.pth.tar'))[1]
        assert [list(r['crop']) for r in f.records(position)] == [list(s['params'][0]) for s in want]


def test_mixing_with_a_skipped_image_is_refused(tmp_path):
    root = tmp_path / 'images'
    for k, path in enumerate(list_images(IMAGES).paths[:64]):
        cls = os.path.basename(os.path.dirname(path))
        os.makedirs(root / cls, exist_ok=True)
        (truncated if k == 5 else lambda p: os.symlink(path, p))(str(root / cls / os.path.basename(path)))
    with pytest.raises(ConvertError, match=r'mixes with image 5, which was skipped as unreadable'):
        convert(str(root), str(tmp_path / 'm.beton'), MIXING, num_workers=2, skip_bad=True)
    assert not os.path.exists(tmp_path / 'm.beton')


def _sample(index):
    sample = read_mldr(os.path.join(RANDAUG, f'{index}.pth.tar'))
    return (sample[0], [dict(s, prob=(list(s['prob'][0]), list(s['prob'][1])), params=list(s['params']))
                        for s in sample[1]])


def test_probability_over_one_is_refused(tmp_path):
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    sample = _sample(17)
    sample[1][4]['prob'][0][0] = 1.5
    write_torch_file(os.path.join(mldr, '17.pth.tar'), sample)
    with pytest.raises(ConvertError, match=r'17\.pth\.tar \(reinforcement 4\).*\[0, 1\]'):
        convert(IMAGES, str(tmp_path / 'x.beton'), mldr, num_workers=2)


def test_a_file_holding_another_index_is_refused(tmp_path):
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    write_torch_file(os.path.join(mldr, '17.pth.tar'), _sample(18))  # 18 twice, 17 never
    with pytest.raises(ConvertError, match=r'17\.pth\.tar.*18'):
        convert(IMAGES, str(tmp_path / 'x.beton'), mldr, num_workers=2)


def test_wrong_num_samples_in_the_config_is_refused(tmp_path):
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    config = read_mldr(os.path.join(RANDAUG, 'config.pth.tar'))
    config['reinforce']['num_samples'] = 9
    write_torch_file(os.path.join(mldr, 'config.pth.tar'), config)
    with pytest.raises(ConvertError, match=r'\.pth\.tar.*has 8 reinforcements'):
        convert(IMAGES, str(tmp_path / 'x.beton'), mldr, num_workers=2)


def _members(indices):
    out = [('reinforced_data/config.pth.tar', open(os.path.join(RANDAUG, 'config.pth.tar'), 'rb').read())]
    return out + [(f'reinforced_data/{i}.pth.tar', open(os.path.join(RANDAUG, f'{i}.pth.tar'), 'rb').read())
                  for i in indices]


@pytest.mark.parametrize('members, message', [
    (lambda: _members([*range(500), 7]), 'index 7 appears twice'),
    (lambda: _members(range(500)) + [('../../evil.pth.tar', b'x')], 'path outside the archive'),
    (lambda: _members(range(500)) + [('/etc/0.pth.tar', b'x')], 'path outside the archive'),
])
def test_bad_archives_are_refused(tmp_path, members, message):
    path = write_targz(tmp_path / 'r.tar.gz', members())
    with pytest.raises(ConvertError, match=message):
        convert(IMAGES, str(tmp_path / 'x.beton'), path, num_workers=2)
    assert sorted(os.listdir(tmp_path)) == ['r.tar.gz']


def test_truncated_archive_is_refused(randaug_targz, tmp_path):
    cut = tmp_path / 'cut.tar.gz'
    with open(randaug_targz, 'rb') as src, open(cut, 'wb') as dst:
        dst.write(src.read(os.path.getsize(randaug_targz) // 2))
    with pytest.raises(ConvertError, match=r'cut\.tar\.gz: unreadable archive'):
        convert(IMAGES, str(tmp_path / 'x.beton'), str(cut), num_workers=2)
    assert sorted(os.listdir(tmp_path)) == ['cut.tar.gz']


def test_pickles_run_nothing_even_inside_anwrite_targz(tmp_path):
    marker = tmp_path / 'pwned'
    evil = b'cposix\nsystem\n(V' + f'touch {marker}'.encode() + b'\ntR.'
    path = write_targz(tmp_path / 'r.tar.gz', _members(range(1, 500)) + [('reinforced_data/0.pth.tar', evil)])
    with pytest.raises(ConvertError, match=r'0\.pth\.tar: refused'):
        convert(IMAGES, str(tmp_path / 'x.beton'), path, num_workers=2)
    assert not marker.exists()


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, '-m', 'ffcv_dr.cli', *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _segments():
    return {n for n in os.listdir('/dev/shm') if n.startswith('psm_')} if os.path.isdir('/dev/shm') else set()


def _convert_until_writing(out):
    """A convert CLI run to ``out``, once its writer has started."""
    proc = _cli(['convert', IMAGES, str(out), '--mldr', RANDAUG, '--workers', '2'])
    deadline, writing = time.time() + 120, []
    while time.time() < deadline and not writing:
        writing = [n for n in os.listdir(out.parent) if n.startswith('.ffcv-dr-')
                   and os.path.exists(out.parent / n / out.name)]
        time.sleep(0.005)
    assert writing, 'the writer never started'
    return proc


def test_a_terminated_convert_leaves_nothing(tmp_path):
    """SIGTERM to the process group (a scheduler's, torchrun's): the folder is
    as it was, no scratch folder, no lock, no shared memory."""
    segments = _segments()
    proc = _convert_until_writing(tmp_path / 'x.beton')
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGTERM, err
    assert os.listdir(tmp_path) == [] and _segments() <= segments


def test_a_killed_convert_leaves_no_file_that_looks_finished(tmp_path):
    out = tmp_path / 'killed.beton'
    segments = _segments()
    proc = _convert_until_writing(out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # only a hidden scratch folder may remain
    assert _segments() <= segments  # no shared memory left in /dev/shm (FFCV's writer leaves one)
    assert all(n.startswith('.ffcv-dr-') for n in os.listdir(tmp_path))
    convert(IMAGES, str(out), RANDAUG, num_workers=2)  # the same command again just works
    assert verify(str(out)).ok
    assert os.listdir(tmp_path) == ['killed.beton']  # and removes what the kill left


def test_disk_filling_up_during_the_write_stops_with_a_message(tmp_path):
    """The file size limit (RLIMIT_FSIZE) makes writes fail half-way, as a full
    disk does: FFCV's writer would wait forever; ffcv-dr stops and says why."""
    out = tmp_path / 'full.beton'

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))

    proc = _cli(['convert', IMAGES, str(out), '--mldr', RANDAUG, '--workers', '2'], preexec_fn=limit)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('the writer hung on a full disk')
    assert proc.returncode == 1
    assert f'{out}: writing failed' in err and 'File too large' in err
    assert 'Traceback' not in err
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line_naming_the_output_the_device_and_the_bytes_needed(tmp_path):
    """A real full disk (ENOSPC) half-way through the write: the free-space
    check passes (as when another job fills the disk after it) and a tmpfs of
    half the images' size fills up. One line, no worker tracebacks, nothing
    left behind."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    half = sum(os.path.getsize(p) for p in list_images(IMAGES).paths) // 2
    stderr, code, left = on_small_disk(disk, f'{half >> 10}k', ['convert', IMAGES, disk / 'x.beton', '--mldr', RANDAUG,
                                                     '--workers', '2'],
                                       'import ffcv_dr.writer as w; w._check_free_space = lambda *a: 150 << 20')
    errors = re.findall(r'ffcv-dr convert: .*', stderr)
    assert len(errors) == 1 and 'Traceback' not in stderr, stderr  # none from the writer processes
    assert re.fullmatch(rf'ffcv-dr convert: error: {disk}/x\.beton: the disk is full: ffcv-dr-test-disk '
                        rf'\(mounted on {disk}\) has [\d,]+ bytes free and the job needs about [\d,]+ more; '
                        'free some space and run it again', errors[0]), errors[0]
    assert code == 1 and left == []


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import ffcv_dr.writer as writer
    monkeypatch.setattr(writer.shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ConvertError, match=r'x\.beton: needs about 0\.\d+ GB, but only 0\.00 GB are free'):
        convert(IMAGES, str(tmp_path / 'x.beton'), RANDAUG, num_workers=2)
    assert os.listdir(tmp_path) == []


def test_a_killed_writer_process_stops_the_write_with_a_message(tmp_path, monkeypatch):
    """A worker killed mid-write (as by the kernel's OOM killer): FFCV's writer
    would wait for it forever; ffcv-dr stops, says so and leaves nothing."""
    import ffcv_dr.writer as writer
    read, victim = writer.stored_image, list_images(IMAGES).paths[100]

    def read_or_die(path, *args):
        if path == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return read(path, *args)

    monkeypatch.setattr(writer, 'stored_image', read_or_die)
    with pytest.raises(ConvertError, match=r'k\.beton: writing failed .*a writer process died \(exit code -9\)'):
        convert(IMAGES, str(tmp_path / 'k.beton'), RANDAUG, num_workers=2)
    assert os.listdir(tmp_path) == []
