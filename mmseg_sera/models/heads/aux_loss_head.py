"""An auxiliary head that hands a backbone's own losses to mmseg.

mmseg's stock ``EncoderDecoder.loss`` (mmseg 1.x) runs::

    x = extract_feat(inputs)                      # backbone (+ neck)
    losses = add_prefix(decode_head.loss(x, data_samples, train_cfg),
                        'decode')
    losses += add_prefix(auxiliary_head.loss(x, data_samples, train_cfg),
                         'aux')                   # 'aux_{i}' for a list

and ``predict`` never calls the auxiliary head. A backbone whose adapters
produce losses (SpectralMoE's expert balance) returns them as the
``aux_losses`` attribute of its feature tuple
(:class:`~mmseg_sera.models.backbones.dual_stream.BackboneFeatures`);
:class:`BackboneAuxLossHead`, configured as ``auxiliary_head``, returns them,
so they reach the training loss as ``aux.loss_moe_balance`` etc. without a
custom segmentor.
"""
from typing import Dict, List, Optional, Sequence

from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS

__all__ = ['BackboneAuxLossHead']


@MODELS.register_module()
class BackboneAuxLossHead(BaseModule):
    """Returns the ``aux_losses`` carried by the backbone's features.

    It has no parameters and makes no prediction.

    Args:
        loss_weight: multiplies every returned term.
        keys: the ``loss_*`` names to return (default: all of them); a name
            the features do not carry raises ``KeyError``.
        init_cfg: unused (no parameters), kept for the mmseg interface.
    """

    def __init__(self, *, loss_weight: float = 1.0,
                 keys: Optional[Sequence[str]] = None,
                 init_cfg: Optional[Dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if keys is not None:
            bad = [k for k in keys if not str(k).startswith('loss')]
            if bad:
                raise ValueError(f'keys {bad} do not start with "loss": '
                                 'mmseg would not add them to the loss')
        self.loss_weight = float(loss_weight)
        self.keys = None if keys is None else tuple(keys)

    def forward(self, inputs: Sequence[Tensor]) -> Dict[str, Tensor]:
        """The (weighted) ``aux_losses`` of ``inputs``."""
        losses = getattr(inputs, 'aux_losses', None)
        if losses is None:
            raise ValueError(
                f'BackboneAuxLossHead got a {type(inputs).__name__} without '
                "'aux_losses': the backbone must return BackboneFeatures "
                '(e.g. DualStreamDINOv2), and no neck may sit between it '
                'and the heads (a neck returns a plain tuple; use the '
                "backbone's out_scales for a pyramid)")
        keys = [k for k in losses if k.startswith('loss')] \
            if self.keys is None else self.keys
        missing = [k for k in keys if k not in losses]
        if missing:
            raise KeyError(f'the backbone reported no {missing}; it has '
                           f'{sorted(losses)}')
        return {k: losses[k] * self.loss_weight for k in keys}

    def loss(self, inputs: Sequence[Tensor], batch_data_samples: List,
             train_cfg: Optional[Dict] = None) -> Dict[str, Tensor]:
        """``EncoderDecoder``'s auxiliary-head call: the backbone's losses
        (the data samples are not used)."""
        return self.forward(inputs)

    def predict(self, inputs, batch_img_metas, test_cfg) -> None:
        raise RuntimeError('BackboneAuxLossHead makes no prediction; it is '
                           'an auxiliary_head (EncoderDecoder never calls '
                           'its predict)')
