"""The reinforcement effect, measured on CIFAR-10 with the project's own tools.

    .venv/bin/python experiments/cifar10.py [--out out/cifar10]

1. Unpack ``cifar10-jpeg.tar.gz`` into a temporary folder: the first
   ``--train-per-class`` training images of each class, and the whole test set.
2. Teacher: the ImageNet-1k EfficientNet-Lite0 bundled with ffcv-dr, fine-tuned
   with ``ffcv-dr train`` (erm, no label smoothing) on those images, seen at
   ``--teacher-size``.
   A pretrained teacher stands in for ImageNet+'s teachers, which saw far
   more data than the student; a few epochs of fine-tuning make it much better
   than any student this budget can train from scratch.
3. CIFAR-10+: ``ffcv-dr reinforce`` with that teacher (RandomResizedCrop,
   flip, RandAugment, RandomErasing at 32 px; its top-k).
4. The same student, from scratch, at each epoch budget: ``erm`` (labels,
   cross-entropy with label smoothing, fresh draws of the same recipe) and
   ``dr`` (CIFAR-10+'s soft targets), equal iterations; ``kd`` (the teacher
   run online) at the smallest budget, for its cost.

Writes ``results.json``, ``results.md`` (the table) and ``accuracy.png``
(top-1 against epochs, as the paper's Fig. 1) in ``--out``; each run's log,
checkpoint and reliability plot stay in ``--out/runs``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, '..', '..', 'shared', 'data', 'cifar10-jpeg.tar.gz')
TEACHER = 'bundled:efficientnet_lite0'


def unpack(archive: str, folder: str, train_per_class: int) -> tuple:
    """``folder/train`` (the first ``train_per_class`` images of each class, in
    name order) and ``folder/test`` as ImageFolders."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith('.jpg')]
        keep, per_class = [], {}
        for m in sorted(members, key=lambda m: m.name):
            split, cls, _ = m.name.split('/')
            if split == 'train':
                per_class[cls] = per_class.get(cls, 0) + 1
                if per_class[cls] > train_per_class:
                    continue
            keep.append(m)
        tar.extractall(folder, members=keep, filter='data')
    return os.path.join(folder, 'train'), os.path.join(folder, 'test')


def ffcv_dr(*args, log: str):
    """Run one ``ffcv-dr`` command, its output to ``log``; stop if it fails."""
    command = [sys.executable, '-m', 'ffcv_dr.cli', *map(str, args)]
    print('$ ffcv-dr ' + ' '.join(map(str, args)), flush=True)
    with open(log, 'w') as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f'ffcv-dr {args[0]} failed (exit {done.returncode}); {log} ends:\n{tail}')


def train(name: str, out: str, settings: dict) -> list:
    """One ``ffcv-dr train`` run in ``out/runs/name``; its log records."""
    folder = os.path.join(out, 'runs', name)
    if os.path.exists(os.path.join(folder, 'done')):  # finished in an earlier run of this script
        print(f'{name}: done already', flush=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        sets = [f'--set={k}={json.dumps(v)}' for k, v in {**settings, 'output.folder': folder}.items()]
        ffcv_dr('train', *sets, log=os.path.join(folder, 'stdout.txt'))
        open(os.path.join(folder, 'done'), 'w').close()
    with open(os.path.join(folder, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def epoch_seconds(records: list) -> float:
    """Median seconds per epoch, the first (which compiles the pipeline) left out."""
    times = [r['epoch_seconds'] for r in records[1:]] or [records[0]['epoch_seconds']]
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--data', default=DATA, help='cifar10-jpeg.tar.gz')
    ap.add_argument('--out', default='out/cifar10')
    ap.add_argument('--train-per-class', type=int, default=1000)
    ap.add_argument('--budgets', type=int, nargs='+', default=[4, 8, 16], help='student epochs')
    ap.add_argument('--student', default='resnet10t', help='timm model')
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--lr', type=float, default=0.4, help='student SGD lr per 256 images')
    ap.add_argument('--teacher-epochs', type=int, default=4)
    ap.add_argument('--teacher-size', type=int, default=96)
    ap.add_argument('--samples', type=int, default=8, help='reinforcements per image')
    ap.add_argument('--topk', type=int, default=5)
    ap.add_argument('--scale', type=float, nargs=2, default=(0.35, 1.0),
                    help='RandomResizedCrop scale (ImageNet\'s 0.08 leaves 9-pixel crops at 32 px)')
    ap.add_argument('--workers', type=int, default=os.cpu_count())
    ap.add_argument('--device', default=None, help='default: cuda when available')
    args = ap.parse_args(argv)
    if not os.path.isfile(args.data):
        raise SystemExit(f'{args.data}: not found (pass --data)')
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    began = time.perf_counter()
    common = {'data.workers': args.workers, 'data.val_crop_ratio': 1.0, 'data.image_size': 32,
              'train.warmup_epochs': 1, 'device': args.device}
    with tempfile.TemporaryDirectory(prefix='cifar10-') as tmp:
        train_dir, test_dir = unpack(args.data, tmp, args.train_per_class)
        print(f'unpacked into {tmp} ({time.perf_counter() - began:.0f} s)', flush=True)
        plain = os.path.join(out, 'cifar10-plain.beton')
        if not os.path.exists(plain):  # images and labels only: the teacher trains on fresh draws
            ffcv_dr('reinforce', train_dir, plain, '--samples', 0, '--recipe', 'rrc', '--size', 32,
                    '--scale', *args.scale, '--workers', args.workers, log=plain + '.txt')
        teacher = train('teacher', out, {
            **common, 'data.train': plain, 'data.val': test_dir, 'data.batch_size': 64,
            'model.arch': TEACHER, 'model.pretrained': True, 'model.input_size': args.teacher_size,
            'train.mode': 'erm', 'train.epochs': args.teacher_epochs, 'train.lr': 0.2,
            # no label smoothing: it flattens the teacher's probabilities (an under-confident
            # teacher, whose students inherit it) and distils worse (Mueller et al., 2019)
            'train.label_smoothing': 0.0, 'train.amp': False})
        test = os.path.join(out, 'runs', 'teacher', 'val.beton')
        checkpoint = os.path.join(out, 'runs', 'teacher', 'checkpoint.pt')
        plus = os.path.join(out, 'cifar10-plus.beton')
        generation = None
        if not os.path.exists(plus):
            start = time.perf_counter()
            ffcv_dr('reinforce', train_dir, plus, '--teacher', TEACHER, '--checkpoint', checkpoint,
                    '--teacher-size', args.teacher_size, '--samples', args.samples,
                    '--topk', args.topk, '--recipe', 'rrc+ra+re', '--size', 32, '--scale', *args.scale,
                    '--batch-size', 256, '--workers', args.workers,
                    *(['--device', args.device] if args.device else []), log=plus + '.txt')
            generation = time.perf_counter() - start
    student = {**common, 'data.train': plus, 'data.val': test, 'data.batch_size': args.batch_size,
               'model.arch': args.student, 'train.lr': args.lr, 'train.weight_decay': 5e-4,
               'train.eval_every': 1000}
    runs = {}
    for epochs in args.budgets:
        for mode in ('erm', 'dr'):
            runs[mode, epochs] = train(f'{mode}-{epochs}', out, {**student, 'train.mode': mode,
                                                                  'train.epochs': epochs})
    kd_epochs = min(args.budgets)
    runs['kd', kd_epochs] = train(f'kd-{kd_epochs}', out, {
        **student, 'train.mode': 'kd', 'train.epochs': kd_epochs, 'train.teacher': TEACHER,
        'train.teacher_checkpoints': [checkpoint], 'train.teacher_size': args.teacher_size})
    report(out, args, teacher[-1], runs, generation, time.perf_counter() - began)


def report(out, args, teacher, runs, generation, seconds):
    rows = [{'mode': mode, 'epochs': epochs, 'top1': r[-1]['top1'], 'top5': r[-1]['top5'],
             'ece': r[-1]['ece'], 'epoch_seconds': epoch_seconds(r)}
            for (mode, epochs), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    per_mode = {m: statistics.median(r['epoch_seconds'] for r in rows if r['mode'] == m)
                for m in ('erm', 'dr', 'kd')}
    result = {'settings': vars(args), 'teacher': {'top1': teacher['top1'], 'ece': teacher['ece']},
              'runs': rows, 'epoch_seconds': per_mode, 'generation_seconds': generation,
              'total_seconds': seconds}
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    lines = ['| epochs | mode | top-1 | top-5 | ECE | s/epoch |', '|---|---|---|---|---|---|']
    lines += [f"| {r['epochs']} | {r['mode']} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | "
              f"{r['ece']:.3f} | {r['epoch_seconds']:.1f} |" for r in rows]
    gains = [f"{e}: {100 * (runs['dr', e][-1]['top1'] - runs['erm', e][-1]['top1']):+.1f}"
             for e in args.budgets]
    lines += ['', f"teacher ({TEACHER} fine-tuned, {args.teacher_size} px): top-1 "
              f"{100 * teacher['top1']:.1f}, ECE {teacher['ece']:.3f}",
              f"dr - erm top-1 (points) at epochs {', '.join(gains)}",
              f"s/epoch (median, first epoch left out): erm {per_mode['erm']:.1f}, dr {per_mode['dr']:.1f} "
              f"({per_mode['dr'] / per_mode['erm']:.3f}x erm), kd {per_mode['kd']:.1f} "
              f"({per_mode['kd'] / per_mode['dr']:.2f}x dr)",
              f"whole experiment {seconds / 60:.1f} min"]
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot(out, args, teacher, runs)


def plot(out, args, teacher, runs):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mode, style in (('erm', 'o-'), ('dr', 's-')):
        ax.plot(args.budgets, [100 * runs[mode, e][-1]['top1'] for e in args.budgets], style,
                label={'erm': 'CIFAR-10 (erm)', 'dr': 'CIFAR-10+ (dr)'}[mode])
    ax.axhline(100 * teacher['top1'], color='gray', ls='--', lw=1, label='teacher')
    ax.set(xlabel='epochs', ylabel='top-1 (%)', xscale='log', xticks=args.budgets,
           title=f'{args.student}, {10 * args.train_per_class} CIFAR-10 images')
    ax.set_xticklabels([str(e) for e in args.budgets])
    ax.minorticks_off()
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'accuracy.png'), dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    main()
