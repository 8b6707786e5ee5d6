"""Small typed containers passed between the model's parts.

Text and auxiliary losses travel through these return values and arguments,
never as module state or globals.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from torch import Tensor


@dataclass
class TextFeatures:
    """What a text encoder hands to the rest of the model.

    Attributes:
        tokens: B x L x Ct per-word features (the text tower's final
            LayerNorm output, not projected).
        mask: B x L bool, ``True`` at padding (the ``key_padding_mask``
            convention of ``nn.MultiheadAttention``).
        pooled: B x Cp sentence embedding (the end-of-text token, projected).
    """
    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class AdapterOutput:
    """Return value of a backbone adapter slot.

    Attributes:
        tokens: the updated tokens, same shape as the input.
        routing: optional B x E routing weights, for visualisation/logging.
        aux_losses: ``loss_*`` terms to add to the training loss.
    """
    tokens: Tensor
    routing: Optional[Tensor] = None
    aux_losses: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class BackboneOutput:
    """Return value of ``DINOv2.forward_features`` (and ``CLIPViT``'s).

    Attributes:
        feats: the ``out_indices`` levels as B x C x h x w maps.
        routing: block index -> B x E routing weights of its adapter.
        aux_losses: summed ``loss_*`` terms of all adapters.
        text: with a lock-step text stream (``bridge`` slot, ETRIS): the
            final features of the bridge-modified text stream, which the
            neck and head must use; None otherwise.
        prefix_tokens: per level of ``feats``, the tokens before the
            patches (B x P x C: class token first, then the registers),
            normed as that level (``DINOv2`` / ``DINOv3``; empty for
            towers that do not report them).
    """
    feats: Tuple[Tensor, ...]
    routing: Dict[int, Tensor] = field(default_factory=dict)
    aux_losses: Dict[str, Tensor] = field(default_factory=dict)
    text: Optional[TextFeatures] = None
    prefix_tokens: Tuple[Tensor, ...] = ()


@dataclass
class NeckOutput:
    """Return value of a referring neck.

    Attributes:
        feats: fused B x d x h x w maps for the head.
        aux_losses: ``loss_*`` terms (e.g. ``loss_moe_z``).
        routing: named routing tensors for visualisation/logging, e.g.
            ``{'weights': B x E, 'indices': B x K}``.
    """
    feats: Tuple[Tensor, ...]
    aux_losses: Dict[str, Tensor] = field(default_factory=dict)
    routing: Dict[str, Tensor] = field(default_factory=dict)


def merge_losses(*loss_dicts: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Sum ``loss_*`` dicts key by key (several adapters may report the same
    key)."""
    out: Dict[str, Tensor] = {}
    for d in loss_dicts:
        for k, v in d.items():
            out[k] = out[k] + v if k in out else v
    return out
