"""The Loader replays what the file stores: same j for image and target, per epoch."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from ffcv.loader import OrderOption
from PIL import Image

from conftest import IMAGES
from ffcv_dr import Loader, ReplayClock
from ffcv_dr.beton import BetonFile
from ffcv_dr.intake import list_images
from ffcv_dr.geometry import random_erasing
from ffcv_dr.randaugment import POSTERIZE, draw_ops, magnitude_table
from ffcv_dr.replay_clock import STREAM_FRESH_ERASE, STREAM_FRESH_RA, choose


SUBSET = np.arange(0, 500, 4)
GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')


def expected_target(f: BetonFile, index, j, densify='smooth'):
    out = np.zeros(f.recipe.num_classes, np.float32)
    if j < 0:
        out[f.label(index)] = 1
        return out
    top = f.topk(index)[j]
    probs = top['prob'].astype(np.float32)
    if densify == 'smooth':
        out[:] = (1 - probs.sum()) / (f.recipe.num_classes - f.recipe.topk)
        out[top['cls']] = probs
    else:  # ml-dr's 'zeros': softmax over the stored top-k probabilities
        out[top['cls']] = np.exp(probs) / np.exp(probs).sum()
    return out


@pytest.fixture
def gloo_world(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize('workers, order, p, distributed', [
    (1, OrderOption.SEQUENTIAL, 1.0, False),
    (2, OrderOption.RANDOM, 0.5, False),
    (2, OrderOption.QUASI_RANDOM, 1.0, False),
    (2, OrderOption.RANDOM, 0.9, True),
])
def test_image_and_target_replay_the_same_reinforcement(randaug_beton, request, workers, order,
                                                         p, distributed):
    if distributed:
        request.getfixturevalue('gloo_world')
    f = BetonFile(randaug_beton)
    by_label = {f.label(i): i for i in range(len(f))}  # imagenet-sample: one image per class
    seed = 11
    loader = Loader(randaug_beton, batch_size=25, num_workers=workers, order=order, seed=seed, p=p,
                    labels=True, reinforcement_index=True, indices=SUBSET, distributed=distributed,
                    os_cache=order != OrderOption.QUASI_RANDOM)
    seen = {}
    for epoch in range(3):
        # FFCV reuses its output buffers: copy, and check once the epoch is done.
        batches = [tuple(t.clone() for t in batch) for batch in loader]
        assert sum(len(b[0]) for b in batches) == len(SUBSET) // 25 * 25
        for images, targets, labels, js in batches:
            for img, target, label, j in zip(images.numpy(), targets.numpy(), labels.numpy(), js.numpy()):
                i = by_label[int(label)]
                assert j == choose(seed, epoch, i, f.recipe.num_samples, p)
                seen.setdefault(i, []).append(int(j))
                np.testing.assert_allclose(target, expected_target(f, i, j), atol=1e-6)
                assert abs(target.sum() - 1) < 1e-4
                np.testing.assert_array_equal(img, f.render(i, j, seed, epoch))
    sequences = list(seen.values())
    assert sum(len(set(s)) > 1 for s in sequences) > 0.7 * len(sequences)  # other epochs, other j
    if p < 1:
        assert any(-1 in s for s in sequences)


def test_schedule_is_a_pure_function_of_seed_epoch_index():
    a, b, c = ReplayClock(seed=3), ReplayClock(seed=3), ReplayClock(seed=4)
    idx = np.arange(5000)
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        c.set_epoch(epoch)
        np.testing.assert_array_equal(a.choices(idx, 400), b.choices(idx, 400))
        assert (a.choices(idx, 400) != c.choices(idx, 400)).mean() > 0.99
    assert (a.choices(idx, 400, epoch=0) != a.choices(idx, 400, epoch=1)).mean() > 0.99
    counts = np.bincount(a.choices(np.arange(400_000), 400), minlength=400)
    assert counts.min() > 850 and counts.max() < 1150  # about uniform over the 400
    fresh = ReplayClock(seed=3, p=0.99).choices(np.arange(100_000), 400)
    assert 0.008 < (fresh == -1).mean() < 0.012


def test_grayscale_jpegs_come_out_rgb(randaug_beton):
    f = BetonFile(randaug_beton)
    paths = list_images(IMAGES).paths
    gray = [i for i, p in enumerate(paths) if Image.open(p).mode == 'L']
    assert len(gray) >= 3
    for i in gray:
        assert Image.open(paths[i]).format == 'JPEG'
        img = f.render(i, 0)
        assert img.shape == (224, 224, 3)
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
        assert img.std() > 5  # real content, not a blank


def test_zeros_densify_and_output_size(randaug_beton):
    f = BetonFile(randaug_beton)
    loader = Loader(randaug_beton, batch_size=10, num_workers=1, order=OrderOption.SEQUENTIAL,
                    densify='zeros', output_size=(160, 160), indices=np.arange(10),
                    reinforcement_index=True)
    images, targets, js = next(iter(loader))  # noqa: the epoch is abandoned on purpose
    assert images.shape == (10, 160, 160, 3)
    for i in range(10):
        np.testing.assert_allclose(targets[i].numpy(), expected_target(f, i, int(js[i]), 'zeros'), atol=1e-6)


def test_a_plain_ffcv_loader_reads_the_file(randaug_beton):
    import ffcv
    from ffcv_dr import CUSTOM_FIELDS, train_pipelines
    f = BetonFile(randaug_beton)
    clock = ReplayClock(seed=5)
    clock.bind(f)
    loader = ffcv.Loader(randaug_beton, batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                         indices=np.arange(8), custom_fields=CUSTOM_FIELDS,
                         pipelines=train_pipelines(clock, reinforcement_index=True))
    for epoch in (0, 4):
        clock.set_epoch(epoch)
        images, targets, js = [t.clone() for t in next(iter(loader))]
        for i in range(8):
            assert js[i] == choose(np.uint64(5), epoch, i, 8, 1.0)
            np.testing.assert_array_equal(images[i].numpy(), f.render(i, int(js[i]), 5, epoch))
            np.testing.assert_allclose(targets[i].numpy(), expected_target(f, i, int(js[i])), atol=1e-6)


def test_a_cpu_device_gives_normalised_channels_last_images(randaug_beton):
    """device='cpu' normalises inside the compiled stage (FFCV 1.0.2 hangs on a
    compiled, Python, compiled pipeline) and matches the uint8 replay."""
    from ffcv_dr.pipelines import IMAGENET_MEAN, IMAGENET_STD
    f = BetonFile(randaug_beton)
    loader = Loader(randaug_beton, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    indices=np.arange(4), seed=2, device='cpu', reinforcement_index=True)
    images, targets, js = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 224, 224)
    assert images.is_contiguous(memory_format=torch.channels_last)
    for i in range(4):
        want = (f.render(i, int(js[i]), 2, 0) - IMAGENET_MEAN) / IMAGENET_STD
        np.testing.assert_allclose(images[i].permute(1, 2, 0).numpy(), want, atol=1e-5)
        np.testing.assert_allclose(targets[i].numpy(), expected_target(f, i, int(js[i])), atol=1e-6)


def test_mixing_loader_reads_the_paired_image(mixing_beton):
    f = BetonFile(mixing_beton)
    by_label = {f.label(i): i for i in range(len(f))}
    loader = Loader(mixing_beton, batch_size=16, num_workers=2, seed=3, labels=True,
                    reinforcement_index=True)
    paired = 0
    for epoch in range(2):
        for images, _, labels, js in [tuple(t.clone() for t in b) for b in loader]:
            for img, label, j in zip(images.numpy(), labels.numpy(), js.numpy()):
                i = by_label[int(label)]
                paired += f.describe(i, int(j))['params']['pair'] is not None
                np.testing.assert_array_equal(img, f.render(i, int(j), 3, epoch))
    assert paired > 20


def test_fresh_samples_draw_randaugment_and_erasing(randaug_beton):
    """Fresh draws follow torchvision's distributions, and the renders show them:
    the erased box is black and a last Posterize(7 bits) leaves only even levels."""
    mags, signed = magnitude_table(224, 224)
    ops, m = np.empty(2, np.uint8), np.empty(2, np.float32)
    counts, negative, erased = np.zeros(14), 0, []
    for i in range(3000):
        draw_ops(mags, signed, 7, 0, i, STREAM_FRESH_RA, ops, m)
        counts[ops] += 1
        assert np.array_equal(np.abs(m), mags[ops])
        negative += int((m < 0).sum())
        top, left, h, w = random_erasing(224, 224, 0.25, 7, 0, i, STREAM_FRESH_ERASE)
        if h:
            assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
            assert 0.015 < h * w / 224 ** 2 < 0.34
            erased.append(i)
    assert counts.min() > 0.75 * 6000 / 14 and counts.max() < 1.25 * 6000 / 14
    assert 0.4 < negative / (counts[signed].sum() - 0) < 0.6
    assert 0.22 < len(erased) / 3000 < 0.28
    f = BetonFile(randaug_beton)
    posterized = 0
    for i in range(200):
        img = f.render(i, -1, seed=7, epoch=0)
        draw_ops(mags, signed, 7, 0, i, STREAM_FRESH_RA, ops, m)
        if ops[1] == POSTERIZE:
            posterized += 1
            assert not (img & 1).any()
        if i in erased:
            top, left, h, w = random_erasing(224, 224, 0.25, 7, 0, i, STREAM_FRESH_ERASE)
            assert not img[top:top + h, left:left + w].any()
    assert posterized >= 5


@pytest.mark.parametrize('size', [224, 112, 320])
def test_erase_boxes_and_translations_follow_the_output_size(randaug_beton, size):
    """Stored boxes and shifts are in 224 px: at another size they scale with it."""
    f = BetonFile(randaug_beton)
    s = size / f.recipe.size
    checked, shifted = 0, []
    for i in range(0, 500, 3):
        for j in range(2):
            params = f.describe(i, j)['params']
            img = f.render(i, j, size=size)
            if params['erase']:
                top, left, h, w = params['erase']
                t, l = round(top * s), round(left * s)
                assert not img[t:round((top + h) * s), l:round((left + w) * s)].any()
                checked += 1
            (first, _), (op, m) = params['rand_augment']
            if op == 'TranslateX' and first not in GEOMETRIC and not params['erase']:
                band = round(int(abs(m)) * s)
                cols = img[:, :band] if m > 0 else img[:, size - band:]
                inner = img[:, band] if m > 0 else img[:, size - band - 1]
                assert not cols.any(), (i, j, params)
                shifted.append(bool(inner.any()))  # False only on images with black edges
                checked += 1
    assert checked > 40 and np.mean(shifted) > 0.8


def test_output_size_changes_between_epochs_without_a_recompile(randaug_beton):
    """Progressive resizing: set_output_size takes effect at the next epoch, the
    images are the replay at the new size, and nothing is compiled again."""
    from numba.core import event
    f = BetonFile(randaug_beton)
    loader = Loader(randaug_beton, batch_size=8, num_workers=2, order=OrderOption.SEQUENTIAL,
                    indices=np.arange(16), seed=3, reinforcement_index=True)
    for images, _, _ in loader:
        assert images.shape == (8, 224, 224, 3)
    for size in ((160, 160), (96, 128)):
        loader.set_output_size(size)
        with event.install_recorder('numba:compile') as compiles:
            batches = [[t.clone() for t in batch] for batch in loader]
        assert compiles.buffer == []
        images, js = torch.cat([b[0] for b in batches]), torch.cat([b[2] for b in batches])
        assert images.shape == (16, *size, 3)
        for i in (0, 7, 15):
            np.testing.assert_array_equal(images[i].numpy(),
                                          f.render(i, int(js[i]), 3, loader.clock.epoch, size=size))
