"""Relabelling: a new teacher's top-k on exactly the stored reinforcements
(mixing partners included), averaged with the stored labels on demand, the
file's record of its teachers kept up to date; torchrun and resumed runs
give the same file, and files the kernels cannot replay are refused."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from ffcv.loader import OrderOption

import fuzz
from helpers import killed_after_a_chunk, same_content, teacher_on_replay
from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile
from ffcv_dr.format import HAS_PAIR, RECIPE_DTYPE, TEACHERS_AT, TEACHERS_DTYPE
from ffcv_dr.jobs import JobError
from ffcv_dr.relabel import relabel

COMMON = ['--chunk', '3', '--batch-size', '8', '--workers', '2']
# the new teacher: the bundled EfficientNet-Lite0 shown 160 px views, keeping every class
NEW = ['--teacher-size', '160', '--topk', '1000']


def cli(command, *args):
    return subprocess.run([sys.executable, '-m', 'ffcv_dr.cli', command, *args], capture_output=True,
                          text=True)


@pytest.fixture(scope='module')
def stored(small_images, tmp_path_factory):
    """12 photos x 3 reinforcements of the full recipe with mixing, top-10 of the bundled teacher."""
    out = str(tmp_path_factory.mktemp('stored') / 'stored.beton')
    done = cli('reinforce', small_images, out, '--samples', '3', '--recipe', 'rrc+ra+re+mix',
               '--seed', '5', *COMMON)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope='module')
def relabelled(stored, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('relabelled') / 'new.beton')
    done = cli('relabel', stored, out, *NEW, *COMMON)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_relabelled_file_replays_the_inputs_pixels(stored, relabelled):
    """Same images, labels and records byte for byte, so every reinforcement
    renders to the same pixels, in the loader too; only the top-k changed."""
    a, b = BetonFile(stored), BetonFile(relabelled)
    assert len(a) == len(b) == 12 and b.recipe.topk == 1000 and a.recipe.topk == 10
    assert b.recipe == replace(a.recipe, topk=1000)
    mixed = 0
    for i in range(len(a)):
        assert a.label(i) == b.label(i) and np.array_equal(a.payload(i), b.payload(i))
        assert a.records(i).tobytes() == b.records(i).tobytes()
        for j in range(a.recipe.num_samples):
            assert np.array_equal(a.render(i, j), b.render(i, j)), (i, j)
        mixed += int((a.records(i)['mix_flags'] & HAS_PAIR != 0).sum())
        assert not np.array_equal(a.topk(i)['cls'][:, :10], b.topk(i)['cls'][:, :10])
    assert mixed >= 6
    epochs = []
    for path in (stored, relabelled):
        loader = Loader(path, batch_size=12, num_workers=2, order=OrderOption.SEQUENTIAL, seed=3,
                        reinforcement_index=True)
        epochs.append([[t.clone() for t in batch] for _ in range(2) for batch in loader])
    for (images_a, _, js_a), (images_b, _, js_b) in zip(*epochs):
        assert torch.equal(js_a, js_b) and torch.equal(images_a, images_b)


def test_relabelled_topk_is_the_new_teacher_on_the_replays(relabelled, tmp_path):
    worst, _, replayed = teacher_on_replay(relabelled, tmp_path, input_size=160)
    assert worst <= 2e-3, worst
    f = BetonFile(relabelled)
    assert any(f.records(i)[j]['mix_flags'] & HAS_PAIR for i, j in replayed)
    name, = [t.name for t in f.teachers]
    assert name == 'bundled:efficientnet_lite0@160' and f.teachers[0].weight == 1


def test_combining_a_teacher_with_itself_leaves_the_labels(stored, tmp_path):
    out = str(tmp_path / 'same.beton')
    done = cli('relabel', stored, out, '--combine', 'mean', '--weight', '0.5', *COMMON)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = BetonFile(stored), BetonFile(out)
    for i in range(len(a)):
        for old, new in zip(a.topk(i), b.topk(i)):
            p_old, p_new = old['prob'].astype(np.float32), new['prob'].astype(np.float32)
            assert np.allclose(p_new, p_old, rtol=2 ** -10, atol=1e-5), (i, p_old, p_new)
            certain = p_old > 1e-3  # below, float16 ties may reorder
            assert np.array_equal(new['cls'][certain], old['cls'][certain])
    assert a.teachers == b.teachers and b.teachers[0].weight == 1  # one teacher, its shares summed


def _smooth(top, num_classes):
    """A stored top-k record as the loader's 'smooth' densify makes it."""
    p = top['prob'].astype(np.float64)
    out = np.full(num_classes, (1 - p.sum()) / (num_classes - len(p)))
    out[top['cls']] = p
    return out


def test_combine_mean_weighs_the_new_teacher_against_the_stored_labels(stored, relabelled, tmp_path):
    out = str(tmp_path / 'grown.beton')
    done = cli('relabel', stored, out, '--teacher-size', '160', '--combine', 'mean', '--weight', '0.25',
               *COMMON)
    assert done.returncode == 0, done.stderr[-2000:]
    old, new, grown = BetonFile(stored), BetonFile(relabelled), BetonFile(out)
    for i in range(len(old)):
        for j in range(old.recipe.num_samples):
            full = new.topk(i)[j]
            p_new = np.zeros(1000)
            p_new[full['cls']] = full['prob'].astype(np.float64)
            expected = 0.25 * p_new + 0.75 * _smooth(old.topk(i)[j], 1000)
            top = grown.topk(i)[j]
            assert np.abs(top['prob'].astype(np.float64) - expected[top['cls']]).max() <= 2e-3
            assert expected[top['cls']].min() >= np.sort(expected)[-10] - 2e-3
    assert [(t.name, t.weight) for t in grown.teachers] == [
        ('bundled:efficientnet_lite0@160', 0.25), ('bundled:efficientnet_lite0@224', 0.75)]
    assert grown.teachers[0].sha256 == old.teachers[0].sha256
    shown = cli('info', out)
    assert '0.25 x bundled:efficientnet_lite0@160 (weights sha256 ' in shown.stdout


def test_a_file_without_the_record_relabels_and_says_unknown(stored, tmp_path):
    """Files made before the record (their bytes are zero) and from ml-dr's pickles."""
    old = str(tmp_path / 'old.beton')
    shutil.copy(stored, old)
    at = fuzz.arguments_offset(stored, 'target') + TEACHERS_AT
    with open(old, 'r+b') as fh:
        fh.seek(at)
        fh.write(bytes(TEACHERS_DTYPE.itemsize))
    assert BetonFile(old).teachers is None
    assert 'unknown' in cli('info', old).stdout
    out = str(tmp_path / 'grown.beton')
    done = cli('relabel', old, out, '--combine', 'mean', '--weight', '0.5', *COMMON)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'labels were by: unknown teachers' in done.stdout
    grown = BetonFile(out).teachers
    assert [(t.name, t.weight) for t in grown] == [('bundled:efficientnet_lite0@224', 0.5), ('', 0.5)]
    assert 'unknown teachers' in cli('info', out).stdout


def test_torchrun_two_processes_give_the_same_file(stored, relabelled, tmp_path):
    out = str(tmp_path / 'two.beton')
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29519', '-m', 'ffcv_dr.cli', 'relabel', stored, out,
                           *NEW, *COMMON], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    same_content(relabelled, out)
    assert BetonFile(out).teachers == BetonFile(relabelled).teachers
    assert not os.path.exists(out + '.parts')


def test_killed_relabel_resumes_without_redoing_chunks(stored, relabelled, tmp_path):
    out = str(tmp_path / 'resumed.beton')
    finished = killed_after_a_chunk(['relabel', stored, out, *NEW, *COMMON], out)
    assert 1 <= len(finished) < 4 and not os.path.exists(out)
    done = cli('relabel', stored, out, *NEW, *COMMON)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'resuming, {len(finished)} of 4 chunks already done' in done.stdout
    same_content(relabelled, out)
    assert not os.path.exists(out + '.parts')


def _plain_ffcv_file(path):
    """ImageNet as FFCV users have it: FFCV's own image and label fields."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), k) for k in range(4)]
    DatasetWriter(path, {'image': RGBImageField(), 'label': IntField()}, num_workers=1).from_indexed_dataset(data)
    return path


def test_files_the_kernels_cannot_replay_are_refused(stored, small_images, tmp_path):
    out = str(tmp_path / 'out.beton')
    newer = str(tmp_path / 'newer.beton')  # a recipe of a format this ffcv-dr does not know
    shutil.copy(stored, newer)
    at = fuzz.arguments_offset(stored, 'image') + RECIPE_DTYPE.fields['version'][1]
    with open(newer, 'r+b') as fh:
        fh.seek(at)
        fh.write(np.uint16(99).tobytes())
    with pytest.raises(JobError, match=f'cannot relabel: {newer}: .*format version 99 is not supported'):
        relabel(newer, out, num_workers=2)
    plain = _plain_ffcv_file(str(tmp_path / 'plain.beton'))
    with pytest.raises(JobError, match=f'cannot relabel: {plain}: not (a readable ffcv-dr|an ffcv-dr) .beton'):
        relabel(plain, out, num_workers=2)
    bare = str(tmp_path / 'bare.beton')
    assert cli('reinforce', small_images, bare, '--samples', '0', '--workers', '2').returncode == 0
    assert BetonFile(bare).teachers is None  # no teacher made it
    with pytest.raises(JobError, match=f'{bare}: holds no reinforcements'):
        relabel(bare, out, num_workers=2)
    assert not os.path.exists(out) and not os.path.exists(out + '.parts')


def test_a_damaged_record_is_refused_by_name(stored, tmp_path):
    """A RandAugment op the kernels do not know, its checksum made to match."""
    f = BetonFile(stored)
    op = f.record_dtype.fields['ra_op'][1]
    damaged = str(tmp_path / 'damaged.beton')
    fuzz.write_records(stored, damaged, [('op', 'image', op, bytes([99]))])
    with pytest.raises(JobError, match=f'{damaged}: sample 0 reinforcement 0: bad RandAugment op'):
        relabel(damaged, str(tmp_path / 'out.beton'), num_workers=2, chunk=3, batch_size=8)
    assert not os.path.exists(tmp_path / 'out.beton')
