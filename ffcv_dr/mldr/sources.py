"""Where ml-dr's files come from: a ``reinforced_data`` folder, read by index,
or a downloaded ``.tar``/``.tar.gz``, read once as a stream; only regular
files, each refused unread when larger than its recipe allows."""
from __future__ import annotations

import os
import re
import tarfile
import zlib

from ..jobs import regular_file
from .limits import CONFIG_LIMITS, Limits, file_limit
from .unpickler import MldrError, load_pickle

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


