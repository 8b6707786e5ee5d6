from . import (adapters, backbones, heads, moe, necks, segmentors,  # noqa: F401
               text_encoders)
from .structures import (AdapterOutput, BackboneOutput, NeckOutput,
                         TextFeatures, merge_losses)

__all__ = [
    'TextFeatures', 'AdapterOutput', 'BackboneOutput', 'NeckOutput',
    'merge_losses'
]
