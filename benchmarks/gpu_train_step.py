"""Training-step throughput on a GPU, ffcv-dr against plain FFCV, side by side.

ResNet-50 (timm), channels_last, AMP (float16 with a GradScaler, as
ffcv-imagenet), SGD, ``--size`` px (176: the middle of ffcv-imagenet's
resolution ramp). C is fed by ffcv-dr (the stored recipe, soft targets, KL
loss as ml-dr's ReinforcedTrainer); B by plain FFCV (RandomResizedCrop +
flip, integer labels, cross-entropy) from the same images written as
ffcv-imagenet writes ImageNet (FFCV's writer, proportion 0.5, 500 px, q90).
Both get the same workers and batch size;
runs alternate B, C, B, C... after a warm-up epoch each, and the median
images/s of each is reported with the ratio C/B (target: at least 0.98).

    python benchmarks/gpu_train_step.py DATA.beton [--size 176] [--batch-size 256] [--rounds 3]

(``--device cpu`` runs the same steps with bfloat16 autocast: a smoke test only.)
"""
import argparse
import os
import statistics
import tempfile
import time

import timm
import torch
import torch.nn.functional as F

from ffcv_dr import Loader
from ffcv_dr.beton import BetonFile
from ffcv.fields import RGBImageField

from ffcv_dr.bench import FFCV_IMAGENET, ffcv_writer_rate, plain_ffcv_loader, write_mldr_folder


def epoch(loader, step, sync) -> float:
    """Images/s of one full epoch of training steps."""
    sync()
    start, count = time.perf_counter(), 0
    for images, target in loader:
        step(images, target)
        count += len(images)
    sync()
    return count / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('beton')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--size', type=int, default=176, help='output side')
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--rounds', type=int, default=3, help='timed epochs of each loader')
    p.add_argument('--model', default='resnet50')
    p.add_argument('--device', default='cuda')
    args = p.parse_args()
    cuda = args.device.startswith('cuda')
    torch.backends.cudnn.benchmark = True
    model = timm.create_model(args.model, num_classes=BetonFile(args.beton).recipe.num_classes)
    model = model.to(args.device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    scaler = torch.amp.GradScaler(args.device, enabled=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(images, loss_fn, target):
        with torch.autocast(args.device.split(':')[0], dtype=torch.float16 if cuda else torch.bfloat16):
            out = model(images)
        loss = loss_fn(out.float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def soft(out, target):
        return F.kl_div(F.log_softmax(out, -1), target, reduction='batchmean')

    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, 'imagenet.beton')
        images, _ = write_mldr_folder(BetonFile(args.beton), tmp)
        ffcv_writer_rate(images, plain, args.workers, RGBImageField(**FFCV_IMAGENET))
        loaders = {
            'B plain FFCV': (plain_ffcv_loader(plain, args.batch_size, args.workers, args.size,
                                               args.device), F.cross_entropy),
            'C ffcv-dr': (Loader(args.beton, args.batch_size, args.workers, device=args.device,
                                 output_size=(args.size, args.size)), soft),
        }
        rates = {name: [] for name in loaders}
        for r in range(args.rounds + 1):
            for name, (loader, loss_fn) in loaders.items():
                rate = epoch(loader, lambda x, t: step(x, loss_fn, t), sync)
                if r:  # round 0 warms up: compiles the pipelines, picks cuDNN kernels
                    rates[name].append(rate)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f'{torch.cuda.get_device_name() if cuda else "CPU"}, {args.model}, {args.size} px, batch '
          f'{args.batch_size}, {args.workers} workers, {len(BetonFile(args.beton))} images')
    for name, v in rates.items():
        print(f'{name:14s} {med[name]:8.0f} images/s  (runs: {", ".join(f"{x:.0f}" for x in v)})')
    print(f'ratio C/B = {med["C ffcv-dr"] / med["B plain FFCV"]:.3f}')


if __name__ == '__main__':
    main()
