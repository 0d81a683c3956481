"""Are `ffcv-dr reinforce` and `ffcv-dr relabel` teacher-bound? The teacher's
own forward rate on pre-made batches against each whole pipeline's
(reinforce: sampling, JPEG reading, loader kernels, teacher, top-k, chunk
files; relabel: reading the stored records from the .beton reinforce wrote,
the same kernels with their mixing partners, teacher, top-k, chunk files),
measured side by side in one run.

    .venv/bin/python benchmarks/generation.py [--teacher NAME] [--device cuda] [--images N]

Rendering of the next group of images overlaps the teacher's forward pass, so
on a GPU the ratio stays near 1 while the CPU threads keep up.
"""
import argparse
import os
import tempfile
import time

import torch

from ffcv_dr.intake import list_images
from ffcv_dr.reinforce import reinforce
from ffcv_dr.relabel import relabel
from ffcv_dr.teachers import load_teacher

SAMPLE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'imagenet-sample', 'train')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--teacher', default='bundled:efficientnet_lite0')
    p.add_argument('--device', default='cpu')
    p.add_argument('--images-dir', default=SAMPLE, help='ImageFolder (default: imagenet-sample)')
    p.add_argument('--images', type=int, default=24, help='its first N images')
    p.add_argument('--recipe', default='rrc+ra+re')
    p.add_argument('--no-pretrained', action='store_true', help='timm teacher, random weights')
    p.add_argument('--samples', type=int, default=8)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, 'images')
        for path in list_images(args.images_dir).paths[:args.images]:
            cls = os.path.basename(os.path.dirname(path))
            os.makedirs(os.path.join(folder, cls), exist_ok=True)
            os.symlink(os.path.abspath(path), os.path.join(folder, cls, os.path.basename(path)))
        # a chunk's views fill at least one teacher batch: smaller chunks pad every batch
        chunk = max(8, -(-args.batch_size // args.samples))
        kw = dict(teacher=args.teacher, samples=args.samples, batch_size=args.batch_size,
                  device=args.device, num_workers=args.workers, chunk=chunk, recipe=args.recipe,
                  pretrained=not args.no_pretrained)
        teacher = load_teacher(args.teacher, pretrained=not args.no_pretrained, device=args.device)
        batch = torch.randint(0, 256, (args.batch_size, 224, 224, 3), dtype=torch.uint8)
        teacher.probs(batch, args.batch_size, args.device)

        def teacher_alone(reps=3):
            start = time.perf_counter()
            for _ in range(reps):
                teacher.probs(batch, args.batch_size, args.device)
            return reps * args.batch_size / (time.perf_counter() - start)

        reinforce(folder, os.path.join(tmp, 'warmup.beton'), **kw)  # compiles the kernels
        rates = [teacher_alone()]
        result = reinforce(folder, os.path.join(tmp, 'timed.beton'), **kw)
        pipeline = result['rate'] * args.samples
        kw = {k: kw[k] for k in ('teacher', 'batch_size', 'device', 'num_workers', 'chunk', 'pretrained')}
        relabel(os.path.join(tmp, 'timed.beton'), os.path.join(tmp, 'warmup2.beton'), **kw)
        result = relabel(os.path.join(tmp, 'timed.beton'), os.path.join(tmp, 'relabelled.beton'), **kw)
        relabelling = result['rate'] * args.samples
        alone = max(rates + [teacher_alone()])  # before and after the jobs: the faster is the bar
    print(f'teacher {args.teacher} on {args.device} ({args.recipe}): {alone:.1f} images/s alone; '
          f'reinforce {pipeline:.1f} reinforcements/s, ratio {pipeline / alone:.2f}; '
          f'relabel {relabelling:.1f} reinforcements/s, ratio {relabelling / alone:.2f}')


if __name__ == '__main__':
    main()
