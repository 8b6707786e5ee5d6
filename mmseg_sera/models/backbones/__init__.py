"""Image backbones (ViTs with adapter slots)."""
from .clip_vit import CLIPViT
from .dinov2 import DINOv2
from .dinov3 import DINOv3
from .dual_stream import (BackboneFeatures, DualStreamDINOv2,
                          resolve_block_map)
from .pyramid import PyramidDINOv2

__all__ = [
    'DINOv2', 'DINOv3', 'CLIPViT', 'DualStreamDINOv2', 'BackboneFeatures',
    'resolve_block_map', 'PyramidDINOv2'
]
