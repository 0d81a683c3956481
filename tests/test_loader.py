"""The Loader replays what the file stores: same j for image and target, per epoch."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from ffcv.loader import OrderOption
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from conftest import IMAGES, needs_shared
from helpers import psnr
from ffcv_dr import Loader, ReplayClock
from ffcv_dr.beton import BetonFile
from ffcv_dr.convert import list_images
from ffcv_dr.schedule import choose


pytestmark = needs_shared
SUBSET = np.arange(0, 500, 4)


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


def test_geometric_replay_matches_torchvision(randaug_beton):
    """Against torchvision's resized_crop + hflip on the decoded original with the
    stored box: the threshold sits far above what a wrong box or flip gives."""
    f = BetonFile(randaug_beton)
    paths = list_images(IMAGES).paths
    good, wrong_flip, wrong_box = [], [], []
    for i in range(0, 500, 25):
        original = decode_jpeg(torch.from_numpy(np.fromfile(paths[i], np.uint8)), mode=ImageReadMode.RGB)
        for j in range(2):
            rec = f.describe(i, j)['params']
            top, left, h, w = rec['crop']
            ref = F.resized_crop(original, top, left, h, w, [224, 224], antialias=True)
            flipped = F.hflip(ref)
            if rec['flip']:
                ref, flipped = flipped, ref
            shifted = F.resized_crop(original, top + h // 8, left + w // 8, h, w, [224, 224], antialias=True)
            if rec['flip']:
                shifted = F.hflip(shifted)
            got = f.render(i, j)
            good.append(psnr(got, ref.permute(1, 2, 0).numpy()))
            wrong_flip.append(psnr(got, flipped.permute(1, 2, 0).numpy()))
            wrong_box.append(psnr(got, shifted.permute(1, 2, 0).numpy()))
    assert min(good) > 27, good
    assert max(wrong_flip) < 24 and max(wrong_box) < 24, (max(wrong_flip), max(wrong_box))


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
