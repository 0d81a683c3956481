"""What keeps ``convert`` and ``reinforce`` from losing or mixing up data:
outputs that never touch inputs, one job per output, inputs that are regular
files, and the fingerprint a resumed run must match."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import tempfile


class JobError(RuntimeError):
    """A job refused before doing any work; nothing was written."""


class ConvertError(RuntimeError):
    """Conversion failed; nothing was written at the output path."""


def regular_file(path: str, missing_ok: bool = False) -> str:
    """``path``, or a JobError when it is not a regular file (a FIFO would block
    the reader forever, a link to /dev/zero would fill memory); with
    ``missing_ok``, a path that cannot be stat'ed passes, for its reader to report."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if missing_ok:
            return path
        raise JobError(f'{path}: unreadable ({e.strerror})') from None
    if not stat.S_ISREG(mode):
        raise JobError(f'{path}: {file_kind(mode)}, not a regular file')
    return path


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is (``mode``: its ``st_mode``)."""
    return ('a FIFO' if stat.S_ISFIFO(mode) else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else 'a socket' if stat.S_ISSOCK(mode) else 'a directory' if stat.S_ISDIR(mode)
            else 'not a regular file')


def check_output(output: str, inputs) -> None:
    """Refuse an output that is, or lies inside, one of ``inputs`` (folders or
    files), before any work: the finished file would replace an input."""
    outs = {os.path.abspath(output), os.path.realpath(output)}  # as given and through links
    for given in filter(None, inputs):
        for inp in {os.path.abspath(given), os.path.realpath(given)}:
            for out in outs:
                if out == inp or (os.path.isdir(inp) and out.startswith(inp.rstrip(os.sep) + os.sep)):
                    raise JobError(f'{output}: the output would be written '
                                   f'{"over" if out == inp else "inside"} the input {given}; '
                                   'choose another path')


# What a SIGTERM removes: the scratch folders and lock files this process made.
_TEMPORARY = set()


@contextlib.contextmanager
def clean_up_on_sigterm():
    """While in the block, SIGTERM (kill, torchrun, a scheduler) removes this
    process's scratch folders and locks before it dies, so that only SIGKILL
    leaves any (for the next job on the output to remove). The handler does
    not unwind the program (an exception raised at an arbitrary point can be
    swallowed), and forked workers keep the default: a job stops its own
    workers with SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum, frame):
    for path in list(_TEMPORARY):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _default_sigterm_in_child():
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


LOCK_MARK = 'ffcv-dr lock of '
SCRATCH_MARK = '.ffcv-dr-scratch'   # inside a scratch folder: the output it is for


class OutputLock:
    """One job per output: an exclusive ``flock`` on a hidden file beside it
    (``.ffcv-dr-lock-NAME``), held for the whole job and released by the
    kernel however the process ends. The file says whose lock it is (the
    output's path, then the holder); a job takes over only such a file of its
    own output, left by a killed job, and refuses any other file by that name
    (a user's, an input), which it never truncates or removes. A second job
    fails at once, naming the holder."""

    def __init__(self, output: str):
        folder, name = os.path.split(os.path.abspath(output))
        self.output, self.path = output, os.path.join(folder, f'.ffcv-dr-lock-{name}')
        self.mark = f'{LOCK_MARK}{os.path.abspath(output)}\n'.encode()
        self.fd = None

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            made = True
        except FileExistsError:
            fd, made = self._existing(), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors='replace').strip().split('\n')[-1]
            os.close(fd)
            raise JobError(f'{self.output}: another job is writing it ({holder or "another process"}); '
                           'wait for it or stop it') from None
        found = b'' if made else os.pread(fd, len(self.mark), 0)
        if not made and found != self.mark:
            os.close(fd)
            if not found:   # made by a job that has not locked it yet
                raise JobError(f'{self.output}: another job is starting on it; wait for it or stop it')
            raise JobError(f'{self.output}: {self.path} is in the way of its lock file and is not an '
                           'ffcv-dr lock of this output; move or rename it')
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.mark + f'pid {os.getpid()} on {socket.gethostname()}'.encode(), 0)
        self.fd = fd
        _TEMPORARY.add(self.path)
        return self

    def _existing(self) -> int:
        """The lock file another job left, opened without following a link or blocking."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise JobError(f'{self.output}: {self.path} is in the way of its lock file '
                           f'({e.strerror}); move or rename it') from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise JobError(f'{self.output}: {self.path} is in the way of its lock file ({file_kind(mode)}); '
                           'move or rename it')
        return fd

    def __exit__(self, *exc):
        _TEMPORARY.discard(self.path)
        _unlink(self.path)   # ours: it bears our mark, and we hold it
        os.close(self.fd)


def scratch_dir(output: str) -> str:
    """A new hidden scratch folder beside ``output``, for the file being
    written, marked inside with the output's path. Called under the
    output's :class:`OutputLock`, so the marked scratch folders of earlier
    jobs on this very output were left by kills (SIGKILL leaves them) and
    are removed first; folders of other outputs, and anything unmarked (a
    user's), are left alone."""
    folder, name = os.path.split(os.path.abspath(output))
    prefix = f'.ffcv-dr-tmp-{name}-'
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + '*')):
        if _scratch_of(stale) == os.path.abspath(output):
            shutil.rmtree(stale, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=folder)
    _TEMPORARY.add(path)
    with open(os.path.join(path, SCRATCH_MARK), 'w') as f:
        f.write(os.path.abspath(output))
    return path


def _scratch_of(path: str):
    """The output a scratch folder was made for, or None (not ffcv-dr's)."""
    if os.path.islink(path) or not os.path.isdir(path):
        return None
    try:
        with open(os.path.join(path, SCRATCH_MARK), 'rb') as f:
            return f.read(65536).decode()
    except (OSError, UnicodeDecodeError):
        return None


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def device_of(path: str) -> str:
    """The device holding ``path`` and where it is mounted, for messages."""
    mount = os.path.realpath(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    device = None
    try:
        with open('/proc/self/mounts') as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1] == mount:
                    device = fields[0]  # the last mount on a point is the visible one
    except OSError:
        pass
    return f'{device or "the device"} (mounted on {mount})'


def disk_full(output: str, folder: str, still_needed: int) -> str:
    """One line for a write that ran out of space: what, where, and how much more."""
    free = shutil.disk_usage(folder).free
    return (f'{output}: the disk is full: {device_of(folder)} has {free:,} bytes free and the job '
            f'needs about {still_needed:,} more; free some space and run it again')


def images_digest(root: str, paths, labels) -> str:
    """SHA-256 over the ordered image list: each path (relative to ``root``),
    size, modification time and label."""
    h = hashlib.sha256()
    for path, label in zip(paths, labels):
        st = os.stat(path)
        h.update(f'{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{int(label)}\n'.encode())
    return h.hexdigest()


def printable(text) -> str:
    """``text`` with every control or other unprintable character escaped as
    Python writes it (``\\n``, ``\\x1b``): names come from files and folders,
    and a raw escape sequence would reach the terminal."""
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def changed(stored: dict, current: dict) -> list:
    """The keys whose values differ between two fingerprints."""
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))


def digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
