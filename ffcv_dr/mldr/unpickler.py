"""Unpickling ml-dr's files without running them.

ml-dr writes one ``{index}.pth.tar`` per image with ``torch.save``: a zip
holding a plain pickle of ``(index, [{"params": [...], "prob": (values, ids)}])``.
``torch.load(weights_only=False)`` would execute whatever a downloaded pickle
asks for, so the pickle is read with an unpickler that admits only the
builtins it needs and numpy scalars; anything else is refused, naming the
file. Before that, :mod:`.limits` bounds what it may expand to.
"""
from __future__ import annotations

import io
import pickle
import reprlib
import zipfile
import zlib

import numpy as np

from .limits import Limits, check_pickle, file_limit


_ALLOWED_DTYPES = set('?bBhHiIlLqQefdg') | {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4',
                                            'u8', 'f2', 'f4', 'f8'}


class MldrError(ValueError):
    """An ml-dr input is unreadable or inconsistent; the message names the file."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj, name):
        super().__init__(fileobj)
        self.name = name

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise MldrError(f'{self.name}: refused: the pickle asks for {module}.{name}, '
                            'which an ml-dr reinforcement file never contains')
        return _ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid):
        raise MldrError(f'{self.name}: refused: the pickle references tensor storage, '
                        'which an ml-dr reinforcement file never contains')


def _safe_dtype(spec, *args):
    if spec not in _ALLOWED_DTYPES:
        raise pickle.UnpicklingError(f'numpy dtype {spec!r} is not allowed')
    return np.dtype(spec)


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biuf' or not isinstance(data, bytes):
        raise pickle.UnpicklingError('only numeric numpy scalars are allowed')
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_bytes(text, encoding):
    if not isinstance(text, str) or encoding != 'latin1':
        raise pickle.UnpicklingError("_codecs.encode is allowed only as (text, 'latin1')")
    return text.encode('latin1')


# The only globals an ml-dr pickle may name: numpy scalars (np.int64 in CutMix
# boxes), whose bytes pickle protocol 2 (torch.save's default) spells as
# _codecs.encode(text, 'latin1').
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', 'scalar'): _safe_scalar, ('numpy._core.multiarray', 'scalar'): _safe_scalar,
    ('numpy', 'dtype'): _safe_dtype, ('_codecs', 'encode'): _latin1_bytes,
}


def unzip_pickle(data: bytes, name: str, limits: Limits) -> bytes:
    """The pickle inside a ``torch.save`` zip (or ``data`` itself, a bare
    pickle); the zip's declared sizes are checked before anything is inflated."""
    if len(data) > file_limit(limits):
        raise MldrError(f'{name}: refused: {len(data)} bytes, more than the {file_limit(limits)} '
                        'an ml-dr file of this recipe can need (the limit)')
    if data[:4] != b'PK\x03\x04':
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            pkls = [i for i in zf.infolist() if i.filename.endswith('data.pkl')]
            if len(pkls) != 1:
                raise MldrError(f'{name}: not a torch.save archive (no single data.pkl)')
            if pkls[0].file_size > limits.bytes:
                raise MldrError(f'{name}: refused: {pkls[0].filename} declares {pkls[0].file_size} '
                                f'bytes, more than the {limits.bytes} an ml-dr pickle of this '
                                'recipe can need (the limit)')
            return zf.read(pkls[0])
    except MldrError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, zlib.error) as e:
        raise MldrError(f'{name}: unreadable ml-dr file ({type(e).__name__}: {e})') from None


def load_pickle(data: bytes, name: str, limits: Limits, unzipped: bool = False):
    """Unpickle a ``torch.save`` zip (or a bare pickle, or with ``unzipped`` the
    pickle of one) with the restricted unpickler, once it is within ``limits``."""
    if not unzipped:
        data = unzip_pickle(data, name, limits)
    problem = check_pickle(data, limits)
    if problem:
        raise MldrError(f'{name}: refused: the pickle {problem}')
    try:
        return _RestrictedUnpickler(io.BytesIO(data), name).load()
    except MldrError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, AttributeError, IndexError, OverflowError) as e:
        raise MldrError(f'{name}: unreadable ml-dr file ({type(e).__name__}: {e})') from None


def shown(value) -> str:
    """``value`` for an error message: a hostile file's value can be huge."""
    return reprlib.repr(value)


