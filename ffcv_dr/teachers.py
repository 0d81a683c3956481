"""Teachers for ``ffcv-dr reinforce`` and ``train.mode=kd``: timm models, local
checkpoints, the bundled EfficientNet-Lite0, and ensembles of them (probabilities averaged,
as ml-dr's ``timm_ensemble``)."""
from __future__ import annotations

import functools
import hashlib
from typing import Optional, Sequence

import torch

from .format import TeacherEntry
from .models import Classifier, create


class Teacher(torch.nn.Module):
    """The mean of its members' probabilities."""

    def __init__(self, members: Sequence[Classifier]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.name = ','.join(m.name for m in members)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images).float().softmax(-1) for m in self.members]).mean(0)

    @functools.cached_property
    def digests(self) -> list:
        """(name, SHA-256 of the weights) of each member: what its labels depend
        on, whether the weights came from a checkpoint, a hub or a package."""
        out = []
        for m in self.members:
            h = hashlib.sha256()
            for key, value in m.net.state_dict().items():
                h.update(f'{key}\0{value.dtype}\0{tuple(value.shape)}\0'.encode())
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out.append([m.name, h.hexdigest()])
        return out

    def entries(self, weight: float = 1.0) -> tuple:
        """The members as a file records them (``name@side``: the side each
        sees changes its labels), sharing ``weight`` equally."""
        return tuple(TeacherEntry(f'{m.name}@{m.input_size}', sha, weight / len(self.members))
                     for m, (_, sha) in zip(self.members, self.digests))

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


def load_teacher(spec: str, checkpoints: Sequence[str] = (), pretrained: bool = True,
                 device='cpu', input_size: Optional[int] = None) -> Teacher:
    """``spec``: comma-separated timm model names or ``bundled:efficientnet_lite0``;
    ``checkpoints``: one local checkpoint path per name ('' for none), e.g. from
    ``ffcv-dr train``; ``input_size``: the side the members see (default: their
    pretrained config's), e.g. 96 for a teacher fine-tuned on CIFAR at 96 px."""
    names = [n.strip() for n in spec.split(',') if n.strip()]
    if not names:
        raise ValueError('no teacher given')
    checkpoints = list(checkpoints) or [''] * len(names)
    if len(checkpoints) != len(names):
        raise ValueError(f'{len(names)} teachers but {len(checkpoints)} checkpoint paths')
    members = [create(n, pretrained=pretrained, checkpoint=c, input_size=input_size).eval()
               for n, c in zip(names, checkpoints)]
    return Teacher(members).to(device)
