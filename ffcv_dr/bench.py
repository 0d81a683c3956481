"""``ffcv-dr bench DATA.beton``: loader and conversion throughput, side by side.

Everything runs in one process on the same source images and worker count;
the inputs the baselines need are written from the ``.beton`` (which must
hold original JPEG bytes) into a temporary folder. The strongest baseline is
the file an ffcv-imagenet user already has:

B_imagenet  plain FFCV RandomResizedCrop + flip + labels on ImageNet as
            ffcv-imagenet writes it: FFCV's own ``DatasetWriter`` with
            ``RGBImageField(write_mode='proportion', compress_probability=0.5,
            max_resolution=500, jpeg_quality=90)`` (half the images raw pixels);
B_jpg       the same loader on FFCV's writer in jpg mode, quality 90;
B_same      the same loader on an RGBImageField holding C_orig's very JPEG bytes;
C_orig      ffcv-dr, the full stored recipe + dense soft targets, original bytes;
C_matched   the same on a file converted with B_imagenet's storage settings;
D           ml-dr's loader design: one pickle of all reinforcements read per
            sample, PIL decode, torchvision ops, a PyTorch DataLoader;
A           libjpeg-turbo full decode of the original JPEGs (a ceiling).

First ``ffcv-dr convert`` against FFCV's writer, before any loader has run
(as the command runs, in a process of its own), rounds interleaved, each
converting at least ``CONVERT_IMAGES`` (the images linked again as needed).
Then B and C run at each output size, in epochs of at least ``epoch_images``
(the file's indices tiled), every loader one epoch per round, rounds
interleaved; round 0 compiles and warms up, the median of the others is
reported. Time to first batch is measured in new processes, the first with
an empty numba cache and the second with the cache the first left.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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
from .writer import WRITER_CHUNK
from .format import RA_OPS, STORED_JPEG
from .mldr import load_pickle, sample_limits
from .mldr.export import write_mldr_files
from .pipelines import epoch_rate, epoch_rates, image_stages

_imdecode = nb.njit(nogil=True)(imdecode)
RSS_EPOCHS = 10
CONVERT_IMAGES = 4000   # FFCV's writer takes ~0.45 s to start: conversions of seconds, per-image rates


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
        return (np.array(self.f.payload(i)), int(meta['width']), int(meta['height'])), self.f.label(i)


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
    jpegs = [np.array(f.payload(i)) for i in range(len(f))]
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


def plain_ffcv_loader(path, batch_size, workers, size, device=None, indices=None):
    """B: FFCV's own RandomResizedCrop + flip and integer labels, with ffcv-dr's
    :func:`image_stages` after them, the file in memory (ffcv-imagenet's
    ``in_memory=1``, as the ffcv-dr Loader's default)."""
    label = [IntDecoder(), ToTensor()]
    if device is not None:
        label += [Squeeze(), ToDevice(torch.device(device), non_blocking=True)]
    return FFCVLoader(path, batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                      drop_last=True, os_cache=True, indices=indices,
                      custom_fields={'image': RGBImageField},
                      pipelines={'image': [RandomResizedCropRGBImageDecoder((size, size)),
                                           RandomHorizontalFlip(), *image_stages(device)],
                                 'label': label})


def write_mldr_folder(f: BetonFile, root: str, copies: int = 1):
    """The .beton's contents as ml-dr distributes them: an ImageFolder of the
    JPEGs and a reinforced_data folder with one pickle per image. With
    ``copies``, every image that many times in a row (copy t of image i is
    image i * copies + t, its JPEG a link to the first): a conversion long
    enough to time."""
    images, mldr = os.path.join(root, 'images'), os.path.join(root, 'reinforced_data')
    labels = [f.label(i) for i in range(len(f))]
    if labels != sorted(labels):
        raise ValueError(f'{f.path}: labels are not in ImageFolder order')
    for i, label in enumerate(labels):
        os.makedirs(os.path.join(images, f'{label:05d}'), exist_ok=True)
        first = os.path.abspath(os.path.join(images, f'{label:05d}', f'{i:08d}.jpg'))
        f.payload(i).tofile(first)
        for t in range(1, copies):   # sorted after the first, before image i + 1
            os.symlink(first, f'{first[:-4]}_{t:05d}.jpg')
    write_mldr_files(f, mldr, copies)
    return images, mldr


class MldrStyleDataset(torch.utils.data.Dataset):
    """ml-dr's ReinforcedDataset design: per sample, read the image's pickle of
    all its reinforcements, pick one, decode with PIL and replay it with
    torchvision on the PIL image (ml-dr's own transforms), then ToTensor,
    erase, Normalize, and densify the top-k ('smooth')."""

    def __init__(self, images, mldr, recipe, size):
        from torchvision.datasets import ImageFolder
        self.samples = ImageFolder(images).samples
        self.mldr, self.num_classes, self.size = mldr, recipe.num_classes, size
        self.limits = sample_limits(recipe.num_samples, recipe.topk)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
        from torchvision.transforms.autoaugment import _apply_op
        path = os.path.join(self.mldr, f'{i}.pth.tar')
        with open(path, 'rb') as fp:  # ml-dr calls torch.load; the same unpickling, made safe
            _, samples = load_pickle(fp.read(), path, self.limits)
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


def ffcv_writer_rate(images, path, workers, field: RGBImageField) -> float:
    """FFCV's own conversion of the ImageFolder into ``field``, as its ImageNet
    example writes it (with ffcv-dr's work-item size, so both balance their
    workers alike)."""
    from torchvision.datasets import ImageFolder
    start = time.perf_counter()
    DatasetWriter(path, {'image': field, 'label': IntField()},
                  num_workers=workers).from_indexed_dataset(ImageFolder(images), chunksize=WRITER_CHUNK)
    return len(ImageFolder(images).samples) / (time.perf_counter() - start)


def tiled(n: int, epoch_images: int) -> np.ndarray:
    """Indices of an epoch of at least ``epoch_images`` images from a file of ``n``."""
    return np.tile(np.arange(n), -(-epoch_images // n))


def first_batch_seconds(kind: str, path: str, size: int, batch_size: int, workers: int,
                        cache_dir: str) -> float:
    """Seconds from building a loader to holding its first batch, in a new
    process (imports excluded) whose numba cache is ``cache_dir``."""
    env = {**os.environ, 'NUMBA_CACHE_DIR': cache_dir}
    out = subprocess.run([sys.executable, '-m', 'ffcv_dr.bench', kind, path, str(size),
                          str(batch_size), str(workers)], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


def _first_batch(kind, path, size, batch_size, workers):
    from .pipelines import Loader
    start = time.perf_counter()
    if kind == 'ffcv':
        loader = plain_ffcv_loader(path, batch_size, workers, size)
    else:
        loader = Loader(path, batch_size=batch_size, num_workers=workers, output_size=(size, size))
    next(iter(loader))
    print(time.perf_counter() - start)


FFCV_IMAGENET = dict(write_mode='proportion', compress_probability=0.5, max_resolution=500,
                     jpeg_quality=90)   # ffcv-imagenet's write_imagenet.sh 500 0.50 90


def run(beton: str, out_dir: str, workers: int = None, batch_size: int = 64,
        rounds: int = 3, epoch_images: int = 4096, sizes=(176, 224), repeats: int = 3) -> dict:
    from .convert import convert
    from .pipelines import Loader
    from .storage import Storage
    workers = workers or os.cpu_count()
    f = BetonFile(beton)
    if f.recipe.mixing or np.any(f.image_meta['mode'] != STORED_JPEG):
        raise ValueError(f'{beton}: the benchmark takes the ImageNet+ recipe on original JPEG '
                         'bytes (no mixing, write mode original)')
    n = len(f)
    indices = tiled(n, epoch_images)
    res = {'beton': os.path.abspath(beton), 'images': n, 'epoch_images': len(indices),
           'workers': workers, 'batch_size': batch_size, 'sizes': list(sizes),
           'reinforcements_per_image': f.recipe.num_samples, 'rates': {}}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        print(f'benchmark: {n} images in epochs of {len(indices)}, {workers} workers, batch '
              f'{batch_size}, {rounds} rounds; preparing inputs in {tmp}')
        images, mldr = write_mldr_folder(f, tmp)
        files = {'B_same': os.path.join(tmp, 'same.beton'), 'B_imagenet': os.path.join(tmp, 'imagenet.beton'),
                 'B_jpg': os.path.join(tmp, 'jpg.beton'), 'C_orig': beton,
                 'C_matched': os.path.join(tmp, 'matched.beton')}
        # conversions first, in a process that has run no loader yet, as `ffcv-dr convert` runs
        convert_rates, writer_rates = [], []
        out = os.path.join(tmp, 'out.beton')
        copies = -(-CONVERT_IMAGES // n)
        many_images, many_mldr = write_mldr_folder(f, os.path.join(tmp, 'tiled'), copies)
        res['convert_images'] = n * copies
        for r in range(repeats + 1):  # the first of each imports what it uses: warm-up
            start = time.perf_counter()
            convert(many_images, out, many_mldr, num_workers=workers, num_classes=f.recipe.num_classes)
            convert_rates.append(res['convert_images'] / (time.perf_counter() - start))
            os.remove(out)  # so that neither write waits on the other's pages going to disk
            writer_rates.append(ffcv_writer_rate(many_images, out, workers,
                                                 RGBImageField(write_mode='jpg', jpeg_quality=90)))
            os.remove(out)
        res['rates']['convert_ffcv_dr'], res['rates']['convert_ffcv_writer'] = convert_rates[1:], writer_rates[1:]
        write_plain_beton(f, files['B_same'], workers)
        ffcv_writer_rate(images, files['B_imagenet'], workers, RGBImageField(**FFCV_IMAGENET))
        ffcv_writer_rate(images, files['B_jpg'], workers, RGBImageField(write_mode='jpg', jpeg_quality=90))
        convert(images, files['C_matched'], mldr, num_workers=workers, num_classes=f.recipe.num_classes,
                storage=Storage(**FFCV_IMAGENET))
        res['file_bytes'] = {k: os.path.getsize(p) for k, p in files.items()}

        loaders = {}
        for size in sizes:
            for kind, path in files.items():
                loaders[f'{kind}@{size}'] = (
                    plain_ffcv_loader(path, batch_size, workers, size, indices=indices)
                    if kind.startswith('B') else
                    Loader(path, batch_size=batch_size, num_workers=workers, seed=0, indices=indices,
                           output_size=(size, size)))
        for r in range(rounds + 1):  # round 0 compiles and warms up
            for name, loader in loaders.items():
                rate = epoch_rate(loader)
                if r:
                    res['rates'].setdefault(name, []).append(rate)
            print(f'round {r}: ' + ', '.join(f'{k} {res["rates"][k][-1]:.0f}' for k in loaders if r))
        loader = loaders[f'C_orig@{sizes[-1]}']
        del loaders
        rss = []
        for _ in range(RSS_EPOCHS):  # C_orig alone: does it hold on to memory epoch after epoch?
            epoch_rate(loader)
            rss.append(_rss()[0])
        res['rss_growth'] = rss[-1] / rss[0] - 1
        res['peak_rss'] = _rss()[1]
        res['rates']['A_full_decode'] = full_decode_rate(f, workers, repeats)
        for size in sizes:
            dataset = MldrStyleDataset(images, mldr, f.recipe, size)
            res['rates'][f'D@{size}'] = epoch_rates(torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                persistent_workers=True), repeats)

        cold = os.path.join(tmp, 'numba-cache')
        res['first_batch_s'] = {
            'B_imagenet': [first_batch_seconds('ffcv', files['B_imagenet'], sizes[-1], batch_size,
                                               workers, cold) for _ in range(2)],
            'C_orig': [first_batch_seconds('ffcv-dr', beton, sizes[-1], batch_size, workers, cold)
                       for _ in range(2)]}

    return summarise(res, out_dir)


ROWS = {'B_imagenet': "FFCV RRC+flip, ImageNet as ffcv-imagenet writes it (500/0.5/90)",
        'B_jpg': 'FFCV RRC+flip, FFCV writer jpg q90',
        'B_same': "FFCV RRC+flip, the same JPEG bytes as C_orig",
        'C_matched': 'ffcv-dr full recipe + soft targets, stored as B_imagenet',
        'C_orig': 'ffcv-dr full recipe + soft targets, original JPEG bytes',
        'D': "ml-dr's loader design (pickles + PIL)"}
OTHER = {'A_full_decode': 'A  libjpeg-turbo full decode (original bytes)',
         'convert_ffcv_dr': 'ffcv-dr convert (original bytes)',
         'convert_ffcv_writer': "FFCV's writer (jpg q90)"}


def summarise(res: dict, out_dir: str) -> dict:
    med = {k: statistics.median(v) for k, v in res['rates'].items()}
    res['median_images_per_s'] = med
    sizes = res['sizes']
    ratios = {}
    for size in sizes:
        def m(k):
            return med[f'{k}@{size}']
        ratios[size] = {'C_matched/B_imagenet': m('C_matched') / m('B_imagenet'),
                        'C_orig/B_imagenet': m('C_orig') / m('B_imagenet'),
                        'C_orig/B_jpg': m('C_orig') / m('B_jpg'),
                        'C/D': m('C_orig') / m('D')}
    res['ratios'] = ratios
    res['conversion_speedup'] = med['convert_ffcv_dr'] / med['convert_ffcv_writer']
    print(f'\n{"":75s}' + ''.join(f'{f"{s} px":>9s}' for s in sizes))
    for k, label in ROWS.items():
        print(f'{k:11s}{label:64s}' + ''.join(f'{med[f"{k}@{s}"]:9.0f}' for s in sizes))
    for k, label in OTHER.items():
        print(f'{label:75s}{med[k]:9.0f}')
    first = res['first_batch_s']
    print(f'\ntime to first batch at {sizes[-1]} px, first / second process: B_imagenet '
          f'{first["B_imagenet"][0]:.1f} / {first["B_imagenet"][1]:.1f} s, C_orig '
          f'{first["C_orig"][0]:.1f} / {first["C_orig"][1]:.1f} s')
    print(f'conversion: ffcv-dr convert is {res["conversion_speedup"]:.2f}x FFCV\'s writer')
    print(f'RSS: peak {res["peak_rss"] / 2**20:.0f} MiB (all loaders); C_orig alone grew '
          f'{100 * res["rss_growth"]:+.1f}% from epoch 1 to {RSS_EPOCHS}')
    with open(os.path.join(out_dir, 'bench.json'), 'w') as fp:
        json.dump(res, fp, indent=1)
    _chart(med, sizes, os.path.join(out_dir, 'bench.png'))
    print(f'wrote {os.path.join(out_dir, "bench.json")} and bench.png')
    print(' '.join(f'{k}=' + '/'.join(f'{ratios[s][k]:.2f}' for s in sizes) for k in ratios[sizes[0]])
          + f' ({"/".join(str(s) for s in sizes)} px)')
    return res


def _chart(med: dict, sizes, path: str):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = list(ROWS)
    fig, ax = plt.subplots(figsize=(9, 5))
    height = 0.8 / len(sizes)
    for k, size in enumerate(sizes):
        values = [med[f'{key}@{size}'] for key in keys]
        ys = np.arange(len(keys)) + k * height
        ax.barh(ys, values, height=height, label=f'{size} px')
        for y, v in zip(ys, values):
            ax.text(v, y, f' {v:.0f}', va='center', fontsize=8)
    ax.set_yticks(np.arange(len(keys)) + height * (len(sizes) - 1) / 2,
                  [f'{k}\n{ROWS[k].replace(", ", chr(10), 1) if k[0] == "C" else ROWS[k]}'
                   for k in keys], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel('images/s (median of the rounds)')
    ax.set_xlim(0, 1.15 * max(med[f'{k}@{s}'] for k in keys for s in sizes))
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':  # one time-to-first-batch measurement: KIND PATH SIZE BATCH WORKERS
    _first_batch(sys.argv[1], sys.argv[2], *(int(v) for v in sys.argv[3:6]))
