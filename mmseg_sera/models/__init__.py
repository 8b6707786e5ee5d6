from . import (adapters, backbones, heads, losses, moe, necks,  # noqa: F401
               segmentors, text_encoders)
from .structures import (AdapterOutput, BackboneOutput, NeckOutput,
                         TextFeatures, merge_losses)

__all__ = [
    'TextFeatures', 'AdapterOutput', 'BackboneOutput', 'NeckOutput',
    'merge_losses'
]
