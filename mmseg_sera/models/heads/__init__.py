from .cris_head import (CRISHead, TextDynamicConvProjector,
                        VLGlobalAlignDecoder)
from .refer_head import (BaseReferHead, ReferHead, TextDynamicProjector,
                         VLDecoder)

__all__ = [
    'ReferHead', 'TextDynamicProjector', 'VLDecoder', 'BaseReferHead',
    'CRISHead', 'TextDynamicConvProjector', 'VLGlobalAlignDecoder'
]
