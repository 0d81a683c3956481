"""Ready-made pipelines and the Loader for training from an ffcv-dr ``.beton``."""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence, Tuple

import ffcv.loader
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import OrderOption
from ffcv.loader.loader import DEFAULT_OS_CACHE
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from ..beton import BetonFile, metadata_crc
from ..file_reads import open_for_reads
from ..page_order import QuasiRandomPages
from . import arguments, resume
from ..fields import (CUSTOM_FIELDS, ReinforcedImageDecoder, ReinforcementIndexDecoder,
                      SoftTargetDecoder)
from ..replay_clock import ReplayClock

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def normalization(model) -> dict:
    """``mean`` and ``std`` (0..255 pixel units) a network was trained with, for
    :class:`Loader`: those of an ffcv-dr :class:`~ffcv_dr.models.Classifier`
    (the bundled EfficientNet-Lite0 wants ``(x - 127) / 128``, not ImageNet's)
    or of a timm model's pretrained config."""
    from ..models import Classifier
    if isinstance(model, Classifier):
        return {'mean': model.mean.flatten().cpu().numpy().astype(np.float64),
                'std': model.std.flatten().cpu().numpy().astype(np.float64)}
    cfg = getattr(model, 'pretrained_cfg', None)
    if not cfg or 'mean' not in cfg or 'std' not in cfg:
        raise ValueError(f'{type(model).__name__} says nothing of its normalisation; pass mean and std')
    return {'mean': np.array(cfg['mean']) * 255, 'std': np.array(cfg['std']) * 255}


def image_stages(device=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=np.float16) -> list:
    """What follows an image decoder: uint8 NHWC CPU tensors without a device;
    with one, normalised NCHW channels_last images as ffcv-imagenet's
    ``train_imagenet.py`` makes them (``dtype`` on a GPU, float32 on the CPU,
    where FFCV's NormalizeImage has no float16 and must run inside the
    compiled stage: FFCV 1.0.2 hangs building a compiled, Python, compiled
    pipeline)."""
    if device is None:
        return [ToTensor()]
    device = torch.device(device)  # FFCV's graph needs a torch.device, not a string
    if device.type == 'cpu':
        return [NormalizeImage(np.asarray(mean), np.asarray(std), np.float32), ToTensor(),
                ToTorchImage()]
    return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
            NormalizeImage(np.asarray(mean), np.asarray(std), dtype)]


def train_pipelines(clock: Optional[ReplayClock] = None,
                    output_size: Optional[Tuple[int, int]] = None, device=None,
                    densify: str = 'smooth', labels: bool = False,
                    reinforcement_index: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    dtype=np.float16) -> dict:
    """``pipelines`` for ``ffcv.Loader`` (with ``custom_fields=CUSTOM_FIELDS``):
    images as :func:`image_stages` gives them, float32 soft targets (and labels)
    on ``device``. The decoders share ``clock`` (default: a new
    ``ReplayClock()``, seed 0, p 1); the Loader binds it to its file and
    advances it every epoch."""
    clock = ReplayClock() if clock is None else clock
    to_device = [] if device is None else [ToDevice(torch.device(device), non_blocking=True)]
    pipelines = {'image': [ReinforcedImageDecoder(output_size, clock),
                           *image_stages(device, mean, std, dtype)],
                 'target': [SoftTargetDecoder(clock, densify), ToTensor(), *to_device],
                 'label': None}
    if labels:
        pipelines['label'] = [IntDecoder(), ToTensor(), Squeeze(), *to_device]
    if reinforcement_index:
        pipelines['reinforcement'] = PipelineSpec(
            'target', decoder=ReinforcementIndexDecoder(clock), transforms=[ToTensor(), Squeeze()])
    return pipelines


def _operations(spec) -> list:
    if isinstance(spec, PipelineSpec):
        return [spec.decoder, *spec.transforms]
    return list(spec or ())


class Loader(ffcv.loader.Loader):
    """An ``ffcv.Loader`` that replays the stored reinforcements.

    FFCV's arguments come first, with FFCV's names, order and meaning
    (``fname, batch_size, num_workers, os_cache, order, distributed, seed,
    indices, pipelines, custom_fields, drop_last, batches_ahead,
    recompile``); ffcv-dr's own are keyword-only after them. Two defaults
    differ from FFCV's: ``order`` is RANDOM (this is a training loader;
    FFCV's SEQUENTIAL would feed each class in turn), and ``seed`` is 0, not
    a random one, so a run's replays and its resume state are reproducible
    (``seed=None`` draws one as FFCV does).

    Yields ``(images, soft_targets)``, then ``labels`` and the replayed
    reinforcement index ``j`` (-1: fresh augmentation) when asked for. Each
    epoch sample i replays j = f(seed, epoch, i); the same ``seed`` also seeds
    FFCV's traversal order. ``pipelines`` changes these as in FFCV: a field's
    list replaces ours (``None`` leaves the field out), e.g.
    ``{'image': [ReinforcedImageDecoder(), ToTensor(), ToDevice(dev),
    ToTorchImage(), NormalizeImage(mean, std, np.float16), MyOp()]}`` or
    ``{'label': [IntDecoder(), ToTensor(), Squeeze()]}``; ffcv-dr decoders in
    it replay with this Loader's clock (its ``seed`` and ``p``). ``p`` is the
    probability of replaying a stored reinforcement rather than drawing a
    fresh augmentation (the recipe's ops, without mixing) with the one-hot
    label (ml-dr trains with 0.99).
    ``order=OrderOption.QUASI_RANDOM`` reads the file page by page, for a file
    larger than memory with ``os_cache=False``, also with ``distributed=True``
    (:mod:`ffcv_dr.page_order`); mixing recipes then read each paired image
    from the file by itself (:mod:`ffcv_dr.file_reads`).
    :meth:`set_output_size` changes the image size between epochs
    (progressive resizing) without recompiling anything. :meth:`state_dict`
    and :meth:`load_state_dict` resume in the middle of an epoch, exactly
    (:mod:`ffcv_dr.pipelines.resume`). With a ``device``,
    images come normalised with ``mean`` and ``std`` (0..255 units; ImageNet's
    by default): pass ``**normalization(model)`` for a model trained otherwise.
    """

    def __init__(self, fname: str, batch_size: int, num_workers: int = -1,
                 os_cache: bool = DEFAULT_OS_CACHE, order=OrderOption.RANDOM,
                 distributed: bool = False, seed: Optional[int] = 0,
                 indices: Sequence[int] = None, pipelines: Optional[dict] = None,
                 custom_fields: Optional[dict] = None, drop_last: bool = True,
                 batches_ahead: int = 3, recompile: bool = False, *, p: float = 1.0,
                 output_size: Optional[Tuple[int, int]] = None, device=None,
                 densify: str = 'smooth', labels: bool = False,
                 reinforcement_index: bool = False, dtype=np.float16, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        if seed is None:  # FFCV's meaning: 0 under distributed, so every rank agrees
            seed = 0 if distributed else int(np.random.randint(0, np.iinfo('int32').max))
        arguments.check(batch_size=batch_size, num_workers=num_workers, order=order,
                        distributed=distributed, seed=seed, p=p, densify=densify, labels=labels,
                        reinforcement_index=reinforcement_index, os_cache=os_cache,
                        drop_last=drop_last, batches_ahead=batches_ahead, dtype=dtype, mean=mean,
                        std=std, recompile=recompile)
        arguments.pipelines(pipelines)
        device = arguments.device(device)
        self.clock = ReplayClock(seed, p)
        source = _hold(self, fname)
        beton = BetonFile(fname, source=source)  # refuses, naming the file, sample and field, a bad file
        indices = arguments.indices(indices, len(beton), fname)
        arguments.check_epoch(arguments.per_process(len(beton) if indices is None else len(indices), distributed),
                              batch_size, drop_last, fname)
        self._bytes_per_pixel = 3 * (3 if beton.recipe.mixing else 2)  # output and scratch
        output_size = arguments.output_size(output_size, batch_size, batches_ahead + 2,
                                            self._bytes_per_pixel, beton.recipe.size)
        self.clock.bind(beton)
        ours = train_pipelines(self.clock, output_size, device, densify, labels,
                               reinforcement_index, mean, std, dtype)
        ours.update(pipelines or {})
        for op in (op for spec in ours.values() for op in _operations(spec)):
            if isinstance(getattr(op, 'clock', None), ReplayClock):
                op.clock = self.clock   # image and target agree; seed, p and resume hold
        self.image_decoder = next((op for op in _operations(ours.get('image'))
                                   if isinstance(op, ReinforcedImageDecoder)), None)
        self._identity = resume.identity(source, len(beton), indices, distributed, seed=seed,
                                         p=p, order=order, batch_size=batch_size,
                                         drop_last=drop_last, densify=densify)
        self._position, self._skip = (0, 0), 0   # (epoch, batches handed out); batches to cut
        quasi_random = order == OrderOption.QUASI_RANDOM
        try:  # the decoders refuse, when compiled here, what this file cannot give
            super().__init__(source, batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL if quasi_random else order,
                             distributed=distributed, seed=seed, indices=indices,
                             pipelines=ours, custom_fields={**CUSTOM_FIELDS, **(custom_fields or {})},
                             drop_last=drop_last, batches_ahead=batches_ahead, recompile=recompile)
        except ValueError as e:
            raise ValueError(f'{fname}: {e}') from None
        self.fname = fname  # FFCV reads ``source``
        if quasi_random:  # FFCV's refuses distributed=True (and its class cannot be passed in)
            pages = beton.image_meta['data_ptr'] >> np.uint64(int(np.log2(self.reader.page_size)))
            self.traversal_order = QuasiRandomPages(self, pages)
            self._args['order'] = order
            self.first_traversal_order = self.next_traversal_order()

    def __iter__(self):
        self.clock.report_damaged()  # what the epochs before found
        epoch, done = self.next_epoch, self._skip
        return resume.Delivered(super().__iter__(), self, epoch, done)

    def next_traversal_order(self):
        """FFCV's order for the next epoch, less the batches a resumed epoch
        has already handed out."""
        order = super().next_traversal_order()
        if self._skip:
            order = order[:len(self) * self.batch_size][self._skip * self.batch_size:]
            self._skip = 0
        return order

    def state_dict(self) -> dict:
        """Where the caller stands: the epoch and the batches of it handed
        out so far (prefetched ones not counted), the output size, and what
        the state is valid for. Small and picklable (no tensors); take it at
        any point, inside or between epochs."""
        epoch, batches = self._position
        if batches >= len(self):   # every batch handed out, the end not yet seen
            epoch, batches = epoch + 1, 0
        return {'format': resume.FORMAT, 'epoch': epoch, 'batches': batches,
                'output_size': self.image_decoder and self.image_decoder.output_size,
                **self._valid_for()}

    def load_state_dict(self, state: dict):
        """Continue from ``state`` (of a Loader built with the same file and
        arguments): the next ``iter`` yields the rest of that epoch, then the
        epochs after it, exactly as an uninterrupted run. The resumed epoch
        has ``len(self) - state['batches']`` batches."""
        resume.check(state, self._valid_for(), self.fname)
        epoch, batches = state['epoch'], state['batches']
        if batches >= len(self):
            raise ValueError(f'{self.fname}: the state stands at batch {batches} of an epoch of '
                             f'{len(self)} batches')
        if state.get('output_size') is not None:
            self.set_output_size(tuple(state['output_size']))
        self.next_epoch, self._skip, self._position = epoch, batches, (epoch, batches)

    def _valid_for(self) -> dict:
        if 'file_crc' not in self._identity:
            self._identity['file_crc'] = metadata_crc(self.reader.metadata)
        return self._identity

    def set_output_size(self, output_size: Tuple[int, int]):
        """Images of ``output_size`` (height, width) from the next epoch on.

        FFCV sizes its buffers anew at the start of each epoch, and the
        compiled decoder takes the size from the buffer it writes to (stored
        boxes and translations scale with it), so the next epoch's first
        batch comes as fast as any other."""
        if self.image_decoder is None:
            raise ValueError(f'{self.fname}: set_output_size needs a ReinforcedImageDecoder in the '
                             "'image' pipeline, and this Loader's pipelines have none")
        self.image_decoder.output_size = arguments.output_size(
            output_size, self.batch_size, self.batches_ahead + 2, self._bytes_per_pixel)


def _hold(loader, fname: str) -> str:
    """A path to the file ``fname`` names now, whatever is renamed over it
    later: ``/proc/self/fd/N`` of a descriptor open for the loader's life.
    FFCV reads the file by name: its Reader and memory map when built, its
    process cache's page readers at every epoch; a file replaced by rename
    mid-training would mix the old file's metadata with the new one's pages."""
    if not os.path.isfile(fname):
        return fname  # BetonFile says what is wrong
    link = f'/proc/self/fd/{open_for_reads(loader, fname)}'
    return link if os.path.exists(link) else fname


def epoch_rate(loader) -> float:
    """Images/s of one full epoch of ``loader``."""
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch[0])
    return count / (time.perf_counter() - start)


def epoch_rates(loader, epochs: int) -> list:
    """Images/s of ``epochs`` epochs after a warm-up one (which compiles the pipeline)."""
    return [epoch_rate(loader) for _ in range(epochs + 1)][1:]
