"""``ffcv-dr train --config CONFIG.yaml``: train a timm student from an ffcv-dr ``.beton``.

In the manner of ffcv-imagenet's ``train_imagenet.py``, with three modes:

``erm``  ground-truth labels and cross-entropy (label smoothing), images drawn
         fresh each epoch from the recipe's own augmentations (``p = 0``);
``dr``   the stored reinforcements and their soft targets, KL divergence as
         ml-dr's ReinforcedTrainer (``kl_div(log_softmax(out), target, 'batchmean')``);
``kd``   fresh images and a teacher run online on them: the cost DR removes.

SGD or AdamW, linear warm-up then cosine or step decay (per iteration), AMP,
channels_last, optional EMA (timm's ModelEmaV3), DDP under torchrun, a
progress bar, a checkpoint after every epoch and, with ``train.checkpoint_every``,
every n-th step inside one (``--resume`` continues from it: in the middle of an
epoch, with the batches an uninterrupted run would have had, through the
Loader's ``state_dict``), and a JSON line per epoch in ``log.jsonl``. Evaluation reports top-1, top-5
and the expected calibration error (15 bins), and draws a reliability plot.

The validation set is a plain FFCV ``.beton`` (an RGBImageField and an
IntField) or an ImageFolder, written once into such a file in the output
folder. Settings: :data:`DEFAULTS`, overridden by the YAML file, then by
``--set section.key=value``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader as FFCVLoader, OrderOption
from ffcv.transforms import Squeeze, ToTensor
from ffcv.writer import DatasetWriter
from PIL import Image
from tqdm import tqdm

from . import checkpoints
from .beton import BetonFile
from .chunks import group_lock
from .intake import list_images
from .jobs import digest, images_digest
from .models import create
from .pipelines import Loader, arguments
from .train_settings import DEFAULTS, MODES, load_config  # noqa: F401 -- the API

ECE_BINS = 15
COMPILING = (': compiling the loading pipeline before the first batch, once per process (the first '
             "process on a machine also compiles the kernels, which numba caches for later ones)")


def resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int) -> int:
    """ffcv-imagenet's schedule: min_res up to start_ramp, max_res from end_ramp,
    linear in between, rounded to a multiple of 32."""
    if not min_res <= max_res:
        raise ValueError(f'resolution.min_res ({min_res}) must not exceed max_res ({max_res})')
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res]) / 32)) * 32


def lr_factor(step: int, steps_per_epoch: int, cfg_train: dict) -> float:
    """The schedule at iteration ``step``: linear warm-up, then cosine to 0 or steps."""
    warmup = cfg_train['warmup_epochs'] * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg_train['schedule'] == 'step':
        epoch = step // steps_per_epoch
        return cfg_train['step_gamma'] ** sum(epoch >= e for e in cfg_train['step_epochs'])
    total = cfg_train['epochs'] * steps_per_epoch
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Per confidence bin (equal width over the top-1 probability): count, summed
    confidence and number correct, as a (3, bins) tensor that sums across ranks."""
    conf, pred = probs.max(1)
    which = torch.clamp((conf * bins).long(), max=bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=probs.device)
    out[0].index_add_(0, which, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, which, conf.double())
    out[2].index_add_(0, which, (pred == labels).double())
    return out


def expected_calibration_error(table: torch.Tensor) -> float:
    count, conf, correct = table
    n = count.sum()
    return float((torch.abs(correct - conf)).sum() / n) if n else float('nan')


def reliability_plot(table: torch.Tensor, path: str, title: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    count, conf, correct = (t.cpu().numpy() for t in table)
    edges = np.linspace(0, 1, table.shape[1] + 1)
    acc = np.divide(correct, count, out=np.zeros_like(correct), where=count > 0)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.bar(edges[:-1], acc, width=np.diff(edges), align='edge', edgecolor='k', label='accuracy')
    ax.plot([0, 1], [0, 1], 'r--', label='perfect calibration')
    ax.set(xlabel='confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1),
           title=f'{title}\nECE {expected_calibration_error(table):.3f}')
    ax.legend(loc='upper left', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Folder:
    """An ImageFolder as FFCV's writer reads it, labelled like ``convert``."""

    def __init__(self, root):
        self.images = list_images(root)

    def __len__(self):
        return len(self.images.paths)

    def __getitem__(self, i):
        with Image.open(self.images.paths[i]) as img:
            return img.convert('RGB'), int(self.images.labels[i])


def val_beton(val: str, folder: str, workers: int, rank: int) -> str:
    """``val`` itself when it is a file, else the ImageFolder written into
    ``folder/val-KEY.beton`` (small images raw, larger ones as JPEG quality 95),
    KEY a digest of the folder and its images (paths, sizes, times, labels):
    a run with another or changed folder writes its own and removes the old."""
    if os.path.isfile(val):
        return val
    images = _Folder(val)
    key = digest({'folder': os.path.realpath(val),
                  'images': images_digest(val, images.images.paths, images.images.labels)})[:16]
    path = os.path.join(folder, f'val-{key}.beton')
    if rank == 0 and not os.path.exists(path):
        for stale in glob.glob(os.path.join(glob.escape(folder), 'val-*.beton')):
            os.remove(stale)
        tmp = path + '.tmp'
        DatasetWriter(tmp, {'image': RGBImageField(write_mode='smart', smart_threshold=64 * 64 * 3,
                                                   jpeg_quality=95),
                            'label': IntField()}, num_workers=workers).from_indexed_dataset(images)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def val_loader(path, batch_size, workers, size, ratio, distributed):
    return FFCVLoader(path, batch_size=batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL,
                      drop_last=False, distributed=distributed,
                      pipelines={'image': [CenterCropRGBImageDecoder((size, size), ratio), ToTensor()],
                                 'label': [IntDecoder(), ToTensor(), Squeeze()]})


class Trainer:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.rank, self.world, self.device = _setup_distributed(cfg['device'])
        if self.device.type == 'cpu':  # importing FFCV sets torch to one thread
            torch.set_num_threads(max(1, os.cpu_count() // self.world))
        d, t = cfg['data'], cfg['train']
        self.folder = cfg['output']['folder']
        os.makedirs(self.folder, exist_ok=True)
        torch.manual_seed(d['seed'])
        train_file = BetonFile(d['train'])  # no step at all would train: refused naming the setting
        arguments.check_epoch(arguments.per_process(len(train_file), self.world > 1), d['batch_size'], True,
                              d['train'], name='data.batch_size')
        recipe = train_file.recipe
        r = cfg['resolution']
        self.ramp = r['min_res'] is not None  # train_settings.check: both given, min <= max
        # rendered at the side the network sees where no resize on the device is needed
        self.size = ((r['max_res'] if self.ramp else None) or d['image_size'] or cfg['model']['input_size']
                     or recipe.size)
        p = d['p'] if t['mode'] == 'dr' else 0.0  # erm and kd: fresh augmentations only
        self.train_loader = Loader(d['train'], d['batch_size'], d['workers'], order=OrderOption[d['order'].upper()],
                                   distributed=self.world > 1, seed=d['seed'], p=p,
                                   output_size=(self.size, self.size), labels=True,
                                   os_cache=d['os_cache'])
        self.val_loader = None
        if d['val']:
            self.val_loader = val_loader(val_beton(d['val'], self.folder, d['workers'], self.rank),
                                         d['batch_size'], d['workers'], r['val_res'] or self.size,
                                         d['val_crop_ratio'], self.world > 1)
        m = cfg['model']
        extra = {'drop_path_rate': m['drop_path']} if m['drop_path'] else {}
        # uint8 NHWC batches in, resized to input_size and normalised as the network expects
        self.model = create(m['arch'], recipe.num_classes, m['pretrained'],
                            input_size=m['input_size'] or self.size, **extra)
        if self.ramp and not m['input_size']:
            self.model.input_size = 0  # the network sees each epoch's resolution
        memory_format = torch.channels_last if t['channels_last'] else torch.contiguous_format
        self.model = self.model.to(self.device, memory_format=memory_format)
        self.model.memory_format = memory_format
        self.ema = None
        if t['ema_decay']:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=t['ema_decay'])
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        lr = t['lr'] * d['batch_size'] * self.world / 256
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{'params': decay, 'weight_decay': t['weight_decay']},
                  {'params': no_decay, 'weight_decay': 0.0}]
        if t['optimizer'] == 'sgd':
            self.opt = torch.optim.SGD(groups, lr=lr, momentum=t['momentum'])
        else:  # adamw: the settings allow no other
            self.opt = torch.optim.AdamW(groups, lr=lr)
        self.base_lr = lr
        cuda = self.device.type == 'cuda'
        self.amp_dtype = (torch.float16 if cuda else torch.bfloat16) if t['amp'] else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(t['amp']) and cuda)
        self.teacher = None
        if t['mode'] == 'kd':
            from .teachers import load_teacher
            self.teacher = load_teacher(t['teacher'], t['teacher_checkpoints'], t['teacher_pretrained'],
                                        self.device, t['teacher_size'])
        self.start_epoch = 0
        self.compiled = False
        self.in_epoch = None   # where a checkpoint taken inside an epoch left it
        self.checkpoint = os.path.join(self.folder, 'checkpoint.pt')
        self.log = os.path.join(self.folder, 'log.jsonl')
        # what a checkpoint must have been written with to be resumed by this run
        self.resumable = {'model.arch': m['arch'], 'classes': recipe.num_classes,
                          'train.optimizer': t['optimizer'], 'train.ema': bool(t['ema_decay'])}

    def _loss(self, out, images, targets, labels):
        mode = self.cfg['train']['mode']
        if mode == 'erm':
            return F.cross_entropy(out, labels.to(self.device).long(),
                                   label_smoothing=self.cfg['train']['label_smoothing'])
        if mode == 'kd':
            targets = self.teacher(images.to(self.device, non_blocking=True)).clone()
        return F.kl_div(F.log_softmax(out, -1), targets.to(self.device, non_blocking=True),
                        reduction='batchmean')

    def resume(self):
        """Continue from ``OUTPUT/checkpoint.pt``, checked (:mod:`ffcv_dr.checkpoints`);
        without one, say so and start afresh."""
        if not os.path.lexists(self.checkpoint):
            if self.rank == 0:
                self._keep_log_before(0)   # lines of epochs a kill stopped before their checkpoint
                print(f'--resume: no checkpoint at {self.checkpoint}; starting afresh', flush=True)
            return
        if not os.path.exists(self.checkpoint):
            raise ValueError(f'{self.checkpoint}: a link to a file that is not there')
        state = checkpoints.load(self.checkpoint, self.device, self.resumable)
        try:
            self.model.net.load_state_dict(state['model'])
            self.opt.load_state_dict(state['opt'])
            self.scaler.load_state_dict(state['scaler'])
            if self.ema is not None:
                self.ema.load_state_dict(state['ema'])
            torch.set_rng_state(state['rng'])
            if state.get('cuda_rng') is not None and self.device.type == 'cuda':
                torch.cuda.set_rng_state(state['cuda_rng'], self.device)
            epoch, self.in_epoch = int(state['epoch']), state.get('in_epoch')
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f'{self.checkpoint}: does not fit this run ({type(e).__name__}: '
                             f'{checkpoints.first_line(e)})') from None
        if self.in_epoch:  # every rank stands at rank 0's batch
            self.in_epoch['loader']['rank'] = self.train_loader.state_dict()['rank']
            self.start_epoch = epoch
            where = f'epoch {epoch} at step {self.in_epoch["loader"]["batches"]}'
        else:
            self.start_epoch = epoch + 1
            where = f'after epoch {epoch}'
        if self.rank == 0:
            self._keep_log_before(self.start_epoch)
            print(f'resuming {where} from {self.checkpoint}', flush=True)

    def _keep_log_before(self, epoch: int):
        """``log.jsonl`` less the lines of ``epoch`` and later: a line is written
        before its epoch's checkpoint, so a kill between the two leaves a line
        that the resumed run writes again."""
        if not os.path.exists(self.log):
            return
        with open(self.log) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get('epoch', 0) < epoch]
        with open(self.log + '.tmp', 'w') as f:
            f.writelines(lines)
        os.replace(self.log + '.tmp', self.log)

    def _save(self, epoch, in_epoch=None):
        """A checkpoint after ``epoch``, or inside it: ``in_epoch`` holds the
        loader's state and the epoch's running loss. Written whole or not at all."""
        if self.rank != 0:
            return
        state = {'model': self.model.net.state_dict(), 'opt': self.opt.state_dict(),
                 'scaler': self.scaler.state_dict(), 'epoch': epoch, 'rng': torch.get_rng_state(),
                 'cuda_rng': torch.cuda.get_rng_state(self.device) if self.device.type == 'cuda' else None,
                 'ema': self.ema.state_dict() if self.ema is not None else None, 'in_epoch': in_epoch}
        checkpoints.save(self.checkpoint, state, self.resumable)

    def epoch_size(self, epoch) -> int:
        if not self.ramp:
            return self.size
        r = self.cfg['resolution']
        return resolution(epoch, r['min_res'], r['max_res'], r['start_ramp'], r['end_ramp'])

    def train_epoch(self, epoch) -> dict:
        self.net.train()
        loader, t = self.train_loader, self.cfg['train']
        loader.next_epoch = epoch  # the replay schedule and the traversal order follow it
        loader.set_output_size((self.epoch_size(epoch),) * 2)
        steps, every = len(loader), t['checkpoint_every']
        total, count, before = torch.zeros((), device=self.device), 0, 0.0
        resumed, self.in_epoch = self.in_epoch, None
        if resumed:  # the rest of an epoch that a checkpoint stopped inside
            loader.load_state_dict(resumed['loader'])
            total, count, before = resumed['total'].to(self.device), resumed['count'], resumed['seconds']
        first = resumed['loader']['batches'] if resumed else 0
        start = time.perf_counter() - before
        desc = f'epoch {epoch}' + (f' (resumed at step {first})' if first else '')
        compiling = not self.compiled   # numba compiles the pipeline before this process's first batch
        bar = tqdm(loader, desc=desc + (COMPILING if compiling else ''), unit='batch', initial=first,
                   total=steps, disable=self.rank != 0)
        side = 0
        for k, (images, targets, labels) in enumerate(bar, start=first):
            if compiling:
                bar.set_description(desc)
                self.compiled, compiling = True, False
            side = images.shape[1]
            for group in self.opt.param_groups:
                group['lr'] = self.base_lr * lr_factor(epoch * steps + k, steps, t)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.net(images.to(self.device, non_blocking=True))
            loss = self._loss(out.float(), images, targets, labels)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            total += loss.detach()
            count += len(images)
            if k % 10 == 0 or k + 1 == steps:  # the epoch's running mean (a sync: not every step)
                bar.set_postfix(loss=f'{float(total) / (k + 1):.3f}', lr=f"{self.opt.param_groups[0]['lr']:.3g}")
            if every and (k + 1) % every == 0 and k + 1 < steps:
                self._save(epoch, {'loader': loader.state_dict(), 'total': total.detach().cpu(),
                                   'count': count, 'seconds': time.perf_counter() - start})
        seconds = time.perf_counter() - start
        record = {'train_loss': float(total) / max(1, steps), 'epoch_seconds': seconds,
                  'train_images_per_s': count * self.world / seconds,
                  'resolution': int(self.model.input_size or side)}   # the side the network saw
        return {**record, 'resumed_at_step': first} if first else record

    @torch.no_grad()
    def evaluate(self, model=None) -> tuple:
        """(top1, top5, ece, calibration table) over the validation set."""
        model = model or self.model
        model.eval()
        hits = torch.zeros(3, dtype=torch.float64, device=self.device)  # top-1, top-5, count
        table = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=self.device)
        for images, labels in self.val_loader:
            labels = labels.to(self.device).long().reshape(-1)  # Squeeze makes a batch of one 0-d
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = model(images.to(self.device, non_blocking=True))
            probs = out.float().softmax(-1)
            top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
            hits[0] += (top5[:, 0] == labels).sum()
            hits[1] += (top5 == labels[:, None]).any(1).sum()
            hits[2] += len(labels)
            table += calibration(probs, labels)
        if self.world > 1:
            dist.all_reduce(hits)
            dist.all_reduce(table)
        return float(hits[0] / hits[2]), float(hits[1] / hits[2]), expected_calibration_error(table), table

    def fit(self) -> dict:
        record = {}
        for epoch in range(self.start_epoch, self.cfg['train']['epochs']):
            record = {'epoch': epoch, 'mode': self.cfg['train']['mode'], **self.train_epoch(epoch)}
            last = epoch + 1 == self.cfg['train']['epochs']
            if self.val_loader is not None and (last or (epoch + 1) % self.cfg['train']['eval_every'] == 0):
                record['top1'], record['top5'], record['ece'], table = self.evaluate()
                record['confidence'] = float(table[1].sum() / table[0].sum())  # vs top1: over/under-confident
                if self.ema is not None:
                    record['ema_top1'], record['ema_top5'], record['ema_ece'], _ = self.evaluate(self.ema.module)
            if self.rank == 0:   # the line first: a kill before the checkpoint reruns the epoch
                with open(self.log, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                print(json.dumps(record), flush=True)
            self._save(epoch)
        if self.rank == 0 and self.val_loader is not None and record:
            reliability_plot(table, os.path.join(self.folder, 'reliability.png'),
                             f"{self.cfg['model']['arch']} ({self.cfg['train']['mode']})")
        return record


def _setup_distributed(device):
    world = int(os.environ.get('WORLD_SIZE', '1'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda':
        device = f'cuda:{local}'
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return (dist.get_rank(), dist.get_world_size(), device) if world > 1 else (0, 1, device)


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during ``train``; ``args[0]``: the checkpoint to resume
    from, or None where there is none."""


def train(cfg: dict, resume: bool = False) -> dict:
    """Run a whole training; returns the last epoch's log record. One run
    holds the output folder at a time (a second is refused, naming the
    holder); a folder this run made is removed again if the run fails before
    its first checkpoint; Ctrl-C raises :class:`Interrupted`, naming the
    checkpoint."""
    folder = cfg['output']['folder']
    made = not os.path.exists(folder)
    checkpoint = os.path.join(folder, 'checkpoint.pt')
    try:
        rank, world, _ = _setup_distributed(cfg['device'])
        os.makedirs(folder, exist_ok=True)
        with group_lock(folder, rank, world):   # one run per output folder
            trainer = Trainer(cfg)
            with open(os.path.join(trainer.folder, 'config.yaml'), 'w') as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            if resume:
                trainer.resume()
            return trainer.fit()
    except BaseException as e:
        kept = os.path.exists(checkpoint)
        if made and not kept and int(os.environ.get('RANK', '0')) == 0:
            shutil.rmtree(folder, ignore_errors=True)   # nothing to resume from: leave nothing
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(checkpoint if kept else None) from None
        raise
