"""Where ml-dr's files come from: a ``reinforced_data`` folder, read by index,
or a downloaded ``.tar``/``.tar.gz``, read once as a stream; only regular
files, each refused unread when larger than its recipe allows."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import tarfile
import zlib

import numpy as np
from tqdm import tqdm

from ..format import reinforcement_dtype, topk_dtype
from ..jobs import regular_file
from .limits import CONFIG_LIMITS, Limits, file_limit, sample_limits
from .records import parse_file, recipe_from_config
from .unpickler import MldrError, load_pickle

_FORK = mp.get_context('fork')

SAMPLE_NAME = re.compile(r'(?:^|/)(\d+)\.pth\.tar$')
CONFIG_NAME = re.compile(r'(?:^|/)config\.pth\.tar$')


def member_index(name: str):
    m = SAMPLE_NAME.search(name)
    return int(m.group(1)) if m else None


class MldrDirectory:
    """A ``reinforced_data`` directory: files are read on demand, by index."""

    def __init__(self, path: str, num_images: int):
        self.path = path
        config = os.path.join(path, 'config.pth.tar')
        if not os.path.isfile(config):
            raise MldrError(f'{config}: missing (an ml-dr reinforced_data directory has one)')
        self.config = load_pickle(read_bounded(config, file_limit(CONFIG_LIMITS)), config,
                                  CONFIG_LIMITS)
        found = set()
        for entry in os.listdir(path):
            i = member_index(entry)
            if i is not None:
                found.add(i)
        check_indices(found, num_images, path)

    def name(self, index: int) -> str:
        return os.path.join(self.path, f'{index}.pth.tar')

    def read(self, index: int, limits: Limits):
        """(bytes, path) of image ``index``'s file, refused when larger than
        a file within ``limits`` can be."""
        name = self.name(index)
        return read_bounded(name, file_limit(limits)), name


def check_indices(found, num_images, where):
    missing = sorted(set(range(num_images)) - set(found))
    extra = sorted(set(found) - set(range(num_images)))
    if missing:
        raise MldrError(f'{where}: no reinforcements for {len(missing)} of the {num_images} images '
                        f'(first missing index: {missing[0]})')
    if extra:
        raise MldrError(f'{where}: reinforcements for index {extra[0]}, but the image folder has only '
                        f'{num_images} images')


def iter_tar(path: str, limits: Limits, config_only: bool = False):
    """Yield (member name, bytes) of the reinforcement files (or with
    ``config_only``, the config) in an ml-dr ``.tar``/``.tar.gz``, read as a
    stream. Nothing is extracted; members whose path escapes the archive, or
    that declare more bytes than a file within ``limits`` can have, are refused."""
    try:
        with tarfile.open(path, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = member.name.split('/')
                if member.name.startswith('/') or '..' in parts:
                    raise MldrError(f'{path}: refused member {member.name!r}: path outside the archive')
                if not (CONFIG_NAME.search(member.name) if config_only else SAMPLE_NAME.search(member.name)):
                    continue
                if member.size > file_limit(limits):
                    raise MldrError(f'{path}:{member.name}: refused: declares {member.size} bytes, more '
                                    f'than the {file_limit(limits)} an ml-dr file of this recipe can '
                                    'need (the limit)')
                yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise MldrError(f'{path}: unreadable archive ({type(e).__name__}: {e})') from None


def read_bounded(path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, refused unread when over ``max_bytes``."""
    regular_file(path)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise MldrError(f'{path}: refused: {size} bytes, more than the {max_bytes} an ml-dr file '
                        'of this recipe can need (the limit)')
    with open(path, 'rb') as f:
        return f.read(max_bytes + 1)


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
