"""Images come normalised as the model wants them: the bundled EfficientNet-Lite0
takes (x - 127) / 128, timm models their pretrained config's mean and std."""
import numpy as np
import pytest
import torch
from ffcv.loader import OrderOption

import ffcv_dr
from ffcv_dr.demo import write_photos
from ffcv_dr.models import create
from ffcv_dr.reinforce import reinforce


@pytest.fixture(scope='module')
def photos_beton(tmp_path_factory):
    """scikit-image's photos, stored for fresh augmentations only (no teacher)."""
    root = tmp_path_factory.mktemp('photos')
    out = str(root / 'photos.beton')
    reinforce(write_photos(str(root / 'images')), out, samples=0, topk=1, recipe='rrc+ra+re', size=64,
              num_workers=2)
    return out


def _batch(beton, **kw):
    loader = ffcv_dr.Loader(beton, batch_size=8, num_workers=2, order=OrderOption.SEQUENTIAL, p=0, **kw)
    return next(iter(loader))[0]


def test_the_bundled_model_sees_its_own_preprocessing(photos_beton):
    """The loader's normalised images, fed to the bare network, give the logits
    the model gives on the same uint8 pixels through its own preprocessing."""
    model = create('bundled:efficientnet_lite0', pretrained=True).eval()
    norm = ffcv_dr.normalization(model)
    assert np.allclose(norm['mean'], 127) and np.allclose(norm['std'], 128)
    pixels = _batch(photos_beton)                               # uint8 NHWC, no device
    images = _batch(photos_beton, device='cpu', **norm)          # float32 NCHW
    assert images.dtype == torch.float32 and images.shape == (8, 3, 64, 64)
    want = (pixels.permute(0, 3, 1, 2).float() - 127) / 128
    torch.testing.assert_close(images, want, rtol=0, atol=1e-5)
    model.input_size = 0  # as train does: the network takes the loader's size
    with torch.inference_mode():
        torch.testing.assert_close(model.net(images.contiguous()), model(pixels), rtol=1e-4, atol=1e-4)
    imagenet = _batch(photos_beton, device='cpu')               # the default: ImageNet's mean/std
    assert (imagenet - want).abs().max() > 0.5                  # what the old example fed this model


def test_timm_models_name_their_normalisation():
    import timm
    vit = ffcv_dr.normalization(timm.create_model('vit_tiny_patch16_224', pretrained=False))
    resnet = ffcv_dr.normalization(timm.create_model('resnet18', pretrained=False))
    assert np.allclose(vit['mean'], 127.5) and np.allclose(vit['std'], 127.5)
    assert np.allclose(resnet['mean'], [123.675, 116.28, 103.53])
    with pytest.raises(ValueError, match='says nothing of its normalisation'):
        ffcv_dr.normalization(torch.nn.Linear(2, 2))
