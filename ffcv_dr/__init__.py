"""ffcv-dr: train on reinforced datasets (Dataset Reinforcement) at native FFCV speed."""
from . import ffcv_patches  # noqa: F401  (must run before any Loader is built)
from .fields import CUSTOM_FIELDS
from .format import Recipe
from .pipelines import Loader, normalization, train_pipelines
from .replay_clock import ReplayClock

__all__ = ['CUSTOM_FIELDS', 'Loader', 'Recipe', 'ReplayClock', 'normalization', 'train_pipelines']
__version__ = '0.1.0'
