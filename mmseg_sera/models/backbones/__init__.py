"""Image backbones (ViTs with adapter slots)."""
from .clip_vit import CLIPViT
from .dinov2 import DINOv2

__all__ = ['DINOv2', 'CLIPViT']
