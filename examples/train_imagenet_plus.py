"""Train a timm model on an ffcv-dr .beton, in the manner of ffcv-imagenet's
train_imagenet.py: the stored soft targets with a KL loss, SGD with a
triangular learning rate, progressive resizing, AMP, channels_last, DDP under
torchrun. Runs on the CPU as well as on GPUs.

    python examples/train_imagenet_plus.py --data imagenet-plus.beton --arch resnet50
    torchrun --nproc_per_node 8 examples/train_imagenet_plus.py --data imagenet-plus.beton

`ffcv-dr train` is the same loop with validation, EMA, checkpoints inside
epochs, resume and logs; this file is the part to copy into a script of yours.
"""
import argparse
import os
import time

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ffcv.loader import OrderOption

import ffcv_dr
from ffcv_dr.beton import BetonFile


def resolution(epoch, args):
    """ffcv-imagenet's ramp: min_res until start_ramp, max_res from end_ramp, steps of 32 px."""
    res = np.interp(epoch, [args.start_ramp, args.end_ramp], [args.min_res, args.max_res])
    return int(np.round(res / 32)) * 32 if args.min_res != args.max_res else args.min_res


def learning_rate(step, steps_per_epoch, args, world_size):
    """Linear up to the peak at lr_peak_epoch, then linearly down to 0; --lr is
    for a global batch of 256 and scales linearly with batch size x GPUs."""
    peak = args.lr * args.batch_size * world_size / 256
    epoch = step / steps_per_epoch
    return float(np.interp(epoch, [0, args.lr_peak_epoch, args.epochs], [peak * 1e-4, peak, 0]))


def main(args):
    distributed = 'WORLD_SIZE' in os.environ  # under torchrun
    rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(f'cuda:{rank}' if torch.cuda.is_available() else 'cpu')
    if distributed:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    world_size = dist.get_world_size() if distributed else 1
    num_classes = BetonFile(args.data).recipe.num_classes
    indices = np.arange(args.limit) if args.limit else None  # FFCV's indices=: a subset

    # -- the README's training snippet: begin
    model = timm.create_model(args.arch, num_classes=num_classes)
    model = model.to(device, memory_format=torch.channels_last)
    loader = ffcv_dr.Loader(args.data, args.batch_size, args.workers, order=OrderOption.RANDOM,
                            distributed=distributed, seed=0, indices=indices,
                            p=0.99,                          # ml-dr: 1% fresh views, one-hot label
                            output_size=(args.min_res, args.min_res), device=device,
                            **ffcv_dr.normalization(model))  # the model's mean and std
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == 'cuda' else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0, momentum=0.9, weight_decay=args.weight_decay)
    amp = torch.float16 if device.type == 'cuda' else torch.bfloat16
    scaler = torch.amp.GradScaler(enabled=device.type == 'cuda')
    step = 0
    for epoch in range(args.epochs):
        res, start = resolution(epoch, args), time.perf_counter()
        loader.set_output_size((res, res))                   # progressive resizing, no recompile
        model.train()
        for images, soft_targets in loader:                  # normalised NCHW, float32 (B, classes)
            for group in optimizer.param_groups:
                group['lr'] = learning_rate(step, len(loader), args, world_size)
            with torch.autocast(device.type, dtype=amp):
                logits = model(images)
            loss = F.kl_div(F.log_softmax(logits.float(), -1), soft_targets, reduction='batchmean')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
    # -- the README's training snippet: end
        if rank == 0:
            print(f'epoch {epoch} res {res} loss {loss.item():.4f} lr {group["lr"]:.4g} '
                  f'{time.perf_counter() - start:.1f} s', flush=True)
    if rank == 0 and args.out:
        state = (model.module if distributed else model).state_dict()
        torch.save({'model': state, 'arch': args.arch, 'epochs': args.epochs}, args.out)
        print(f'saved {args.out}')
    if distributed:
        dist.destroy_process_group()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', required=True, help='the ffcv-dr .beton')
    p.add_argument('--arch', default='resnet50', help='a timm model name')
    p.add_argument('--epochs', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=256, help='per GPU (per process)')
    p.add_argument('--workers', type=int, default=-1, help='decoding threads per process (-1: every core)')
    p.add_argument('--lr', type=float, default=0.5, help='peak lr for a global batch of 256')
    p.add_argument('--lr-peak-epoch', type=float, default=2)
    p.add_argument('--weight-decay', type=float, default=5e-5)
    p.add_argument('--min-res', type=int, default=160)
    p.add_argument('--max-res', type=int, default=192)
    p.add_argument('--start-ramp', type=int, default=11, help='epoch the resolution ramp starts')
    p.add_argument('--end-ramp', type=int, default=13, help='epoch it reaches --max-res')
    p.add_argument('--limit', type=int, default=0, help='train on the first N images only (0: all)')
    p.add_argument('--out', default='', help='save the final weights here')
    return p.parse_args(argv)


if __name__ == '__main__':
    main(parse())
