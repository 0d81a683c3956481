"""Jobs that never lose or mix up data: a resumed run reuses only chunks of the
same inputs and settings, an output never replaces an input, one job per
output, and only regular files are read."""
import os
import re
import shutil

import pytest

from conftest import IMAGES, RANDAUG
from ffcv_dr.convert import convert
from ffcv_dr.jobs import JobError, OutputLock
from ffcv_dr.reinforce import reinforce

FAST = dict(samples=2, topk=5, size=64, chunk=4, batch_size=8, num_workers=2)


def _folder(root, images):
    """An ImageFolder of symlinks to the given imagenet-sample files."""
    for path in images:
        cls = os.path.basename(os.path.dirname(path))
        os.makedirs(root / cls, exist_ok=True)
        os.symlink(path, root / cls / os.path.basename(path))
    return str(root)


def _first_chunk_only(monkeypatch):
    """Stop a reinforce run after its first chunk, as a kill would."""
    import ffcv_dr.chunks as chunks
    save = chunks.save_chunk

    def save_then_die(path, *args):
        save(path, *args)
        raise KeyboardInterrupt
    monkeypatch.setattr(chunks, 'save_chunk', save_then_die)


def test_resuming_with_other_images_is_refused_and_restart_starts_over(tmp_path, monkeypatch):
    from ffcv_dr.intake import list_images
    paths = list_images(IMAGES).paths
    first, other = _folder(tmp_path / 'a', paths[:8]), _folder(tmp_path / 'b', paths[8:16])
    out = str(tmp_path / 'x.beton')
    with monkeypatch.context() as m:
        _first_chunk_only(m)
        with pytest.raises(KeyboardInterrupt):
            reinforce(first, out, **FAST)
    assert os.listdir(out + '.parts')
    with pytest.raises(JobError, match=r'x\.beton\.parts: holds chunks of another run \(images changed\)'):
        reinforce(other, out, **FAST)
    with pytest.raises(JobError, match=r'\(images, settings changed\)'):
        reinforce(other, out, **{**FAST, 'seed': 3})
    reinforce(other, out, restart=True, **FAST)  # starts over: every label is the new folder's
    from ffcv_dr.beton import BetonFile
    assert [BetonFile(out).label(i) for i in range(8)] == list(list_images(other).labels)


def test_resuming_with_other_teacher_weights_is_refused(tmp_path, monkeypatch):
    """Same teacher name and settings, other weights (here random instead of
    the package's: as after an upgrade of the package or of timm's hub)."""
    from ffcv_dr.intake import list_images
    images, out = _folder(tmp_path / 'a', list_images(IMAGES).paths[:8]), str(tmp_path / 'x.beton')
    with monkeypatch.context() as m:
        _first_chunk_only(m)
        with pytest.raises(KeyboardInterrupt):
            reinforce(images, out, **FAST)
    with pytest.raises(JobError, match=r'x\.beton\.parts: holds chunks of another run \(teachers changed\)'):
        reinforce(images, out, pretrained=False, **FAST)
    reinforce(images, out, **FAST)  # the same teacher resumes


@pytest.mark.parametrize('which', ['image', 'folder', 'archive', 'config'])
def test_an_output_over_an_input_is_refused_before_any_work(tmp_path, which):
    from helpers import link_mldr_copy
    images = _folder(tmp_path / 'images', [os.path.join(IMAGES, 'n01440764', f) for f in
                                             sorted(os.listdir(os.path.join(IMAGES, 'n01440764')))])
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    victim = {'image': os.path.join(images, 'n01440764', os.listdir(os.path.join(images, 'n01440764'))[0]),
              'folder': os.path.join(images, 'new.beton'),
              'archive': str(tmp_path / 'reinforced_data.tar'),
              'config': os.path.join(mldr, 'config.pth.tar')}[which]
    if which == 'archive':
        shutil.make_archive(str(tmp_path / 'reinforced_data'), 'tar', tmp_path, 'reinforced_data')
        mldr = victim
    before = open(victim, 'rb').read() if os.path.exists(victim) else None
    with pytest.raises(JobError, match='would be written (over|inside) the input'):
        convert(images, victim, mldr, num_workers=2)
    if which in ('image', 'folder'):  # reinforce's inputs: the images, and its checkpoints
        with pytest.raises(JobError, match='would be written (over|inside) the input'):
            reinforce(images, victim, **FAST)
    else:
        with pytest.raises(JobError, match=r'written over the input .*(\.tar|config\.pth\.tar)'):
            reinforce(images, victim, checkpoints=[victim], **FAST)
    assert (open(victim, 'rb').read() if os.path.exists(victim) else None) == before


def test_the_cli_says_why_in_one_line(tmp_path, capsys):
    from ffcv_dr.cli import main
    from ffcv_dr.intake import list_images
    images = _folder(tmp_path / 'images', list_images(IMAGES).paths[:1])
    assert main(['convert', images, os.path.join(images, 'x.beton'), '--mldr', RANDAUG]) == 1
    err = capsys.readouterr().err
    assert err.startswith('ffcv-dr convert: error: ') and 'written inside the input' in err
    assert 'Traceback' not in err


def test_a_second_job_on_one_output_fails_at_once_naming_the_holder(tmp_path):
    from ffcv_dr.intake import list_images
    images = _folder(tmp_path / 'images', list_images(IMAGES).paths[:4])
    out = str(tmp_path / 'x.beton')
    with OutputLock(out):
        with pytest.raises(JobError, match=rf'x\.beton: another job is writing it \(pid {os.getpid()} on '):
            reinforce(images, out, **FAST)
        with pytest.raises(JobError, match='another job is writing it'):
            convert(images, out, RANDAUG, num_workers=2)
    assert os.listdir(tmp_path) == ['images']  # the lock leaves nothing behind


def test_special_files_are_refused_by_name(tmp_path):
    from helpers import link_mldr_copy
    from ffcv_dr.convert import ConvertError
    images = _folder(tmp_path / 'images', [])
    os.makedirs(os.path.join(images, 'n01440764'))
    os.mkfifo(os.path.join(images, 'n01440764', 'fifo.JPEG'))
    with pytest.raises(JobError, match=r'fifo\.JPEG: a FIFO, not a regular file'):
        reinforce(images, str(tmp_path / 'x.beton'), **FAST)
    mldr = link_mldr_copy(tmp_path / 'reinforced_data', RANDAUG)
    os.remove(os.path.join(mldr, '17.pth.tar'))
    os.mkfifo(os.path.join(mldr, '17.pth.tar'))
    with pytest.raises(ConvertError, match=r'17\.pth\.tar: a FIFO, not a regular file'):
        convert(IMAGES, str(tmp_path / 'y.beton'), mldr, num_workers=2)
    os.remove(os.path.join(mldr, '17.pth.tar'))
    os.symlink('/dev/zero', os.path.join(mldr, '17.pth.tar'))
    with pytest.raises(ConvertError, match=r'17\.pth\.tar: a device, not a regular file'):
        convert(IMAGES, str(tmp_path / 'y.beton'), mldr, num_workers=2)
    assert sorted(os.listdir(tmp_path)) == ['images', 'reinforced_data']


def test_reinforce_on_a_full_disk_says_so_and_leaves_nothing_half_written(tmp_path):
    """An 8 KB tmpfs: the lock and the fingerprint fit, the first chunk does not."""
    from helpers import on_small_disk
    images = _folder(tmp_path / 'images', sorted(os.path.join(IMAGES, 'n01440764', f) for f in
                                                 os.listdir(os.path.join(IMAGES, 'n01440764')))[:1])
    disk = tmp_path / 'disk'
    disk.mkdir()
    stderr, code, left = on_small_disk(disk, '8k', ['reinforce', images, disk / 'x.beton', '--samples', '2',
                                                    '--topk', '5', '--size', '64', '--chunk', '4',
                                                    '--workers', '2'])
    errors = re.findall(r'ffcv-dr reinforce: .*', stderr)
    assert len(errors) == 1 and 'Traceback' not in stderr, stderr
    assert re.fullmatch(rf'ffcv-dr reinforce: error: {disk}/x\.beton: the disk is full: ffcv-dr-test-disk '
                        rf'\(mounted on {disk}\) has [\d,]+ bytes free and the job needs about [\d,]+ more; '
                        'free some space and run it again', errors[0]), errors[0]
    assert code == 1 and left == []  # no chunk finished, so no parts folder (finished ones stay)


def test_chunks_smaller_than_a_teacher_batch_are_warned_of(tmp_path):
    # 2 images x 2 reinforcements a chunk fill half of each batch of 8: the
    # teacher would do twice the work (on a GPU, 4x with ImageNet-sized batches)
    from ffcv_dr.intake import list_images
    folder = _folder(tmp_path / 'images', list_images(IMAGES).paths[:6])
    with pytest.warns(UserWarning, match=r"50% of the teacher's work .* --chunk 4 or more"):
        reinforce(folder, str(tmp_path / 'out.beton'), **{**FAST, 'chunk': 2})


def test_a_job_removes_no_scratch_folder_but_those_its_output_left(randaug_beton, tmp_path):
    """Scratch folders are marked with their output's path: a job on ``out``
    removes what a killed job on ``out`` left, never the live scratch folder
    of a job on ``out-small.beton`` (whose name it prefixes) nor a user's
    folder named like one."""
    from ffcv_dr.jobs import _TEMPORARY, scratch_dir
    from ffcv_dr.subset import subset
    out, other = str(tmp_path / 'out'), str(tmp_path / 'out-small.beton')
    mine = tmp_path / '.ffcv-dr-tmp-out-mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep')
    with OutputLock(other):   # a job writing out-small.beton, in the middle of its write
        live = scratch_dir(other)
        stale = scratch_dir(out)   # what a SIGKILLed job on out left
        _TEMPORARY.discard(stale)
        subset(randaug_beton, out, 2, 5, num_workers=2)
        assert os.path.isdir(live) and (mine / 'notes.txt').read_text() == 'keep'
        assert not os.path.exists(stale)
    shutil.rmtree(live)
    _TEMPORARY.discard(live)
    assert sorted(os.listdir(tmp_path)) == ['.ffcv-dr-tmp-out-mine', 'out']


def test_a_file_named_like_the_lock_is_refused_and_never_touched(randaug_beton, tmp_path):
    import hashlib
    from ffcv_dr.subset import subset
    src = tmp_path / '.ffcv-dr-lock-out.beton'
    shutil.copy(randaug_beton, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(JobError, match=r'out\.beton: .*/\.ffcv-dr-lock-out\.beton is in the way of its lock '
                                       r'file and is not an ffcv-dr lock of this output; move or rename it'):
        subset(str(src), str(tmp_path / "out.beton"), 2, 5, num_workers=2)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert os.listdir(tmp_path) == ['.ffcv-dr-lock-out.beton']


def test_the_lock_a_killed_job_left_is_taken_over(tmp_path):
    out = str(tmp_path / 'x.beton')
    killed = OutputLock(out).__enter__()
    os.close(killed.fd)   # the kernel drops the flock of a killed process; its file stays
    with OutputLock(out):
        pass
    assert os.listdir(tmp_path) == []
