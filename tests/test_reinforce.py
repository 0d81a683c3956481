"""Teacher generation: what is stored is what the teacher says about the
loader's own replay; torchrun and resumed runs give the same file."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HAVE_SHARED
from helpers import killed_after_a_chunk, same_content, teacher_on_replay
from ffcv_dr.beton import BetonFile
from ffcv_dr.format import HAS_CUTMIX, HAS_ERASE, HAS_MIXUP, HAS_PAIR

ARGS = ['--samples', '3', '--chunk', '3', '--batch-size', '8', '--workers', '2', '--seed', '5']


def run_cli(args, **kw):
    return subprocess.run([sys.executable, '-m', 'ffcv_dr.cli', 'reinforce', *args, *ARGS],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope='module')
def one_process(small_images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('one') / 'small.beton')
    done = run_cli([small_images, out])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope='module')
def mixing_process(small_images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('mix') / 'mix.beton')
    done = run_cli([small_images, out, '--recipe', 'rrc+ra+re+mix'])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_stored_topk_is_the_teacher_on_the_loaders_replay(one_process, tmp_path):
    from ffcv_dr.teachers import load_teacher
    f = BetonFile(one_process)
    assert f.recipe.num_samples == 3 and f.recipe.ra_ops == 2 and f.recipe.erase
    assert f.teachers == load_teacher('bundled:efficientnet_lite0').entries()  # the file says who labelled it
    worst, right, _ = teacher_on_replay(one_process, tmp_path)
    assert worst <= 2e-3, worst
    if HAVE_SHARED:  # on real ImageNet photos, a real teacher's top-1 is mostly the label
        assert right >= 12


def test_the_teacher_labels_the_pixels_as_stored(small_images, tmp_path):
    """Stored as ffcv-imagenet stores ImageNet, shrunk (boxes stay in original
    pixels) and half raw: the teacher saw what the loader gives."""
    from ffcv_dr.format import STORED_JPEG, STORED_RAW
    out = str(tmp_path / 'stored.beton')
    done = run_cli([small_images, out, '--write-mode', 'proportion', '--max-resolution', '200',
                    '--jpeg-quality', '90'])
    assert done.returncode == 0, done.stderr[-2000:]
    f = BetonFile(out)
    assert set(f.image_meta['mode']) == {STORED_JPEG, STORED_RAW}
    assert (np.maximum(f.image_meta['width'], f.image_meta['height']) <= 200).all()
    assert (np.maximum(f.image_meta['orig_width'], f.image_meta['orig_height']) > 200).any()
    worst, right, _ = teacher_on_replay(out, tmp_path)
    assert worst <= 2e-3, worst


def test_mixed_topk_is_the_teacher_on_the_loaders_mixed_replay(mixing_process, tmp_path):
    """Mixed samples too: the loader renders the paired image from the file
    and mixes it exactly as generation did."""
    f = BetonFile(mixing_process)
    assert f.recipe.mixing and f.recipe.ra_ops == 2 and f.recipe.erase
    worst, _, replayed = teacher_on_replay(mixing_process, tmp_path)
    assert worst <= 2e-3, worst
    mixed = [(i, j) for i, j in replayed if f.records(i)[j]['mix_flags'] & HAS_PAIR]
    assert len(mixed) >= 6 and any(f.records(i)[j]['pair'] != i for i, j in mixed)


def test_mixing_draws_follow_mldrs_recipe():
    """MixUp and CutMix each with p 0.5; MixUp lam = Beta(1, 1) / 2; CutMix's
    box is rand_bbox of its lam; the paired view has its own draws inside the
    paired image."""
    from ffcv_dr.render import fresh_settings
    from ffcv_dr.format import Recipe
    from ffcv_dr.reinforce import Settings, sample_records
    recipe = Recipe(num_samples=50, topk=5, num_classes=10, ra_ops=2, erase=True, mixing=True)
    settings = Settings('t', (), 0, 'rrc+ra+re+mix', 50, 5, 224, (0.08, 1), (0.75, 4 / 3), 2, 9,
                        0.25, 0, 64, 64, 0, (0.5, 1.0, 2.0), (0.5, 1.0))
    fresh = fresh_settings(recipe)
    sizes = [(500, 375), (300, 800), (640, 480), (333, 500)] * 10
    recs = np.concatenate([sample_records(recipe, settings, fresh, i, sizes, np.uint64(3))
                           for i in range(40)])
    flags = recs['mix_flags']
    mixup, cut, paired = (flags & HAS_MIXUP) != 0, (flags & HAS_CUTMIX) != 0, (flags & HAS_PAIR) != 0
    assert abs(mixup.mean() - 0.5) < 0.05 and abs(cut.mean() - 0.5) < 0.05
    assert np.array_equal(paired, mixup | cut) and abs((mixup & cut).mean() - 0.25) < 0.05
    lam = recs['mixup_lam'][mixup]
    assert lam.min() >= 0 and lam.max() <= 0.5 and abs(lam.mean() - 0.25) < 0.02
    for rec in recs[cut]:
        r1, c1, r2, c2 = rec['cutmix_box'].astype(int)
        side = int(224 * np.sqrt(1 - rec['cutmix_lam']))
        assert 0 <= r1 <= r2 <= 224 and 0 <= c1 <= c2 <= 224
        assert r2 - r1 <= 2 * (side // 2) and c2 - c1 <= 2 * (side // 2)
        assert r2 - r1 == 2 * (side // 2) or r1 == 0 or r2 == 224
    pairs = recs['pair'][paired]
    assert pairs.max() < 40 and len(np.unique(pairs)) > 30
    for rec in recs[paired]:
        w, h = sizes[rec['pair']]
        top, left, ch, cw = rec['pair_crop'].astype(int)
        assert top + ch <= h and left + cw <= w
    assert not np.array_equal(recs['pair_crop'][paired], recs['crop'][paired])
    assert abs(((recs['pair_flags'][paired] & HAS_ERASE) != 0).mean() - 0.25) < 0.06
    assert not recs['pair_flags'][~paired].any() and not recs['mixup_lam'][~mixup].any()


def test_torchrun_two_processes_give_the_same_file(one_process, small_images, tmp_path):
    out = str(tmp_path / 'two.beton')
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29517', '-m', 'ffcv_dr.cli', 'reinforce',
                           small_images, out, *ARGS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    same_content(one_process, out)
    assert not os.path.exists(out + '.parts')


def test_killed_run_resumes_without_redoing_chunks(one_process, small_images, tmp_path):
    out = str(tmp_path / 'resumed.beton')
    finished = killed_after_a_chunk(['reinforce', small_images, out, *ARGS], out)
    assert 1 <= len(finished) < 4 and not os.path.exists(out)
    done = run_cli([small_images, out])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'resuming, {len(finished)} of 4 chunks already done' in done.stdout
    same_content(one_process, out)
    assert not os.path.exists(out + '.parts')


def test_inspect_draws_the_chosen_replays(one_process, tmp_path, monkeypatch):
    """Each panel is a replay of its row's image (three different
    reinforcements per row), as the loader renders it."""
    import matplotlib.axes
    from PIL import Image
    from ffcv_dr.cli import main
    drawn, imshow = [], matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, 'imshow',
                        lambda ax, img, *a, **kw: (drawn.append(np.array(img)), imshow(ax, img, *a, **kw))[1])
    png = str(tmp_path / 'grid.png')
    assert main(['inspect', one_process, '--out', png, '--index', '0', '--index', '7',
                 '--samples', '3']) == 0
    f = BetonFile(one_process)
    assert len(drawn) == 6
    for row, i in enumerate([0, 7]):
        replays = [f.render(i, j) for j in range(f.recipe.num_samples)]
        chosen = [next(j for j, r in enumerate(replays) if np.array_equal(r, img)) for img in drawn[3 * row:3 * row + 3]]
        assert len(set(chosen)) == 3, chosen
    grid = Image.open(png)
    assert grid.width > grid.height  # two rows of three replays
    assert main(['inspect', one_process, '--out', png, '--index', '12']) == 1  # outside 0..11


def test_fresh_draws_follow_the_files_recipe(small_images, tmp_path):
    """A file keeps the draw settings its reinforcements were made with, and the
    loader's fresh samples use them: with the same seed, the fresh sample of
    epoch j is reinforcement j itself."""
    out = str(tmp_path / 'narrow.beton')
    done = run_cli([small_images, out, '--size', '64', '--scale', '0.6', '1', '--ratio', '0.9', '1.1',
                    '--ra-magnitude', '5', '--erase-p', '0.5'])
    assert done.returncode == 0, done.stderr[-2000:]
    f = BetonFile(out)
    r = f.recipe
    assert (r.scale, r.ratio, r.ra_magnitude, r.erase_p) == ((0.6, 1.0), (0.9, 1.1), 5, 0.5)
    for i in range(len(f)):
        meta = f.image_meta[i]
        crops = f.records(i)['crop'].astype(float)
        area = crops[:, 2] * crops[:, 3] / (float(meta['orig_width']) * float(meta['orig_height']))
        assert area.min() >= 0.59, area
        for j in range(r.num_samples):
            assert np.array_equal(f.render(i, -1, seed=5, epoch=j), f.render(i, j)), (i, j)
