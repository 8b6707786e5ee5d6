"""A DINOv2 whose block maps are resampled into a pyramid, without a neck.

:class:`PyramidDINOv2` runs one :class:`~.dinov2.DINOv2` (with whatever
adapters it has, or none) and resamples its ``out_indices`` maps by
``out_scales``, parameter-free, as :class:`~.dual_stream.DualStreamDINOv2`
does for its adapted tower. It lets a single-stream model (a plain or a
SERA-adapted DINOv2) feed the same ``UPerHead`` pyramid as a dual-stream
SpectralMoE model, so that the heads of a comparison are identical, and the
state-dict keys of the tower are the same (``backbone.backbone.*`` in a
segmentor) in both.

The features come back as
:class:`~.dual_stream.BackboneFeatures` (a tuple carrying the adapters'
``aux_losses`` and ``routing``), so a ``BackboneAuxLossHead`` works here
too.

"""
from typing import Dict, Optional, Sequence

from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from .dinov2 import DINOv2
from .dual_stream import (BackboneFeatures, check_out_scales,
                          resample_pyramid)

__all__ = ['PyramidDINOv2']


@MODELS.register_module()
class PyramidDINOv2(BaseModule):
    """One DINOv2 tower, its returned maps resampled to a pyramid.

    Args:
        backbone: config of the :class:`DINOv2` (its ``trainable``,
            ``adapters`` and ``init_cfg``, e.g. ``dict(type='Pretrained',
            checkpoint=...)``, are its own). Its ``post_block`` adapters get
            no second modality.
        bands: input channels the tower sees, in order (default all), e.g.
            ``(2, 1, 0)`` for an RGB tower on a 6-band input; their number
            must be the tower's ``in_channels``.
        out_scales: one scale per ``out_indices`` level (> 1: bilinear up,
            1 / k: k x k average pooling). None: every map at stride
            ``patch_size``.
        init_cfg: for this wrapper (the tower uses its own).
    """

    def __init__(self,
                 *,
                 backbone: Dict,
                 bands: Optional[Sequence[int]] = None,
                 out_scales: Optional[Sequence[float]] = None,
                 init_cfg: Optional[Dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        if not isinstance(self.backbone, DINOv2):
            raise ValueError('backbone must build a DINOv2, got '
                             f'{type(self.backbone).__name__}')
        self.bands = None
        if bands is not None:
            self.bands = tuple(int(b) for b in bands)
            if len(self.bands) != self.backbone.in_channels or min(
                    self.bands) < 0:
                raise ValueError(
                    f'bands {self.bands} must name '
                    f'{self.backbone.in_channels} non-negative input '
                    'channels (the tower\'s in_channels)')
        self.out_scales = None if out_scales is None else check_out_scales(
            out_scales, len(self.backbone.out_indices))

    @property
    def embed_dims(self) -> int:
        """Width C of the returned maps."""
        return self.backbone.embed_dims

    def forward(self, x: Tensor) -> BackboneFeatures:
        """B x bands x H x W -> :class:`BackboneFeatures` (the tower's
        ``out_indices`` maps, resampled by ``out_scales``)."""
        if self.bands is not None:
            if x.ndim != 4 or max(self.bands) >= x.shape[1]:
                raise ValueError(f'PyramidDINOv2 selects bands {self.bands} '
                                 f'of an input of shape {tuple(x.shape)}')
            x = x[:, list(self.bands)]
        out = self.backbone.forward_features(x)
        feats = list(out.feats) if self.out_scales is None else \
            resample_pyramid(out.feats, self.out_scales)
        return BackboneFeatures(feats, aux_losses=out.aux_losses,
                                routing=out.routing)
