"""The ``ffcv-dr`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import sys

from .format import (DEFAULT_CUTMIX, DEFAULT_ERASE_P, DEFAULT_MIXUP, DEFAULT_RA_MAGNITUDE, DEFAULT_RA_OPS,
                     DEFAULT_RATIO, DEFAULT_SCALE, RECIPES, describe_teachers)
from .jobs import printable


def _storage(args):
    from .storage import Storage
    return Storage(args.write_mode, args.max_resolution, args.compress_probability,
                   args.jpeg_quality, args.smart_threshold)


def _swapped(images: str, output: str, usage: str):
    """Refuse an output folder given where the images go, naming the order."""
    if os.path.isdir(output) and not os.path.isdir(images):
        raise ValueError(f'{images}: not a directory, and {output} is one: the order is {usage}')


def _convert(args):
    from .convert import convert
    _swapped(args.images, args.output, 'ffcv-dr convert IMAGES_DIR OUT.beton --mldr REINFORCED_DATA')
    result = convert(args.images, args.output, args.mldr, num_workers=args.workers,
                     num_classes=args.num_classes, skip_bad=args.skip_bad, storage=_storage(args))
    recipe = result['recipe']
    print(f"wrote {result['output']}: {result['images']} images x {recipe.num_samples} "
          f"reinforcements, top-{recipe.topk} of {recipe.num_classes} classes "
          f"({result['class_space']} labels, write mode {result['storage'].write_mode}, "
          f"{result['re_encoded']} images re-encoded or raw)")
    _report_skipped(result)


def _report_skipped(result):
    if result['skipped']:
        print(f"{result['images'] + len(result['skipped'])} images found, {result['images']} written, "
              f"{len(result['skipped'])} skipped as unreadable:")
        for path in result['skipped']:
            print(f'  {printable(path)}')


def _replay(args):
    from PIL import Image
    from .beton import BetonFile
    if len(args.index) != len(args.sample):
        raise ValueError('--index and --sample must be given the same number of times')
    f = BetonFile(args.beton)
    many = len(args.index) > 1
    if many:
        os.makedirs(args.out, exist_ok=True)
    for index, sample in zip(args.index, args.sample):
        if not 0 <= index < len(f):
            raise ValueError(f'{args.beton}: --index {index} is outside 0..{len(f) - 1}')
        if not 0 <= sample < f.recipe.num_samples:
            raise ValueError(f'{args.beton}: --sample {sample} is outside 0..{f.recipe.num_samples - 1}')
        out = f.render(index, sample, size=args.size)
        path = os.path.join(args.out, f'{index}_{sample}.png') if many else args.out
        Image.fromarray(out).save(path)
        print(json.dumps(_readable(f.describe(index, sample))))


BOX = ('top', 'left', 'height', 'width')


def _readable(value, key=None):
    """``describe``'s values as a person reads them: boxes with named fields
    (the crop in the original image's pixels, the erase box in the output's),
    float32 magnitudes rounded to the digits they hold."""
    if isinstance(value, dict):
        return {k: _readable(v, k) for k, v in value.items()}
    if key in ('crop', 'erase') and isinstance(value, list):
        return dict(zip(BOX, value))
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return float(f'{value:.6g}') if isinstance(value, float) else value


def _info(args):
    import numpy as np
    from .beton import BetonFile
    from .format import STORED_RAW
    from .jpeg import seekable
    f = BetonFile(args.beton)
    r, n = f.recipe, len(f)
    reinforcements = n * r.num_samples
    params = reinforcements * f.record_dtype.itemsize
    probs = reinforcements * f.topk_dtype.itemsize
    raw = int(np.count_nonzero(f.image_meta['mode'] == STORED_RAW))
    jpegs = np.flatnonzero(f.image_meta['mode'] != STORED_RAW)
    info = {
        'path': args.beton, 'images': n, 'classes': r.num_classes,
        'reinforcements_per_image': r.num_samples, 'topk': r.topk,
        'recipe': {'rand_augment_ops': r.ra_ops, 'random_erase': r.erase,
                   'mixing': r.mixing, 'size': r.size},
        'fields': {name: type(h).__name__ for name, h in f.reader.handlers.items()},
        'file_bytes': os.path.getsize(args.beton),
        'stored_jpeg': n - raw, 'stored_raw': raw,
        'seekable_jpeg': sum(seekable(f.payload(i)) for i in jpegs),  # crops entropy-decode only their part
        'image_bytes': f.image_bytes(),
        'image_bytes_per_image': round(f.image_bytes() / max(1, n)),
        'param_bytes': params,
        'prob_bytes': probs,
        'param_bytes_per_reinforcement': f.record_dtype.itemsize,
        'prob_bytes_per_reinforcement': f.topk_dtype.itemsize,
        'bytes_per_reinforcement': f.record_dtype.itemsize + f.topk_dtype.itemsize,
        'teachers': f.teachers and [dataclasses.asdict(t) for t in f.teachers],
        'cut_from': f.cut_from and dataclasses.asdict(f.cut_from),
    }
    if args.json:
        print(json.dumps(info))
        return
    info['teachers'] = describe_teachers(
        f.teachers, 'unknown (not recorded: made before ffcv-dr kept the record, or from ml-dr)')
    info['cut_from'] = f.cut_from.describe() if f.cut_from else 'not cut from another file'
    for key, value in info.items():
        print(f'{key:32s} {printable(value)}')


def _quickstart(args):
    from ffcv.loader import OrderOption
    from .convert import convert
    from .pipelines import Loader, epoch_rates
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result = convert(args.images, args.output, args.mldr, num_workers=args.workers)
    loader = Loader(args.output, batch_size=args.batch_size, num_workers=args.workers or -1,
                    order=OrderOption.RANDOM, seed=0)
    print('loading: the first batch waits while numba compiles the pipeline (about a minute in the first '
          'process on a machine, which caches the kernels; seconds in later ones)', flush=True)
    rate, = epoch_rates(loader, 1)
    r, loaded = result['recipe'], len(loader) * args.batch_size
    left = result['images'] - loaded
    print(f"loaded one epoch: {loaded} of {result['images']} images ({r.size}, {r.size}, 3) with "
          f"soft targets ({r.num_classes},) at {rate:.0f} images/s"
          + (f" (drop_last=True left out {left}: the epoch's last, partial batch of "
             f"--batch-size {args.batch_size})" if left else ''))
    print(f"ImageNet+ style .beton: {os.path.abspath(result['output'])}")


def _reinforce(args):
    from .reinforce import reinforce
    _swapped(args.images, args.output, 'ffcv-dr reinforce IMAGES_DIR OUT.beton')
    result = reinforce(args.images, args.output, teacher=args.teacher, samples=args.samples,
                       topk=args.topk, recipe=args.recipe, size=args.size, scale=args.scale,
                       ratio=args.ratio, ra_ops=args.ra_ops, ra_magnitude=args.ra_magnitude,
                       erase_p=args.erase_p, batch_size=args.batch_size, device=args.device,
                       seed=args.seed, checkpoints=args.checkpoint or (), chunk=args.chunk,
                       num_workers=args.workers, storage=_storage(args),
                       pretrained=not args.no_pretrained,
                       mixup=(args.mixup_p, args.mixup_alpha, args.mixup_div),
                       cutmix=(args.cutmix_p, args.cutmix_alpha), skip_bad=args.skip_bad,
                       teacher_size=args.teacher_size, restart=args.restart)
    if 'recipe' in result and os.path.exists(args.output):
        r = result['recipe']
        if r.num_samples:
            print(f"wrote {args.output}: {result['images']} images x {r.num_samples} reinforcements, "
                  f"top-{r.topk} of {r.num_classes} classes, teacher {args.teacher} "
                  f"({_rate(result)})")
        else:
            print(f"wrote {args.output}: {result['images']} images of {r.num_classes} classes, "
                  "no reinforcements (for training on fresh augmentations, train.mode=erm)")
        _report_skipped(result)


def _relabel(args):
    from .relabel import relabel
    result = relabel(args.input, args.output, teacher=args.teacher, checkpoints=args.checkpoint or (),
                     teacher_size=args.teacher_size, topk=args.topk, combine=args.combine,
                     weight=args.weight, densify_mode=args.densify, batch_size=args.batch_size,
                     device=args.device, chunk=args.chunk, num_workers=args.workers,
                     pretrained=not args.no_pretrained, restart=args.restart)
    if os.path.exists(args.output) and 'recipe' in result:
        r = result['recipe']
        print(f"wrote {args.output}: {result['images']} images x {r.num_samples} reinforcements "
              f"relabelled, top-{r.topk} of {r.num_classes} classes ({_rate(result)})")
        print(f"  labels were by: {describe_teachers(result['replaced'])}")
        print(f"  labels now by:  {describe_teachers(result['teachers'])}")


def _subset(args):
    from .subset import subset
    result = subset(args.input, args.output, args.samples, args.topk, args.images, args.workers)
    r = result['recipe']
    print(f"wrote {args.output}: {result['images']} images x {r.num_samples} reinforcements, "
          f"top-{r.topk}, cut from {result['cut_from'].describe()}")


def _rate(result) -> str:
    return f"{result['rate']:.1f} images/s" if result['rate'] else 'every chunk from an earlier run'


def _train(args):
    if args.show_settings:
        from .train_settings import show_settings
        print(show_settings())
        return
    from .train import Interrupted, load_config, train
    try:
        train(load_config(args.config, args.set), args.resume)
    except Interrupted as e:
        checkpoint, = e.args
        if checkpoint is None:
            print('ffcv-dr train: interrupted before the first checkpoint; nothing was kept', file=sys.stderr)
        else:
            again = ['ffcv-dr', 'train', *(['--config', args.config] if args.config else []),
                     *(x for item in args.set for x in ('--set', item)), '--resume']
            print(f'ffcv-dr train: interrupted; the last checkpoint is {checkpoint}; continue with: '
                  f'{shlex.join(again)}', file=sys.stderr)
        return 130   # as a shell reports SIGINT


def _verify(args):
    from .verify import verify
    report = verify(args.beton, args.workers)
    print(report.summary())
    return 0 if report.ok else 1


def _inspect(args):
    from .inspect_grid import draw_grid
    indices = draw_grid(args.beton, args.out, indices=args.index, samples=args.samples,
                        rows=args.rows, seed=args.seed)
    print(f'wrote {args.out}: images {indices}')


def _demo(args):
    from .demo import run_demo
    run_demo(args.out, samples=args.samples, workers=args.workers)


def _bench(args):
    from .bench import run
    os.makedirs(args.out, exist_ok=True)
    run(args.beton, args.out, workers=args.workers, batch_size=args.batch_size,
        rounds=args.rounds, epoch_images=args.epoch_images, sizes=args.sizes, repeats=args.repeats)



def _int(low: int, high: int = None):
    """An argparse type: an integer from ``low`` to ``high``. A value out of
    range is refused; none silently means the default."""
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f'{value} is outside {low}..{high}' if high is not None
                                             else f'{value}: must be at least {low}')
        return value
    return integer


def _real(low: float, high: float = math.inf, above_low: bool = False):
    """An argparse type: a finite number from ``low`` (or above it) to ``high``."""
    def number(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not math.isfinite(value) or value > high or value < low or (above_low and value == low):
            bounds = f'{"above " if above_low else ""}{low}' + ('' if high == math.inf else f' to {high}')
            raise argparse.ArgumentTypeError(f'{text}: must be {bounds}')
        return value
    return number


PROBABILITY = _real(0.0, 1.0)
POSITIVE = _real(0.0, above_low=True)


def _storage_options(p):
    g = p.add_argument_group('image storage', "FFCV RGBImageField's choices, with FFCV's meaning; "
                             'ffcv-imagenet writes ImageNet with --write-mode proportion '
                             '--compress-probability 0.5 --max-resolution 500 --jpeg-quality 90')
    g.add_argument('--write-mode', default='original',
                   choices=['original', 'jpg', 'raw', 'proportion', 'smart'],
                   help='original (default): keep each JPEG\'s coefficients (restart markers added '
                        'losslessly), re-encode only what must be; '
                   'jpg: re-encode all; raw: store pixels; proportion: jpg with probability '
                   '--compress-probability, else raw; smart: raw unless larger than --smart-threshold')
    g.add_argument('--max-resolution', type=_int(1), default=None,
                   help='shrink images whose longer side exceeds this (INTER_AREA, as FFCV)')
    g.add_argument('--compress-probability', type=PROBABILITY, default=0.5,
                   help='proportion mode: share of images stored as JPEG')
    g.add_argument('--jpeg-quality', type=_int(1, 100), default=90, help='quality of re-encoded JPEGs')
    g.add_argument('--smart-threshold', type=_int(0), default=None,
                   help='smart mode: images of more pixel bytes than this are stored as JPEG')


def _teacher_options(p):
    p.add_argument('--teacher', default='bundled:efficientnet_lite0',
                   help='timm model name(s), comma-separated for an ensemble, or bundled:efficientnet_lite0')
    p.add_argument('--checkpoint', action='append',
                   help='local checkpoint per teacher, in order (e.g. ffcv-dr train\'s checkpoint.pt)')
    p.add_argument('--no-pretrained', action='store_true', help='teachers without pretrained weights')
    p.add_argument('--teacher-size', type=_int(1), default=None,
                   help="side the teachers see (default: their pretrained config's; e.g. 96 for a "
                   "teacher fine-tuned on CIFAR at 96 px)")


def _job_options(p):
    """What a resumable teacher job (reinforce, relabel) takes."""
    p.add_argument('--batch-size', type=_int(1), default=64, help='teacher batch')
    p.add_argument('--device', default='cpu', help='cpu or cuda (cuda:LOCAL_RANK under torchrun)')
    p.add_argument('--chunk', type=_int(1), default=64, help='images per resumable chunk')
    p.add_argument('--restart', action='store_true',
                   help='throw away the finished chunks of a different earlier run instead of refusing')
    p.add_argument('--workers', type=_int(1), default=None, help='render threads / writer processes')


def _convert_parser(sub):
    p = sub.add_parser('convert', help='convert an ImageFolder plus ml-dr reinforcements to a .beton',
                       description='Convert an ImageFolder and apple/ml-dr reinforcements (a '
                       'reinforced_data directory or its .tar/.tar.gz archive, read as a stream) '
                       'into one .beton. Image i is the i-th file in torchvision ImageFolder order.')
    p.add_argument('images', help='ImageFolder root (class folders of images)')
    p.add_argument('output', help='the .beton to write (written only when complete)')
    p.add_argument('--mldr', required=True, help='reinforced_data directory or .tar/.tar.gz archive')
    p.add_argument('--workers', type=_int(1), default=None, help='parallel processes (default: all cores)')
    _storage_options(p)
    p.add_argument('--skip-bad', action='store_true',
                   help='leave out unreadable images (each is reported) instead of stopping')
    p.add_argument('--num-classes', type=_int(1), default=None,
                   help='size of the teacher\'s class space (default: 1000 for ImageNet synset '
                   'folders, else the number of folders)')
    p.set_defaults(run=_convert)


def _replay_parser(sub):
    p = sub.add_parser('replay', help='render stored reinforcements exactly as the loader does',
                       description='Render reinforcement K of image I as the loader produces it '
                       '(the whole recipe: crop, flip, RandAugment, erasing, mixing; before normalisation) '
                       'and print one JSON line per image with its parameters, op names included, '
                       'and teacher top-k. Repeat --index/--sample as pairs; with '
                       'several pairs --out is a folder receiving {I}_{K}.png.')
    p.add_argument('beton', help='an ffcv-dr .beton')
    p.add_argument('--index', type=_int(0), action='append', required=True, help='image index I (repeat)')
    p.add_argument('--sample', type=_int(0), action='append', required=True,
                   help='reinforcement K of that image (repeat, one per --index)')
    p.add_argument('--out', required=True, help='PNG file, or folder for several pairs')
    p.add_argument('--size', type=_int(1), default=None, help='output side (default: the recipe\'s)')
    p.set_defaults(run=_replay)


def _info_parser(sub):
    p = sub.add_parser('info', help='counts and storage breakdown of a .beton',
                       description='Print counts (images, classes, reinforcements, top-k), fields '
                       'and the bytes taken by JPEGs, parameters and probabilities.')
    p.add_argument('beton', help='an ffcv-dr .beton')
    p.add_argument('--json', action='store_true', help='one JSON object instead of a table')
    p.set_defaults(run=_info)


def _quickstart_parser(sub):
    p = sub.add_parser('quickstart', help='convert, load one epoch, print images/s',
                       description='Convert an ImageFolder plus ml-dr reinforcements, load one '
                       'epoch with the ffcv-dr Loader and print the throughput.')
    p.add_argument('images', help='ImageFolder root (class folders of images)')
    p.add_argument('mldr', help='ml-dr reinforced_data directory or .tar/.tar.gz archive')
    p.add_argument('output', help='the .beton to write')
    p.add_argument('--workers', type=_int(1), default=None, help='processes and threads (default: all cores)')
    p.add_argument('--batch-size', type=_int(1), default=64, help='images per batch')
    p.set_defaults(run=_quickstart)


def _reinforce_parser(sub):
    p = sub.add_parser('reinforce', help='make a reinforced .beton with a teacher (timm or bundled)',
                       description='Sample N augmentations per image, render them with the '
                       'loader\'s own kernels, keep the teacher\'s top-k probabilities and write '
                       'the .beton. Under torchrun each rank takes a share; killed and started '
                       'again with the same command, it redoes no finished chunk.')
    p.add_argument('images', help='ImageFolder root (class folders of images)')
    p.add_argument('output', help='the .beton to write (written only when complete)')
    _teacher_options(p)
    p.add_argument('--samples', type=_int(0), default=8,
                   help='reinforcements per image; 0 writes the images and the recipe only, '
                   'without a teacher, for training with fresh augmentations (train.mode=erm)')
    p.add_argument('--topk', type=_int(1), default=10, help='teacher probabilities kept per reinforcement')
    p.add_argument('--recipe', default='rrc+ra+re', choices=RECIPES,
                   help='RandomResizedCrop+flip, + RandAugment and RandomErasing, + MixUp/CutMix')
    p.add_argument('--size', type=_int(1), default=224, help='output side')
    p.add_argument('--scale', type=POSITIVE, nargs=2, default=DEFAULT_SCALE, help='RandomResizedCrop scale')
    p.add_argument('--ratio', type=POSITIVE, nargs=2, default=DEFAULT_RATIO, help='RandomResizedCrop ratio')
    p.add_argument('--ra-ops', type=_int(0), default=DEFAULT_RA_OPS, help='RandAugment ops per image')
    p.add_argument('--ra-magnitude', type=_int(0, 30), default=DEFAULT_RA_MAGNITUDE,
                   help='RandAugment magnitude bin (of 31)')
    p.add_argument('--erase-p', type=PROBABILITY, default=DEFAULT_ERASE_P, help='RandomErasing probability')
    p.add_argument('--mixup-p', type=PROBABILITY, default=DEFAULT_MIXUP[0], help='MixUp probability (+mix recipes)')
    p.add_argument('--mixup-alpha', type=POSITIVE, default=DEFAULT_MIXUP[1], help='MixUp Beta(alpha, alpha)')
    p.add_argument('--mixup-div', type=POSITIVE, default=DEFAULT_MIXUP[2],
                   help="MixUp's lam is divided by this (ml-dr's div_by)")
    p.add_argument('--cutmix-p', type=PROBABILITY, default=DEFAULT_CUTMIX[0], help='CutMix probability (+mix recipes)')
    p.add_argument('--cutmix-alpha', type=POSITIVE, default=DEFAULT_CUTMIX[1], help='CutMix Beta(alpha, alpha)')
    p.add_argument('--seed', type=_int(0), default=0, help='seeds the augmentations drawn')
    _job_options(p)
    _storage_options(p)
    p.add_argument('--skip-bad', action='store_true',
                   help='leave out unreadable images (each is reported) instead of stopping')
    p.set_defaults(run=_reinforce)


def _relabel_parser(sub):
    p = sub.add_parser('relabel', help="replace or add a teacher: new top-k for a .beton's stored reinforcements",
                       description='Render every stored reinforcement of IN (MixUp/CutMix partner '
                       "included) with the loader's own kernels, run the teacher(s) and write OUT with "
                       "IN's images and augmentation records and the new top-k. --combine mean "
                       '--weight W averages W of the new teacher with 1-W of the stored labels, to '
                       'grow an ensemble one teacher at a time. Under torchrun each rank takes a '
                       'share; killed and started again with the same command, it redoes no finished '
                       'chunk.')
    p.add_argument('input', help='the ffcv-dr .beton to relabel')
    p.add_argument('output', help='the .beton to write (written only when complete)')
    _teacher_options(p)
    p.add_argument('--topk', type=_int(1), default=None, help="probabilities kept (default: IN's top-k)")
    p.add_argument('--combine', default='replace', choices=['replace', 'mean'],
                   help='replace the stored labels (default), or average with them (needs --weight)')
    p.add_argument('--weight', type=_real(0.0, 1.0, above_low=True), default=None,
                   help="--combine mean: the new teacher's share W in (0, 1]; the stored labels keep 1-W")
    p.add_argument('--densify', default='smooth', choices=['smooth', 'zeros'],
                   help="--combine mean: how the stored top-k become a distribution, as the loader's "
                   'densify (smooth: the missing mass spread over the other classes)')
    _job_options(p)
    p.set_defaults(run=_relabel)


def _subset_parser(sub):
    p = sub.add_parser('subset', help='cut a .beton to fewer reinforcements, a smaller top-k, some images',
                       description='Write OUT with reinforcements 0..N-1 of each image of IN and the K '
                       'most probable classes of each stored top-k (ImageNet+-Small: --samples 100 '
                       '--topk 5 of ImageNet+), optionally only the images listed in a file; images '
                       'and records are copied, nothing is decoded. OUT records what it was cut from '
                       '(ffcv-dr info shows it).')
    p.add_argument('input', help='the ffcv-dr .beton to cut')
    p.add_argument('output', help='the .beton to write (written only when complete)')
    p.add_argument('--samples', type=_int(1), required=True, help='reinforcements per image to keep')
    p.add_argument('--topk', type=_int(1), required=True, help='most probable classes to keep')
    p.add_argument('--images', help='a file of image indices of IN to keep (whitespace or commas)')
    p.add_argument('--workers', type=_int(1), default=None, help='writer processes (default: all cores)')
    p.set_defaults(run=_subset)


def _train_parser(sub):
    p = sub.add_parser('train', help='train a student (timm or bundled) on a .beton (erm, dr or kd)',
                       description='Train a timm (or bundled) model from an ffcv-dr .beton: ground-truth '
                       'labels (erm), the stored soft targets (dr) or an online teacher (kd). '
                       'Settings: the defaults (--show-settings lists each with its meaning, as a YAML '
                       'file to start from; configs/ holds ready ones), then the --config file, then '
                       '--set overrides. train.lr is for a global batch of 256 and is scaled by '
                       'data.batch_size x processes / 256. OUTPUT/config.yaml records the settings a '
                       'run used, a template for the next.')
    p.add_argument('--config', help='YAML file of settings')
    p.add_argument('--show-settings', action='store_true',
                   help='print every setting with its default and meaning (YAML) and exit')
    p.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE',
                   help='override one setting, e.g. --set train.epochs=8')
    p.add_argument('--resume', action='store_true', help='continue from OUTPUT/checkpoint.pt')
    p.set_defaults(run=_train)


def _verify_parser(sub):
    p = sub.add_parser('verify', help='check every record of a .beton; exit 1 if anything is wrong',
                       description='Check every image of a .beton: checksums of JPEGs, records '
                       'and metadata, record bounds, top-k probabilities, labels and that each '
                       'JPEG decodes. Prints a summary; exits 1 when something is wrong.')
    p.add_argument('beton')
    p.add_argument('--workers', type=_int(1), default=None, help='threads (default: all cores)')
    p.set_defaults(run=_verify)


def _inspect_parser(sub):
    p = sub.add_parser('inspect', help='draw a grid of replayed reinforcements with teacher labels',
                       description='Render reinforcements of chosen (or random) images as the '
                       'loader does, each titled with the teacher\'s top-3 classes.')
    p.add_argument('beton')
    p.add_argument('--out', required=True, help='PNG to write')
    p.add_argument('--index', type=_int(0), action='append', help='image index (repeat); default: random')
    p.add_argument('--samples', type=_int(1), default=4, help='reinforcements per image')
    p.add_argument('--rows', type=_int(1), default=6, help='random images when --index is not given')
    p.add_argument('--seed', type=_int(0), default=0, help='seeds the choice of random images')
    p.set_defaults(run=_inspect)


def _demo_parser(sub):
    p = sub.add_parser('demo', help='reinforce scikit-image photos with EfficientNet-Lite0, load, draw',
                       description='The whole chain with no data of yours: photos shipped in '
                       'scikit-image become a reinforced .beton (bundled EfficientNet-Lite0 teacher), '
                       'one loader run is timed and a grid of replays with the teacher\'s top-3 '
                       'ImageNet classes is drawn.')
    p.add_argument('--out', default='out/demo', help='folder for the images, .beton and grid.png')
    p.add_argument('--samples', type=_int(1), default=8, help='reinforcements per photo')
    p.add_argument('--workers', type=_int(1), default=None, help='threads (default: all cores)')
    p.set_defaults(run=_demo)


def _bench_parser(sub):
    p = sub.add_parser('bench', help='loader and conversion throughput against FFCV and ml-dr',
                       description='Measure, in one run on the images of DATA.beton (original JPEG '
                       'bytes), plain FFCV on ImageNet as ffcv-imagenet writes it (B_imagenet), on '
                       'FFCV jpg q90 (B_jpg) and on the same bytes (B_same), against ffcv-dr\'s full '
                       'recipe on the original bytes (C_orig) and stored as B_imagenet (C_matched), '
                       'ml-dr\'s loader design (D), time to first batch, and ffcv-dr convert against '
                       'FFCV\'s writer. Prints a table, writes bench.json and bench.png, and ends with '
                       'the ratios at each size.')
    p.add_argument('beton')
    p.add_argument('--out', default='out/bench', help='folder for bench.json and bench.png')
    p.add_argument('--workers', type=_int(1), default=None, help='threads / worker processes (default: all cores)')
    p.add_argument('--batch-size', type=_int(1), default=64)
    p.add_argument('--rounds', type=_int(1), default=3, help='timed epochs of each loader, interleaved')
    p.add_argument('--epoch-images', type=_int(1), default=4096,
                   help='images per epoch at least (the file\'s indices repeated)')
    p.add_argument('--sizes', type=_int(1), nargs='+', default=[176, 224], help='output sides')
    p.add_argument('--repeats', type=_int(1), default=3, help='timed runs of A, D and each conversion')
    p.set_defaults(run=_bench)


class _ShowDefaults(argparse.HelpFormatter):
    """Help lines end with the default, where there is one to show and the
    text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ''
        if (action.default not in (None, False, argparse.SUPPRESS) and 'default' not in text
                and action.option_strings):
            text += ' (default: %(default)s)'
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ffcv-dr', description=(
        'Train on reinforced datasets (Dataset Reinforcement) with FFCV.'))
    sub = parser.add_subparsers(dest='command', required=True, parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=_ShowDefaults))
    for add in (_convert_parser, _replay_parser, _info_parser, _quickstart_parser, _reinforce_parser,
                _relabel_parser, _subset_parser, _train_parser, _verify_parser, _inspect_parser, _demo_parser,
                _bench_parser):
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .jobs import ConvertError, JobError, clean_up_on_sigterm
    try:
        with clean_up_on_sigterm():
            return args.run(args) or 0
    except (ConvertError, JobError, ValueError, OSError) as e:
        print(f'ffcv-dr {args.command}: error: {printable(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'ffcv-dr {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
