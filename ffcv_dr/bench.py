"""``ffcv-dr bench DATA.beton``: loader and conversion throughput, side by side.

Everything runs in one process on the same images, JPEG bytes and worker
count, and the inputs the baselines need are written from the ``.beton``
itself into a temporary folder:

A  libjpeg-turbo full decode of the stored JPEGs on ``workers`` threads (the ceiling);
B  plain FFCV: RandomResizedCrop + flip + integer labels, from a ``.beton``
   whose RGBImageField holds the very same JPEG bytes;
C  ffcv-dr: the full stored recipe with dense soft targets;
D  ml-dr's loader design: one pickle of all reinforcements read per sample,
   PIL decode, torchvision crop/RandAugment/erasing, a PyTorch DataLoader;
and ``ffcv-dr convert`` against FFCV's own RGBImageField writer.

Each loader runs a warm-up epoch, then ``epochs`` timed ones; the median is
reported. C runs 20 epochs in all, over which its RSS growth is measured.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader as FFCVLoader, OrderOption
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor
from ffcv.writer import DatasetWriter
from PIL import Image

from .beton import BetonFile
from .convert import WRITER_CHUNK, convert
from .format import RA_OPS
from .mldr import load_pickle
from .pipelines import epoch_rate, epoch_rates, image_stages

_imdecode = nb.njit(nogil=True)(imdecode)
RSS_EPOCHS = 20


class _JpegBytesField(RGBImageField):
    """An RGBImageField that stores given JPEG bytes as they are (FFCV's own
    writer decodes and re-encodes); read back as a plain RGBImageField."""

    def encode(self, destination, value, malloc):
        jpeg, width, height = value
        destination['mode'] = IMAGE_MODES['jpg']
        destination['width'], destination['height'] = width, height
        destination['data_ptr'], storage = malloc(jpeg.size)
        storage[:] = jpeg


class _StoredJpegs:
    def __init__(self, f: BetonFile):
        self.f = f

    def __len__(self):
        return len(self.f)

    def __getitem__(self, i):
        meta = self.f.image_meta[i]
        return (np.array(self.f.jpeg(i)), int(meta['width']), int(meta['height'])), self.f.label(i)


def _rss() -> tuple:
    """(current, peak) resident set size of this process, in bytes."""
    status = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return int(status['VmRSS'].split()[0]) * 1024, int(status['VmHWM'].split()[0]) * 1024


@nb.njit(nogil=True)
def _decode_all(jpegs, offsets, heights, widths, buf):
    for i in range(len(heights)):
        h, w = np.uint32(heights[i]), np.uint32(widths[i])
        _imdecode(jpegs[offsets[i]:offsets[i + 1]], buf[:h * w * 3].reshape(h, w, 3),
                  h, w, h, w, 0, 0, 1, 1, False, False)


def full_decode_rate(f: BetonFile, workers: int, repeats: int) -> list:
    """A: every stored JPEG decoded whole, split over ``workers`` threads."""
    jpegs = [np.array(f.jpeg(i)) for i in range(len(f))]
    offsets = np.concatenate([[0], np.cumsum([j.size for j in jpegs])])
    data = np.concatenate(jpegs)
    heights, widths = f.image_meta['height'].copy(), f.image_meta['width'].copy()
    chunks = np.array_split(np.arange(len(f)), workers)
    bufs = [np.empty(int((heights.astype(np.int64) * widths).max()) * 3, np.uint8) for _ in chunks]

    def run(k):
        c = chunks[k]
        _decode_all(data, offsets[c[0]:c[-1] + 2], heights[c], widths[c], bufs[k])

    rates = []
    with ThreadPoolExecutor(workers) as pool:
        for r in range(repeats + 1):
            start = time.perf_counter()
            list(pool.map(run, range(len(chunks))))
            if r:
                rates.append(len(f) / (time.perf_counter() - start))
    return rates


def write_plain_beton(f: BetonFile, path: str, workers: int):
    """B's input: the same JPEG bytes in FFCV's RGBImageField, with the labels."""
    DatasetWriter(path, {'image': _JpegBytesField(), 'label': IntField()},
                  num_workers=workers).from_indexed_dataset(_StoredJpegs(f))


def plain_ffcv_loader(path, batch_size, workers, size, device=None):
    """B: FFCV's own RandomResizedCrop + flip and integer labels, with ffcv-dr's
    :func:`image_stages` after them."""
    label = [IntDecoder(), ToTensor()]
    if device is not None:
        label += [Squeeze(), ToDevice(torch.device(device), non_blocking=True)]
    return FFCVLoader(path, batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                      drop_last=True, custom_fields={'image': RGBImageField},
                      pipelines={'image': [RandomResizedCropRGBImageDecoder((size, size)),
                                           RandomHorizontalFlip(), *image_stages(device)],
                                 'label': label})


def write_mldr_folder(f: BetonFile, root: str):
    """The .beton's contents as ml-dr distributes them: an ImageFolder of the
    JPEGs and a reinforced_data folder with one pickle per image (the format
    of ml-dr's ImageNet+ archives, written with torch.save as ml-dr does)."""
    images, mldr = os.path.join(root, 'images'), os.path.join(root, 'reinforced_data')
    os.makedirs(mldr)
    labels = [f.label(i) for i in range(len(f))]
    if labels != sorted(labels):
        raise ValueError(f'{f.path}: labels are not in ImageFolder order')
    for i, label in enumerate(labels):
        os.makedirs(os.path.join(images, f'{label:05d}'), exist_ok=True)
        f.jpeg(i).tofile(os.path.join(images, f'{label:05d}', f'{i:08d}.jpg'))
        samples = []
        for k in range(f.recipe.num_samples):
            d = f.describe(i, k)
            p = d['params']
            ra = [(RA_OPS.index(op), m) for op, m in p['rand_augment']] if p.get('rand_augment') else None
            samples.append({'params': [tuple(p['crop']), p['flip'], ra,
                                       tuple(p['erase']) if p.get('erase') else None],
                            'prob': ([v for _, v in d['topk']], [c for c, _ in d['topk']])})
        torch.save((i, samples), os.path.join(mldr, f'{i}.pth.tar'))
    r = f.recipe
    torch.save({'reinforce': {'num_samples': r.num_samples, 'topk': r.topk, 'image_augmentation': {
        'random_resized_crop': {'enable': True, 'size': r.size},
        'random_horizontal_flip': {'enable': True, 'p': 0.5},
        'rand_augment': {'enable': bool(r.ra_ops), 'num_ops': r.ra_ops},
        'random_erase': {'enable': r.erase, 'p': 0.25}}}},
        os.path.join(mldr, 'config.pth.tar'))
    return images, mldr


class MldrStyleDataset(torch.utils.data.Dataset):
    """ml-dr's ReinforcedDataset design: per sample, read the image's pickle of
    all its reinforcements, pick one, decode with PIL and replay it with
    torchvision on the PIL image (ml-dr's own transforms), then ToTensor,
    erase, Normalize, and densify the top-k ('smooth')."""

    def __init__(self, images, mldr, num_classes, size):
        from torchvision.datasets import ImageFolder
        self.samples = ImageFolder(images).samples
        self.mldr, self.num_classes, self.size = mldr, num_classes, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
        from torchvision.transforms.autoaugment import _apply_op
        path = os.path.join(self.mldr, f'{i}.pth.tar')
        with open(path, 'rb') as fp:  # ml-dr calls torch.load; the same unpickling, made safe
            _, samples = load_pickle(fp.read(), path)
        s = samples[np.random.randint(len(samples))]
        (top, left, h, w), flip, ra, erase = s['params']
        img = Image.open(self.samples[i][0]).convert('RGB')
        img = F.resized_crop(img, top, left, h, w, [self.size, self.size])
        if flip:
            img = F.hflip(img)
        for op, m in ra or []:
            img = _apply_op(img, RA_OPS[op], m, interpolation=InterpolationMode.NEAREST, fill=None)
        x = F.to_tensor(img)
        if erase:
            x[:, erase[0]:erase[0] + erase[2], erase[1]:erase[1] + erase[3]] = 0
        x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        values, ids = s['prob']
        target = torch.full((self.num_classes,), (1 - sum(values)) / (self.num_classes - len(values)))
        target[list(ids)] = torch.tensor(values)
        return x, target


def ffcv_writer_rate(images, path, workers) -> float:
    """FFCV's own conversion of the ImageFolder, as its ImageNet example writes it
    (with ffcv-dr's work-item size, so both balance their workers alike)."""
    from torchvision.datasets import ImageFolder
    start = time.perf_counter()
    DatasetWriter(path, {'image': RGBImageField(write_mode='jpg', jpeg_quality=90),
                         'label': IntField()},
                  num_workers=workers).from_indexed_dataset(ImageFolder(images), chunksize=WRITER_CHUNK)
    return len(ImageFolder(images).samples) / (time.perf_counter() - start)


def run(beton: str, out_dir: str, workers: int = None, batch_size: int = 64,
        epochs: int = 5, repeats: int = 3) -> dict:
    from .pipelines import Loader
    workers = workers or os.cpu_count()
    f = BetonFile(beton)
    if f.recipe.mixing:
        raise ValueError(f'{beton}: the benchmark compares the ImageNet+ recipe; this file mixes images')
    size, n = f.recipe.size, len(f)
    res = {'beton': os.path.abspath(beton), 'images': n, 'workers': workers,
           'batch_size': batch_size, 'reinforcements_per_image': f.recipe.num_samples}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        print(f'benchmark: {n} images, {workers} workers, batch {batch_size}; preparing inputs in {tmp}')
        plain = os.path.join(tmp, 'plain.beton')
        write_plain_beton(f, plain, workers)
        images, mldr = write_mldr_folder(f, tmp)

        res['A_full_decode'] = full_decode_rate(f, workers, repeats)
        res['B_ffcv_rrc'] = epoch_rates(plain_ffcv_loader(plain, batch_size, workers, size), RSS_EPOCHS - 1)
        loader = Loader(beton, batch_size=batch_size, num_workers=workers, seed=0)
        rates, rss = [], []
        for _ in range(RSS_EPOCHS):
            rates.append(epoch_rate(loader))
            rss.append(_rss()[0])
        res['C_ffcv_dr'] = rates[1:]  # the first epoch compiles and warms up
        res['rss_after_first_epoch'], res['rss_after_last_epoch'] = rss[0], rss[-1]
        res['rss_growth'] = rss[-1] / rss[0] - 1
        res['peak_rss'] = _rss()[1]
        dataset = MldrStyleDataset(images, mldr, f.recipe.num_classes, size)
        res['D_mldr_design'] = epoch_rates(torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
            persistent_workers=True), epochs)
        convert_rates, writer_rates = [], []
        out = os.path.join(tmp, 'out.beton')
        for r in range(repeats + 1):  # the first of each imports what it uses: warm-up
            start = time.perf_counter()
            convert(images, out, mldr, num_workers=workers, num_classes=f.recipe.num_classes)
            convert_rates.append(n / (time.perf_counter() - start))
            os.remove(out)  # so that neither write waits on the other's pages going to disk
            writer_rates.append(ffcv_writer_rate(images, out, workers))
            os.remove(out)
        res['convert_ffcv_dr'], res['convert_ffcv_writer'] = convert_rates[1:], writer_rates[1:]
    return summarise(res, out_dir)


LABELS = {'A_full_decode': 'A  libjpeg-turbo full decode',
          'B_ffcv_rrc': 'B  FFCV RandomResizedCrop + flip',
          'C_ffcv_dr': 'C  ffcv-dr full recipe + soft targets',
          'D_mldr_design': "D  ml-dr's loader design (pickles + PIL)",
          'convert_ffcv_dr': 'ffcv-dr convert',
          'convert_ffcv_writer': "FFCV's RGBImageField writer"}


def summarise(res: dict, out_dir: str) -> dict:
    med = {k: statistics.median(res[k]) for k in LABELS}
    res['median_images_per_s'] = med
    res['R1'], res['R2'], res['R3'] = (med['C_ffcv_dr'] / med['B_ffcv_rrc'],
                                       med['C_ffcv_dr'] / med['D_mldr_design'],
                                       med['C_ffcv_dr'] / med['A_full_decode'])
    res['conversion_speedup'] = med['convert_ffcv_dr'] / med['convert_ffcv_writer']
    print(f'\n{"":44s} {"images/s":>9s} {"runs":>5s}')
    for k, label in LABELS.items():
        print(f'{label:44s} {med[k]:9.0f} {len(res[k]):5d}')
    print(f'\nconversion: ffcv-dr convert is {res["conversion_speedup"]:.2f}x FFCV\'s writer')
    print(f'RSS: peak {res["peak_rss"] / 2**20:.0f} MiB; growth from epoch 1 to {RSS_EPOCHS}: '
          f'{100 * res["rss_growth"]:+.1f}%')
    with open(os.path.join(out_dir, 'bench.json'), 'w') as fp:
        json.dump(res, fp, indent=1)
    _chart(med, os.path.join(out_dir, 'bench.png'))
    print(f'wrote {os.path.join(out_dir, "bench.json")} and bench.png')
    print(f'R1=C/B={res["R1"]:.2f} R2=C/D={res["R2"]:.2f} R3=C/A={res["R3"]:.2f}')
    return res


def _chart(med: dict, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = list(LABELS)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = ['#999999', '#4c72b0', '#dd8452', '#c44e52', '#dd8452', '#4c72b0']
    ax.barh(range(len(keys)), [med[k] for k in keys], color=colors)
    ax.set_yticks(range(len(keys)), [LABELS[k] for k in keys])
    ax.invert_yaxis()
    ax.set_xlabel('images/s (median)')
    ax.set_xlim(0, 1.15 * max(med.values()))
    for i, k in enumerate(keys):
        ax.text(med[k], i, f' {med[k]:.0f}', va='center')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
