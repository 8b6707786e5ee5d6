"""Image backbones (ViTs with adapter slots)."""
from .dinov2 import DINOv2

__all__ = ['DINOv2']
