"""Writing a ``.beton`` with FFCV's own writer, made safe for long jobs: a
failing or killed worker stops the write with one message instead of hanging
it, a full disk says so, the file appears at its path only when complete, and
the same inputs give the same bytes."""
from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import os
import queue
import shutil
import time

import numpy as np
from ffcv.fields import IntField
from ffcv.utils import chunks
from ffcv.writer import DatasetWriter, handle_sample
from tqdm import tqdm

from .fields import ReinforcedImageField, SoftTargetField
from .render import render_layout
from .format import HAS_PAIR, bytes_per_reinforcement, reinforcement_dtype, topk_dtype
from .intake import ImageList
from .jobs import ConvertError, disk_full, is_disk_full
from .mldr import MldrError
from .rules import describe, first_problem, magnitude_limits
from .storage import Storage, stored_image

_FORK = mp.get_context('fork')  # workers inherit what they read (samples, shared memory, compiled code)


# Images per work item of FFCV's writer; its default (100) leaves workers idle
# at the end of small datasets.
WRITER_CHUNK = 16


class FolderImages:
    """Images of an ImageFolder, stored as ``storage`` says (convert, reinforce):
    what ``write_beton`` writes beside each image's records."""

    def __init__(self, images: ImageList, probes, storage: Storage):
        self.images, self.probes, self.storage = images, probes, storage
        self.labels, self.indices = images.labels, images.indices
        self.orig_sizes = np.array([p[:2] for p in probes], np.int64).reshape(-1, 2)  # (width, height)

    def name(self, i) -> str:
        return self.images.paths[i]

    def stored(self, i) -> tuple:
        """(payload, stored width, stored height, mode) of image i."""
        width, height, passthrough = self.probes[i]
        return stored_image(self.images.paths[i], int(self.indices[i]), width, height, passthrough,
                            self.storage)

    def payload_bytes(self) -> int:
        """At most what the payloads take: re-encoded images are counted at
        their file size, raw ones at their pixels' (those of ``proportion``
        too)."""
        raw = self.storage.write_mode in ('raw', 'proportion', 'smart')
        return int(sum(3 * np.prod(self.storage.stored_size(*p[:2])) if raw else os.path.getsize(path)
                       for path, p in zip(self.images.paths, self.probes)))

    def summary(self) -> dict:
        original = self.storage.write_mode == 'original'
        return {'class_space': self.images.class_space, 'storage': self.storage,
                're_encoded': int(sum(not p[2] for p in self.probes)) if original else len(self.probes)}


class BetonImages:
    """The images of an ffcv-dr file (those at ``indices``, or all), as
    ``write_beton`` copies them: the stored bytes unchanged (relabel, subset)."""

    def __init__(self, f, indices=None):
        self.f = f
        self.indices = np.arange(len(f)) if indices is None else np.asarray(indices, np.int64)
        self.labels = f.target_meta['label'][self.indices].astype(np.int64)
        self.orig_sizes = f.orig_sizes[self.indices, ::-1].copy()   # (width, height)

    def name(self, i) -> str:
        return f'{self.f.path} (sample {int(self.indices[i])})'

    def stored(self, i) -> tuple:
        """(payload, stored width, stored height, mode) of the i-th image kept."""
        k = int(self.indices[i])
        meta = self.f.image_meta[k]
        return self.f.payload(k), int(meta['width']), int(meta['height']), int(meta['mode'])

    def payload_bytes(self) -> int:
        return int(self.f.image_block_sizes()[self.indices].sum()) - len(self.indices) * self.f.params_size

    def summary(self) -> dict:
        return {}


class _Samples:
    """What FFCV's writer workers index. A worker that raises makes FFCV's writer
    wait forever, so failures are sent to the main process (a queue, not a
    file: the disk may be full) and a placeholder is written instead; the
    caller then discards the output."""

    def __init__(self, images, source, output):
        self.images, self.source, self.output = images, source, output
        self.errors, self.failed = _FORK.SimpleQueue(), _FORK.Event()
        recipe = source.recipe
        indices = images.indices
        self.position = None  # ImageFolder index -> position in the file, where images were skipped
        if recipe.mixing and len(indices) and indices[-1] != len(indices) - 1:
            self.position = np.full(int(indices.max()) + 1, -1, np.int64)
            self.position[indices] = np.arange(len(indices))
        self.placeholder = (np.zeros(recipe.num_samples, reinforcement_dtype(recipe)),
                            np.zeros(recipe.num_samples, topk_dtype(recipe)))
        # the rules every written record must pass, with the crops' pixel space by position
        self.rules = (render_layout(recipe), magnitude_limits(recipe), np.int64(recipe.topk),
                      np.int64(recipe.num_classes), images.orig_sizes[:, ::-1].copy())

    def __len__(self):
        return len(self.images.indices)

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
                width, height = self.images.orig_sizes[i]
                payload, w, h, mode = self.images.stored(i)
                return (payload, width, height, w, h, mode, records), (label, topk), label
            except Exception as e:  # noqa: BLE001 -- see the class docstring
                self.fail(str(e) if isinstance(e, (MldrError, ConvertError)) else
                          f'{self.images.name(i)}: {type(e).__name__}: {e}', is_disk_full(e))
        records, topk = self.placeholder
        return (np.zeros(0, np.uint8), 1, 1, 1, 1, 0, records), (label, topk), label


class _Writer(DatasetWriter):
    """FFCV's writer, except that
    - a worker that fails (a full disk, say) records why and releases the main
      process, which FFCV leaves waiting forever;
    - a worker that dies (killed) stops the write instead of hanging it;
    - samples are laid out in the order of their indices, whichever worker
      encodes them and whenever, so the same inputs give the same bytes
      (:class:`_OrderedPages`); FFCV's layout follows which worker fills a
      page first;
    - the samples' metadata lives in anonymous shared memory, which the kernel
      frees however the processes end (FFCV's named segment in /dev/shm
      outlives a killed job);
    - the main process waits on the workers' results instead of checking a
      counter every 0.1 s, which cost every file 0.1-0.2 s."""

    def write(self, samples: '_Samples'):
        indices = list(enumerate(range(len(samples))))
        self._write_common(len(indices), enumerate(chunks(indices, WRITER_CHUNK)), _writer_job,
                           (samples,))

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
        allocator = _OrderedPages(self.fname, self.data_region_start, self.page_size)
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
            with open(self.fname, 'r+b') as f:   # whole pages, as FFCV's process cache reads them
                f.truncate(allocator.end())
            self.finalize(sorted(allocations, key=lambda a: a[1]))
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()


def _writer_job(input_queue, metadata_sm, metadata_type, fields, pages, done_number,
                allocations_queue, samples):
    """FFCV's worker loop over (sequence number, chunk) items, each chunk
    placed in the file in its turn once encoded."""
    try:
        metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
        names = metadata_type.names
        with pages:
            while (item := input_queue.get()) is not None:
                turn, chunk = item
                try:
                    for dest_ix, source_ix in chunk:
                        handle_sample(samples[source_ix], dest_ix, names, metadata, pages, fields)
                finally:
                    pages.place(turn, metadata)   # always: the chunks after it wait for its turn
                with done_number.get_lock():
                    done_number.value += len(chunk)
        allocations_queue.put(pages.allocations)
    except Exception as e:  # noqa: BLE001 -- recorded, and the caller raises ConvertError
        samples.fail(f'{samples.output}: writing failed ({type(e).__name__}: {e})', is_disk_full(e))
        allocations_queue.put([])  # the main process waits for one result per worker


class _AnonymousMemory:
    """Shared memory as FFCV's writer uses it (``.buf``), mapped anonymously:
    forked workers share it and nothing outlives the processes."""

    def __init__(self, size: int):
        self._map = mmap.mmap(-1, max(size, 1))
        self.buf = memoryview(self._map)[:size]


class _OrderedPages:
    """FFCV's page layout, decided by the order of the samples rather than by
    which worker fills a page first: a worker encodes a chunk into buffers of
    its own (``malloc`` hands out placeholders for the pointers), then, in the
    chunk's turn, lays its samples out after the previous chunk's (a sample
    that does not fit in what is left of a page starts the next one, as in
    FFCV), puts the real pointers in the metadata and writes the buffers at
    their place (``os.pwrite``; pages are shared by consecutive chunks, at
    disjoint bytes). Taking the turn is a few additions; the encoding stays
    parallel. So relabel, reinforce and convert write the same bytes for the
    same inputs, however the workers are scheduled, resumed or not."""

    def __init__(self, fname: str, offset_start: int, page_size: int):
        self.fname, self.page_size = fname, page_size
        self.offset = -(-offset_start // page_size) * page_size   # FFCV's align_to_page
        self.turn = _FORK.Value(ctypes.c_uint64, 0)      # the chunk to be placed next
        self.cursor = _FORK.Array(ctypes.c_uint64, 2)    # (page, offset in it) after the last placed
        self.allocations, self.pending, self.sample = [], [], None

    def __enter__(self):
        self.fd = os.open(self.fname, os.O_WRONLY)

    def __exit__(self, *exc):
        os.close(self.fd)

    def set_current_sample(self, sample: int):
        self.sample = sample

    def malloc(self, size: int):
        """(placeholder pointer, buffer to fill) for the current sample."""
        if size > self.page_size:
            raise ValueError(f'tried allocating {size} bytes, but the page size is {self.page_size}')
        buffer = np.zeros(size, np.uint8)
        self.pending.append((self.sample, size, buffer))
        return len(self.pending) - 1, buffer

    def place(self, turn: int, metadata: np.ndarray):
        """Lay out and write the encoded chunk, in its turn."""
        pending, self.pending = self.pending, []
        while self.turn.value != turn:
            time.sleep(0.0002)
        try:
            page, at = int(self.cursor[0]), int(self.cursor[1])
            ptrs, k = [], 0
            while k < len(pending):   # one sample's allocations at a time, on one page
                end = k
                while end < len(pending) and pending[end][0] == pending[k][0]:
                    end += 1
                total = sum(size for _, size, _ in pending[k:end])
                if total > self.page_size:
                    raise ValueError(f'sample {pending[k][0]} takes {total} bytes, more than a page '
                                     f'({self.page_size})')
                if at + total > self.page_size:
                    page, at = page + 1, 0
                for _, size, _ in pending[k:end]:
                    ptrs.append(self.offset + page * self.page_size + at)
                    at += size
                k = end
            self.cursor[0], self.cursor[1] = page, at
        finally:
            self.turn.value = turn + 1
        for name in metadata.dtype.names:   # placeholders -> pointers
            column = metadata[name]
            if column.dtype.names and 'data_ptr' in column.dtype.names:
                pointers = column['data_ptr']
                for sample in {s for s, _, _ in pending}:
                    pointers[sample] = ptrs[int(pointers[sample])]
        for (sample, size, buffer), ptr in zip(pending, ptrs):
            self.allocations.append((sample, ptr, size))
            view, where = memoryview(buffer), ptr
            while view:  # pwrite may write less than asked
                written = os.pwrite(self.fd, view, where)
                view, where = view[written:], where + written

    def end(self) -> int:
        """Where the data region ends: after the last page used."""
        page, at = int(self.cursor[0]), int(self.cursor[1])
        return self.offset + (page + (1 if at else 0)) * self.page_size


def _check_free_space(output, scratch, images, recipe, num_workers):
    """Refuse to start a file that cannot fit: FFCV's writer would fail half-way.
    Returns the estimate."""
    need = images.payload_bytes() + len(images.indices) * (
        recipe.num_samples * bytes_per_reinforcement(recipe) + 64) + (num_workers + 2) * (8 << 20)
    free = shutil.disk_usage(scratch).free
    if need > free:
        raise ConvertError(f'{output}: needs about {need / 1e9:.2f} GB, but only {free / 1e9:.2f} GB '
                           f'are free on {os.path.dirname(os.path.abspath(output))}')
    return int(need)


def write_beton(output, images, source, scratch, num_workers, teachers=None, cut_from=None):
    """Write the .beton under ``scratch`` and move it to ``output`` once complete.
    ``images`` (:class:`FolderImages`, or relabel's input file) gives each
    image's label and stored pixels, ``source.get(i)`` its (reinforcement
    records, top-k records); ``teachers``: the :class:`ffcv_dr.format.TeacherEntry`
    tuple of who made the top-k, recorded in the file (None: unknown);
    ``cut_from``: the :class:`ffcv_dr.format.CutFrom` of a subset."""
    tmp_output = os.path.join(scratch, os.path.basename(output))
    recipe = source.recipe
    need = _check_free_space(output, scratch, images, recipe, num_workers)
    writer = _Writer(tmp_output, {'image': ReinforcedImageField(recipe, cut_from),
                                  'target': SoftTargetField(recipe, teachers),
                                  'label': IntField()}, num_workers=num_workers)
    samples = _Samples(images, source, output)
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
    return {'output': output, 'images': len(images.indices), 'recipe': recipe, **images.summary()}


def output_dir(output: str) -> str:
    """The output's folder; a ConvertError when it does not exist."""
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise ConvertError(f'{output}: the directory {out_dir} does not exist')
    return out_dir
