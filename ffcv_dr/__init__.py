"""ffcv-dr: train on reinforced datasets (Dataset Reinforcement) at native FFCV speed.

Importing the package is cheap: ffcv, torch and numba (about 5 s together)
load only when something that needs them is used, so the command line
answers at once. The FFCV fixes in :mod:`ffcv_dr.ffcv_patches` still apply
before any Loader is built: at once if ffcv is already imported, else the
moment ffcv is.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = '0.1.0'

_EXPORTS = {'CUSTOM_FIELDS': 'fields', 'Recipe': 'format', 'ReplayClock': 'replay_clock',
            'Loader': 'pipelines', 'normalization': 'pipelines', 'train_pipelines': 'pipelines'}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


class _PatchFFCVOnImport(importlib.abc.MetaPathFinder):
    """Applies :mod:`ffcv_dr.ffcv_patches` right after ``ffcv.loader`` loads,
    whoever imports it, so a plain ``ffcv.Loader`` is patched too."""

    def find_spec(self, name, path=None, target=None):
        if name != 'ffcv.loader':
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            importlib.import_module('.ffcv_patches', __name__)
        spec.loader.exec_module = exec_then_patch
        return spec


if 'ffcv.loader' in sys.modules:
    from . import ffcv_patches  # noqa: F401
else:
    sys.meta_path.insert(0, _PatchFFCVOnImport())
