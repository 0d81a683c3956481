"""``ffcv-dr train``'s checkpoints: written whole or not at all, carrying a
SHA-256 of their content and the settings they can resume, and refused in
one line naming the file and the problem when damaged, truncated, foreign or
not a regular file. Loaded with ``weights_only=True``: nothing in them runs."""
from __future__ import annotations

import hashlib
import os
import stat

import torch

from .jobs import file_kind

FORMAT = 'ffcv-dr train checkpoint 1'


def _digest(value, h) -> None:
    """Feed ``value`` (nested dicts, lists, tensors, plain values) to ``h`` in a fixed order."""
    if isinstance(value, dict):
        h.update(b'{')
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _digest(value[key], h)
        h.update(b'}')
    elif isinstance(value, (list, tuple)):
        h.update(b'[')
        for item in value:
            _digest(item, h)
        h.update(b']')
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f'tensor {t.dtype} {tuple(t.shape)}'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else repr(error)


def content_digest(state: dict) -> str:
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def save(path: str, state: dict, settings: dict):
    """``state`` with its ``settings`` (what a resume must match) and their digest,
    under a temporary name, then renamed over ``path``."""
    body = {**state, 'format': FORMAT, 'settings': settings}
    torch.save({**body, 'sha256': content_digest(body)}, path + '.tmp')
    os.replace(path + '.tmp', path)


def load(path: str, device, settings: dict) -> dict:
    """The checkpoint at ``path``, checked: a ValueError naming the file and
    what is wrong otherwise (nothing blocks on a FIFO or a device)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f'{path}: {file_kind(mode)}, not a checkpoint file')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{path}: empty, not a checkpoint (delete it to start afresh)')
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, random or foreign bytes alike
        raise ValueError(f'{path}: not a readable checkpoint, damaged or truncated '
                         f'({type(e).__name__}: {first_line(e)})') from None
    if not isinstance(state, dict) or state.get('format') != FORMAT or 'sha256' not in state:
        raise ValueError(f'{path}: not a checkpoint of ffcv-dr train (format {FORMAT!r})')
    stored = state.pop('sha256')
    if content_digest(state) != stored:
        raise ValueError(f'{path}: damaged: its content does not match the checksum it was written with')
    taken = state.get('settings') or {}
    differ = sorted(k for k in settings if taken.get(k) != settings[k])
    if differ:
        raise ValueError(f'{path}: written by a run with other settings, which it cannot resume: '
                         + '; '.join(f'{k}={taken.get(k)!r} there, {settings[k]!r} here' for k in differ))
    return state
