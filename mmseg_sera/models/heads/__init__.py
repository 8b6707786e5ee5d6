from .refer_head import ReferHead, TextDynamicProjector, VLDecoder

__all__ = ['ReferHead', 'TextDynamicProjector', 'VLDecoder']
