"""Importing apple/ml-dr's released reinforcements (``ffcv-dr convert``).

- :mod:`.sources`: a ``reinforced_data`` folder or a ``.tar.gz``, file by file;
- :mod:`.limits`: what an untrusted pickle may expand to, checked first;
- :mod:`.unpickler`: the restricted unpickler, which runs nothing;
- :mod:`.reader`: a compiled reader of ml-dr's usual layout (the fast path);
- :mod:`.records`: the layout into ffcv-dr's records, each value checked to
  fit its field (:mod:`.checks`, compiled).
"""
from .limits import CONFIG_LIMITS, Limits, sample_limits
from .reader import compile_here
from .records import ImageSizes, parse_file, parse_sample, recipe_from_config
from .sources import DirectorySource, MldrDirectory, TarSource, check_indices, iter_tar, member_index
from .unpickler import MldrError, load_pickle, unzip_pickle

__all__ = ['CONFIG_LIMITS', 'Limits', 'sample_limits', 'compile_here', 'ImageSizes', 'parse_file',
           'parse_sample', 'recipe_from_config', 'DirectorySource', 'MldrDirectory', 'TarSource', 'check_indices', 'iter_tar',
           'member_index', 'MldrError', 'load_pickle', 'unzip_pickle']
