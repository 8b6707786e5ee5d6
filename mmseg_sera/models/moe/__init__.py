"""Generic mixture-of-experts parts for dense feature maps: routers, experts
and auxiliary losses. Nothing here knows about DINOv2, CLIP or referring
segmentation."""
from .experts import (BoundaryExpert, ContextExpert, DWConvBoundaryExpert,
                      DWConvSpatialExpert, ShapeExpert, SpatialExpert,
                      coord_grid)
from .losses import balance_loss, cv_squared, token_assignment_loss, z_loss
from .router import NoisyTopKRouter, RouterOutput, SoftRouter
from .token_experts import LowRankTokenExpert

__all__ = [
    'RouterOutput', 'NoisyTopKRouter', 'SoftRouter', 'SpatialExpert',
    'ContextExpert', 'BoundaryExpert', 'ShapeExpert', 'DWConvBoundaryExpert',
    'DWConvSpatialExpert', 'coord_grid', 'z_loss', 'cv_squared',
    'balance_loss', 'token_assignment_loss', 'LowRankTokenExpert'
]
