"""FFCV fields of an ffcv-dr ``.beton`` and the operations that decode them."""
from ffcv.fields import IntField

from .reinforced_image import ReinforcedImageDecoder, ReinforcedImageField
from .soft_target import (ReinforcementIndexDecoder, SoftTargetDecoder,
                          SoftTargetField)

#: ``custom_fields`` for ``ffcv.Loader`` on an ffcv-dr file.
CUSTOM_FIELDS = {'image': ReinforcedImageField, 'target': SoftTargetField}

__all__ = ['CUSTOM_FIELDS', 'IntField', 'ReinforcedImageDecoder', 'ReinforcedImageField',
           'ReinforcementIndexDecoder', 'SoftTargetDecoder', 'SoftTargetField']
