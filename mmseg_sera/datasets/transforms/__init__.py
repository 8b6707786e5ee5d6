"""Pipeline transforms for referring segmentation (registered in mmseg's
TRANSFORMS)."""
from .augment import SOFT_MASK_KEY, RandomReferFlip, ReferResizePad
from .formatting import REFER_META_KEYS, PackReferSegInputs
from .loading import (LoadReferImageFromFile, LoadReferringMask,
                      decode_refer_mask)
from .text_transforms import SelectSentence, clean_sentence, swap_left_right

__all__ = [
    'LoadReferImageFromFile', 'LoadReferringMask', 'decode_refer_mask',
    'SelectSentence', 'clean_sentence', 'swap_left_right', 'ReferResizePad',
    'RandomReferFlip', 'PackReferSegInputs', 'REFER_META_KEYS',
    'SOFT_MASK_KEY'
]
