"""A fix for FFCV 1.0.2, applied when ffcv_dr is imported.

FFCV's memory managers build their state types as ``t = nb.uint8[::1]`` and
then set ``t.mutable = False``. numba interns its types, so this flips the
shared ``uint8[::1]`` type object itself to read-only: its hash changes while
it is a key in numba's overload tables. Jitted kernels that outlive one
``Loader`` (ours live at module level) then fail to type-check, or hang,
when the next Loader compiles. The replacements below build new read-only
types and leave the interned ones alone.
"""
import numba as nb
import numpy as np
from ffcv.pipeline.compiler import Compiler
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.memory_managers.process_cache.manager import ProcessCacheManager


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
