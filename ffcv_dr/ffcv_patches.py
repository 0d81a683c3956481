"""Fixes for FFCV 1.0.2, applied when ffcv_dr is imported.

An error in the thread that runs FFCV's pipeline ended that thread and left
the training loop waiting for a batch forever. The error now reaches the
loop: the thread hands it over in place of the next batch, and the loop's
``next`` raises it.

FFCV's memory managers build their state types as ``t = nb.uint8[::1]`` and
then set ``t.mutable = False``. numba interns its types, so this flips the
shared ``uint8[::1]`` type object itself to read-only: its hash changes while
it is a key in numba's overload tables. Jitted kernels that outlive one
``Loader`` (ours live at module level) then fail to type-check, or hang,
when the next Loader compiles. The replacements below build new read-only
types and leave the interned ones alone.

FFCV never tells its decoders the epoch. Every ``ffcv.Loader`` (ffcv-dr's
and plain ones built with ffcv-dr's decoders) now binds the decoders'
:class:`~ffcv_dr.replay_clock.ReplayClock` to its file before compiling
them, and advances it as each epoch starts, so each epoch replays new
reinforcements without a ``set_epoch`` call.
"""
from queue import Full

import numba as nb
import numpy as np
from ffcv.loader import epoch_iterator
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.loader.loader import Loader
from ffcv.pipeline.compiler import Compiler
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.memory_managers.process_cache.manager import ProcessCacheManager

from .replay_clock import ReplayClock


def _readonly(dtype, ndim):
    return nb.types.Array(dtype, ndim, 'C', readonly=True)


def _os_cache_state_type(self):
    # FFCV marks only the data read-only (its second assignment targets t1 again).
    return nb.types.Tuple([_readonly(nb.uint8, 1), nb.uint64[::1], nb.uint64[::1]])


def _os_cache_compile_reader(self):
    # As FFCV's, with the read-only return type it meant to declare.
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]
    return Compiler.compile(read, _readonly(nb.uint8, 1)(nb.uint64, self.state_type))


def _process_cache_state_type(self):
    return nb.types.Tuple([_readonly(nb.uint8, 2), _readonly(nb.uint64, 1),
                           _readonly(nb.uint64, 1), _readonly(nb.uint32, 1)])


OSCacheManager.state_type = property(_os_cache_state_type)
OSCacheManager.compile_reader = _os_cache_compile_reader
ProcessCacheManager.state_type = property(_process_cache_state_type)


class _Failure:
    """What the pipeline's thread raised, in place of a batch."""

    def __init__(self, error: BaseException):
        self.error = error


_run = EpochIterator.run


def _run_handing_over_errors(self):
    try:
        _run(self)
    except BaseException as error:  # noqa: BLE001 -- handed to the caller, who raises it
        while not self.terminate_event.is_set():
            try:
                self.output_queue.put(_Failure(error), timeout=0.5)
                return
            except Full:
                pass


def _next_raising_errors(self):
    # FFCV's __next__, raising what the pipeline's thread raised.
    result = self.output_queue.get()
    if result is None or isinstance(result, _Failure):
        self.close()
        if result is None:
            raise StopIteration()
        raise result.error
    slot, result = result
    if epoch_iterator.IS_CUDA:
        self.current_stream.wait_stream(self.cuda_streams[slot])
    return result


EpochIterator.run = _run_handing_over_errors
EpochIterator.__next__ = _next_raising_errors


def replay_clocks(loader) -> list:
    """The distinct ReplayClocks of a Loader's operations."""
    clocks = []
    for spec in loader.pipeline_specs.values():
        for op in (spec.decoder, *spec.transforms):
            clock = getattr(op, 'clock', None)
            if isinstance(clock, ReplayClock) and all(clock is not c for c in clocks):
                clocks.append(clock)
    return clocks


_generate_code, _iter = Loader.generate_code, Loader.__iter__


def _generate_code_with_bound_clocks(self):
    unbound = [clock for clock in replay_clocks(self) if not clock.bound]
    if unbound:
        from .beton import BetonFile
        beton = BetonFile(self.fname)  # refuses, naming the file, what is not an ffcv-dr file
        for clock in unbound:
            clock.bind(beton)
    return _generate_code(self)


def _iter_advancing_clocks(self):
    for clock in replay_clocks(self):
        clock.follow(self.next_epoch)
    return _iter(self)


Loader.generate_code = _generate_code_with_bound_clocks
Loader.__iter__ = _iter_advancing_clocks
