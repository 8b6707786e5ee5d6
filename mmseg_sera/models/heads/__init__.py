from .aux_loss_head import BackboneAuxLossHead
from .cris_head import (CRISHead, TextDynamicConvProjector,
                        VLGlobalAlignDecoder)
from .no_target import NoTargetScorer
from .refer_head import (BaseReferHead, ReferHead, TextDynamicProjector,
                         VLDecoder)
from .segvlm import DeformableRefine, SegVLMRefineBlock, SegVLMSEBlock

__all__ = [
    'ReferHead', 'TextDynamicProjector', 'VLDecoder', 'BaseReferHead',
    'CRISHead', 'TextDynamicConvProjector', 'VLGlobalAlignDecoder',
    'BackboneAuxLossHead', 'SegVLMSEBlock', 'DeformableRefine',
    'SegVLMRefineBlock', 'NoTargetScorer'
]
