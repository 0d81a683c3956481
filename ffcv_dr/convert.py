"""``ffcv-dr convert``: an ImageFolder plus ml-dr reinforcements into one ``.beton``.

Three passes, each with a progress bar:
1. image headers (size, format, colour mode) to know the box space of every
   image and which ones need re-encoding (in parallel for large folders);
2. for a ``.tar``/``.tar.gz`` archive only: stream it once, validate every
   pickle and keep the compact records in memory-mapped scratch files;
3. FFCV's ``DatasetWriter`` (see :class:`_Writer`) writes the file under a
   temporary name, which is renamed only once everything is written and checked.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import multiprocessing as mp
import os
import queue
import shutil
from dataclasses import dataclass

import numpy as np
from ffcv.fields import IntField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.utils import chunks
from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .fields import ReinforcedImageField, SoftTargetField
from .fields.reinforced_image import render_layout
from .format import HAS_PAIR, bytes_per_reinforcement, reinforcement_dtype, topk_dtype
from .jobs import OutputLock, check_output, disk_full, is_disk_full, regular_file, scratch_dir
from .jpeg import check_jpeg, jpeg_header
from .mldr import (CONFIG_LIMITS, ImageSizes, MldrDirectory, MldrError, check_indices, compile_here,
                   iter_tar, load_pickle, member_index, parse_file, recipe_from_config, sample_limits)
from .rules import describe, first_problem, magnitude_limits
from .storage import Storage, stored_image


class ConvertError(RuntimeError):
    """Conversion failed; nothing was written at the output path."""


_FORK = mp.get_context('fork')  # workers inherit what they read (samples, shared memory, compiled code)


@dataclass
class ImageList:
    paths: list
    labels: np.ndarray
    classes: list
    num_classes: int
    class_space: str
    indices: np.ndarray = None   # ImageFolder index of each image (differs after skipping)

    def __post_init__(self):
        if self.indices is None:
            self.indices = np.arange(len(self.paths))


@functools.lru_cache(maxsize=1)
def _imagenet_synsets() -> tuple:
    from timm.data import ImageNetInfo
    return tuple(ImageNetInfo('imagenet-1k').label_names())


def list_images(images_dir: str, num_classes: int = None) -> ImageList:
    """Images in ``torchvision.datasets.ImageFolder`` order (index i = i-th sample).

    When every class folder is an ImageNet-1k synset (wnid), labels are
    ImageNet-1k class indices, the space teachers' probabilities live in."""
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(images_dir):
        raise ConvertError(f'{images_dir}: not a directory')
    try:
        folder = ImageFolder(images_dir, loader=lambda p: p)
    except (FileNotFoundError, RuntimeError) as e:
        raise ConvertError(f'{images_dir}: not an image folder ({e})') from None
    paths = [regular_file(p, missing_ok=True) for p, _ in folder.samples]  # the probe reports those
    labels = np.array([y for _, y in folder.samples], np.int64)
    classes, space = folder.classes, 'folder'
    synsets = _imagenet_synsets()
    if (num_classes in (None, len(synsets))) and set(classes) <= set(synsets):
        index = {s: k for k, s in enumerate(synsets)}
        labels = np.array([index[classes[y]] for y in labels], np.int64)
        classes, space = list(synsets), 'imagenet-1k'
    if num_classes is None:
        num_classes = len(classes)
    if labels.size and labels.max() >= num_classes:
        raise ConvertError(f'{images_dir}: {len(classes)} classes do not fit --num-classes {num_classes}')
    return ImageList(paths, labels, classes, num_classes, space)


def _probe_image(args):
    """(path, (width, height, passthrough) or None, problem or None) of an image.
    JPEGs of 1 or 3 components (what PIL opens as L or RGB) are read by
    libjpeg from their header, in a tenth of PIL's time; anything else by PIL."""
    path, max_resolution = args
    try:
        with open(path, 'rb') as f:
            data = f.read()
        header = jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS  # beyond it, PIL warns or refuses
        if header and header[2] in (1, 3) and header[3] == 8 and (not limit or header[0] * header[1] <= limit):
            (width, height), passthrough = header[:2], True
        else:
            with Image.open(path) as img:
                width, height = img.size
                passthrough = img.format == 'JPEG' and img.mode in ('RGB', 'L')
        if passthrough:
            problem = _truncated_jpeg(data)
            if problem:
                return path, None, f'{path}: {problem}'
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return path, None, f'{path}: unreadable image ({type(e).__name__}: {e})'
    if max_resolution and max(width, height) > max_resolution:
        passthrough = False
    return path, (width, height, passthrough), None


def _truncated_jpeg(data: bytes):
    """A problem with a JPEG that does not end in an EOI marker (the mark of an
    interrupted download), found by decoding it; None otherwise. Whole files
    are decoded only then: decoding every image would double the conversion
    time."""
    if b'\xff\xd9' in data[-64:].rstrip(b'\x00\r\n '):
        return None
    return check_jpeg(data)[0]


# Images per work item of FFCV's writer; its default (100) leaves workers idle
# at the end of small datasets.
WRITER_CHUNK = 16

_PARSE_STATE = {}


def _init_parse(recipe, sizes):
    _PARSE_STATE.update(recipe=recipe, sizes=sizes)


def _parse_member(item):
    name, data, index = item
    try:
        records, topk = parse_file(data, index, _PARSE_STATE['recipe'], _PARSE_STATE['sizes'], name)
        return index, records, topk, None
    except MldrError as e:
        return index, None, None, str(e)


class TarSource:
    """An ml-dr archive read once as a stream into memory-mapped records."""

    def __init__(self, path, num_images, num_classes, sizes, scratch, workers):
        config = None
        for name, data in iter_tar(path, CONFIG_LIMITS, config_only=True):
            config = load_pickle(data, f'{path}:{name}', CONFIG_LIMITS)
            break
        if config is None:
            raise MldrError(f'{path}: the archive holds no config.pth.tar')
        self.config = config
        self.recipe = recipe_from_config(config, f'{path}:config.pth.tar', num_classes)
        self.records = np.lib.format.open_memmap(
            os.path.join(scratch, 'records.npy'), 'w+', reinforcement_dtype(self.recipe),
            (num_images, self.recipe.num_samples))
        self.topk = np.lib.format.open_memmap(
            os.path.join(scratch, 'topk.npy'), 'w+', topk_dtype(self.recipe),
            (num_images, self.recipe.num_samples))
        seen = np.zeros(num_images, bool)
        self.names = {}

        def members():
            for name, data in iter_tar(path, sample_limits(self.recipe.num_samples, self.recipe.topk)):
                index = member_index(name)
                where = f'{path}:{name}'
                if index >= num_images:
                    raise MldrError(f'{where}: index {index}, but the image folder has only {num_images} images')
                if seen[index]:
                    raise MldrError(f'{where}: index {index} appears twice in the archive')
                seen[index] = True
                self.names[index] = where
                yield where, data, index

        with _FORK.Pool(workers, _init_parse, (self.recipe, sizes)) as pool, \
                tqdm(total=num_images, desc='reading ml-dr archive', unit='img') as bar:
            for index, records, topk, error in pool.imap_unordered(_parse_member, members(), chunksize=64):
                if error:
                    raise MldrError(error)
                self.records[index] = records
                self.topk[index] = topk
                bar.update()
        check_indices(np.flatnonzero(seen).tolist(), num_images, path)
        self.records.flush()
        self.topk.flush()

    def get(self, index):
        return self.records[index], self.topk[index]

    def name(self, index):
        return self.names[index]


class DirectorySource:
    """An ml-dr ``reinforced_data`` directory, read by index in the writer workers."""

    def __init__(self, path, num_images, num_classes, sizes):
        self.directory = MldrDirectory(path, num_images)
        self.config = self.directory.config
        self.recipe = recipe_from_config(self.config, os.path.join(path, 'config.pth.tar'),
                                         num_classes)
        self.sizes = sizes
        self.limits = sample_limits(self.recipe.num_samples, self.recipe.topk)

    def get(self, index):
        data, name = self.directory.read(index, self.limits)
        return parse_file(data, index, self.recipe, self.sizes, name)

    def name(self, index):
        return self.directory.name(index)


class _Samples:
    """What FFCV's writer workers index. A worker that raises makes FFCV's writer
    wait forever, so failures are sent to the main process (a queue, not a
    file: the disk may be full) and a placeholder is written instead; the
    caller then discards the output."""

    def __init__(self, images: ImageList, probes, source, storage: Storage, output):
        self.images, self.probes, self.source = images, probes, source
        self.storage, self.output = storage, output
        self.errors, self.failed = _FORK.SimpleQueue(), _FORK.Event()
        recipe = source.recipe
        self.position = None  # ImageFolder index -> position in the file, where images were skipped
        if recipe.mixing and len(images.indices) and images.indices[-1] != len(images.indices) - 1:
            self.position = np.full(int(images.indices.max()) + 1, -1, np.int64)
            self.position[images.indices] = np.arange(len(images.indices))
        self.placeholder = (np.zeros(recipe.num_samples, reinforcement_dtype(recipe)),
                            np.zeros(recipe.num_samples, topk_dtype(recipe)))
        # the rules every written record must pass, with the crops' pixel space by position
        self.rules = (render_layout(recipe), magnitude_limits(recipe), np.int64(recipe.topk),
                      np.int64(recipe.num_classes),
                      np.array([(p[1], p[0]) for p in probes], np.int64).reshape(-1, 2))

    def __len__(self):
        return len(self.images.paths)

    def fail(self, message: str, disk_full: bool = False):
        """Record why the write fails (first caller only: the queue is a pipe)."""
        if not self.failed.is_set():
            self.failed.set()
            self.errors.put((message.replace('\n', ' '), disk_full))

    def failure(self):
        """(message, disk full) of the first failure, or None."""
        return None if self.errors.empty() else self.errors.get()

    def check(self, i, records, topk):
        """Refuse what the loader would not replay (:mod:`ffcv_dr.rules`), naming the source."""
        layout, limits, k, num_classes, orig_sizes = self.rules
        problem, j = first_problem(np.ascontiguousarray(records).view(np.uint8).reshape(-1),
                                   np.ascontiguousarray(topk).view(np.uint8).reshape(-1), layout,
                                   limits, k, num_classes, i, orig_sizes, len(records))
        if problem:
            raise MldrError(f'{self.source.name(int(self.images.indices[i]))} (reinforcement {j}): '
                            f'{describe(problem, self.source.recipe)}')

    def __getitem__(self, i):
        label = int(self.images.labels[i])
        if not self.failed.is_set():
            try:
                records, topk = self.source.get(int(self.images.indices[i]))
                if self.position is not None:
                    records = records.copy()
                    paired = (records['mix_flags'] & HAS_PAIR) != 0
                    records['pair'][paired] = self.position[records['pair'][paired]]
                self.check(i, records, topk)
                width, height, passthrough = self.probes[i]
                payload, w, h, mode = stored_image(self.images.paths[i], int(self.images.indices[i]),
                                                   width, height, passthrough, self.storage)
                return (payload, width, height, w, h, mode, records), (label, topk), label
            except Exception as e:  # noqa: BLE001 -- see the class docstring
                self.fail(str(e) if isinstance(e, MldrError) else
                          f'{self.images.paths[i]}: {type(e).__name__}: {e}', is_disk_full(e))
        records, topk = self.placeholder
        return (np.zeros(0, np.uint8), 1, 1, 1, 1, 0, records), (label, topk), label


class _Writer(DatasetWriter):
    """FFCV's writer, except that
    - a worker that fails (a full disk, say) records why and releases the main
      process, which FFCV leaves waiting forever;
    - a worker that dies (killed) stops the write instead of hanging it;
    - workers write their pages without waiting for each other (:class:`_Pages`);
    - the samples' metadata lives in anonymous shared memory, which the kernel
      frees however the processes end (FFCV's named segment in /dev/shm
      outlives a killed job);
    - the main process waits on the workers' results instead of checking a
      counter every 0.1 s, which cost every file 0.1-0.2 s."""

    def write(self, samples: '_Samples'):
        indices = list(enumerate(range(len(samples))))
        self._write_common(len(indices), chunks(indices, WRITER_CHUNK), _writer_job, (samples,))

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        self.metadata_sm.close()   # FFCV's named segment, swapped at once for an anonymous one
        self.metadata_sm.unlink()
        self.metadata_sm = _AnonymousMemory(num_samples * self.metadata_type.itemsize)
        work, results = _FORK.Queue(), _FORK.Queue()
        for item in list(queue_content) + [None] * self.num_workers:
            work.put(item)
        done = _FORK.Value(ctypes.c_uint64, 0)
        allocator = _Pages(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, results,
                *extra_worker_args)
        workers = [_FORK.Process(target=work_fn, args=args) for _ in range(self.num_workers)]
        for w in workers:
            w.start()
        allocations, finished = [], 0
        try:
            with tqdm(total=num_samples, desc='writing', unit='img') as bar:
                while finished < len(workers):
                    try:
                        allocations.extend(results.get(timeout=0.05))
                        finished += 1
                    except queue.Empty:
                        dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                        if dead:
                            raise OSError(f'a writer process died (exit code {dead[0]})') from None
                    bar.update(done.value - bar.n)
            for w in workers:
                w.join()
            self.finalize(allocations)
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()


def _writer_job(input_queue, metadata_sm, metadata_type, fields, allocator, done_number,
                allocations_queue, samples):
    try:
        worker_job_indexed_dataset(input_queue, metadata_sm, metadata_type, fields, allocator,
                                   done_number, allocations_queue, samples)
    except Exception as e:  # noqa: BLE001 -- recorded, and the caller raises ConvertError
        samples.fail(f'{samples.output}: writing failed ({type(e).__name__}: {e})', is_disk_full(e))
        allocations_queue.put([])  # the main process waits for one result per worker


class _AnonymousMemory:
    """Shared memory as FFCV's writer uses it (``.buf``), mapped anonymously:
    forked workers share it and nothing outlives the processes."""

    def __init__(self, size: int):
        self._map = mmap.mmap(-1, max(size, 1))
        self.buf = memoryview(self._map)[:size]


class _Pages(MemoryAllocator):
    """FFCV's page allocator, except that a full page is written at its place
    in the file at once (``os.pwrite``). FFCV's writes pages in order, so a
    worker whose page filled first sat idle until the other workers' earlier
    pages were written."""

    def __enter__(self):
        self.fd = os.open(self.fname, os.O_WRONLY)

    def flush_page(self):
        if self.my_page >= 0:
            page = memoryview(self.page_data)
            at = self.offset + self.my_page * self.page_size
            while page:  # pwrite may write less than asked
                written = os.pwrite(self.fd, page, at)
                page, at = page[written:], at + written

    def __exit__(self, *exc):
        try:
            self.flush_page()
        finally:
            os.close(self.fd)


def _check_free_space(output, scratch, images, probes, recipe, num_workers, storage: Storage):
    """Refuse to start a file that cannot fit: FFCV's writer would fail half-way.
    Re-encoded images are counted at their original file size, raw ones at
    their pixels' (those of ``proportion`` too: an upper bound). Returns that estimate."""
    raw = storage.write_mode in ('raw', 'proportion', 'smart')
    need = sum(3 * np.prod(storage.stored_size(*p[:2])) if raw else os.path.getsize(path)
               for path, p in zip(images.paths, probes)) + len(images.paths) * (
        recipe.num_samples * bytes_per_reinforcement(recipe) + 64) + (num_workers + 2) * (8 << 20)
    free = shutil.disk_usage(scratch).free
    if need > free:
        raise ConvertError(f'{output}: needs about {need / 1e9:.2f} GB, but only {free / 1e9:.2f} GB '
                           f'are free on {os.path.dirname(os.path.abspath(output))}')
    return int(need)


POOL_MIN_IMAGES = 2000


def probe_images(images: ImageList, max_resolution, num_workers, skip_bad: bool = False):
    """(width, height, passthrough) of every image, read from headers in parallel.
    An unreadable image stops everything, or with ``skip_bad`` is reported and
    gets None."""
    work = [(p, max_resolution) for p in images.paths]
    # A header takes ~60 us to read; starting a pool (forking a process that
    # has torch loaded) ~0.1 s: small folders are read faster in-process.
    pool = _FORK.Pool(num_workers) if len(work) > POOL_MIN_IMAGES else None
    try:
        probes = []
        for path, probe, error in tqdm(pool.imap(_probe_image, work, chunksize=64) if pool else
                                       map(_probe_image, work), total=len(work),
                                       desc='reading image headers', unit='img'):
            if error and not skip_bad:
                raise ConvertError(error)
            if error:
                tqdm.write(f'skipping {error}')
            probes.append(probe)
    finally:
        if pool:
            pool.terminate()
    for path, probe in zip(images.paths, probes):
        if probe and max(probe[:2]) > 65535 and not max_resolution:
            raise ConvertError(f'{path}: {probe[0]}x{probe[1]} is too large to store; pass --max-resolution')
    return probes


def readable(images: ImageList, probes):
    """The images (and probes) that :func:`probe_images` could read, and the
    paths of the others."""
    keep = np.array([p is not None for p in probes], bool)
    kept = ImageList([p for p, k in zip(images.paths, keep) if k], images.labels[keep],
                     images.classes, images.num_classes, images.class_space, images.indices[keep])
    return kept, [p for p in probes if p is not None], [p for p, k in zip(images.paths, keep) if not k]


def image_sizes(probes) -> ImageSizes:
    """Original sizes by ImageFolder index; 0x0 for skipped images."""
    return ImageSizes(np.array([p[0] if p else 0 for p in probes], np.int64),
                      np.array([p[1] if p else 0 for p in probes], np.int64))


def write_beton(output, images: ImageList, probes, source, scratch, num_workers, storage: Storage):
    """Write the .beton under ``scratch`` and move it to ``output`` once complete.
    ``source.get(i)`` gives image i's (reinforcement records, top-k records)."""
    tmp_output = os.path.join(scratch, os.path.basename(output))
    recipe = source.recipe
    need = _check_free_space(output, scratch, images, probes, recipe, num_workers, storage)
    writer = _Writer(tmp_output, {'image': ReinforcedImageField(recipe),
                                  'target': SoftTargetField(recipe),
                                  'label': IntField()}, num_workers=num_workers)
    samples = _Samples(images, probes, source, storage, output)
    try:
        writer.write(samples)
        failure = samples.failure()
    except OSError as e:
        failure = f'{output}: writing failed ({type(e).__name__}: {e})', is_disk_full(e)
    if failure:
        message, full = failure
        if full:  # the estimate less what was written; the partial file goes, to free its space
            written = 0
            if os.path.exists(tmp_output):
                written = os.stat(tmp_output).st_blocks * 512
                os.remove(tmp_output)
            message = disk_full(output, scratch, max(need - written, 1))
        raise ConvertError(message)
    os.replace(tmp_output, output)
    return {'output': output, 'images': len(images.paths), 'recipe': recipe,
            'class_space': images.class_space, 'storage': storage,
            're_encoded': int(sum(not p[2] for p in probes)) if storage.write_mode == 'original'
            else len(probes)}


def output_dir(output: str) -> str:
    """The output's folder; a ConvertError when it does not exist."""
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise ConvertError(f'{output}: the directory {out_dir} does not exist')
    return out_dir


def convert(images_dir: str, output: str, mldr: str, num_workers: int = None,
            num_classes: int = None, skip_bad: bool = False, storage: Storage = Storage()) -> dict:
    """Write ``output`` from an ImageFolder and ml-dr reinforcements (dir or archive),
    the images stored as ``storage`` says. With ``skip_bad``, unreadable
    images are left out and listed in ``skipped``."""
    num_workers = num_workers or os.cpu_count()
    output_dir(output)
    if not os.path.exists(mldr):
        raise ConvertError(f'{mldr}: no such file or directory')
    check_output(output, [images_dir, mldr])
    with OutputLock(output):
        return _convert(images_dir, output, mldr, num_workers, num_classes, skip_bad, storage)


def _convert(images_dir, output, mldr, num_workers, num_classes, skip_bad, storage):
    images = list_images(images_dir, num_classes)
    n = len(images.paths)
    probes = probe_images(images, storage.max_resolution, num_workers, skip_bad)
    sizes = image_sizes(probes)
    images, probes, skipped = readable(images, probes)
    scratch = scratch_dir(output)
    try:
        compile_here()
        if os.path.isdir(mldr):
            source = DirectorySource(mldr, n, images.num_classes, sizes)
        else:
            source = TarSource(mldr, n, images.num_classes, sizes, scratch, num_workers)
        result = write_beton(output, images, probes, source, scratch, num_workers, storage)
        return {**result, 'skipped': skipped}
    except MldrError as e:
        raise ConvertError(str(e)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
