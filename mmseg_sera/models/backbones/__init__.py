"""Image backbones (ViTs with adapter slots)."""
from .clip_vit import CLIPViT
from .dinov2 import DINOv2
from .dual_stream import (BackboneFeatures, DualStreamDINOv2,
                          resolve_block_map)

__all__ = [
    'DINOv2', 'CLIPViT', 'DualStreamDINOv2', 'BackboneFeatures',
    'resolve_block_map'
]
