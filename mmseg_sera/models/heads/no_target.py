"""The no-target output of the referring mask heads (generalized referring
segmentation, GRES): "does the sentence name anything in this image?".

A sentence may name zero, one or several objects (gRefCOCO). Several
objects need nothing new: the ground truth is the union of their masks and
the mask head learns it as one binary mask. Zero objects need a decision
that a mask alone makes badly (a threshold on the largest probability), so
the heads can carry a separate scorer, as ReLA carries a separate
no-target classifier:

    V: B x d x h x w   the head's text-conditioned map at the input grid
                       (after the vision-language decoder when it has one)
    s: B x Cp          the pooled sentence embedding
    z = LN([GAP(V), GMP(V), s])                     B x (2d + Cp)
    score = W2 ReLU(W1 z + b1) + b2                 B   (a logit)
    p(no target) = sigmoid(score)

Why these inputs: whether an object fits the sentence is a question of
"is there ANY place where image and sentence agree", which the global max
over V answers (one matching location suffices) and the global mean does
not (it dilutes one small object among the background); the mean tells the
scale of the map against which the max is high or low; the sentence itself
says what is asked for (``"all red shapes"`` when nothing is red). V is
taken after the decoder because there the words have already been matched
against the pixels. The LayerNorm puts maps and the sentence embedding,
whose magnitudes differ, on one scale.

Training: ``loss_no_target = loss_weight * BCE(score, y)``, y = 1 for a
sample whose metainfo ``no_target`` is true (``GRefCocoDataset`` packs it)
and, for a sample without the flag, y = 1 when its ground-truth mask has no
object pixel. The mask loss is unchanged: on a no-target sample it trains
toward the all-zero mask (its ground truth).

Prediction (the segmentor): ``pred_no_target = sigmoid(score) > threshold``
and ``no_target_score = sigmoid(score)`` in every output's metainfo; when
``pred_no_target`` is set the predicted mask ``pred_sem_seg`` is all zeros
(``zero_mask=True``, the default: a user who is told "no target" should not
see a mask; ReLA keeps the mask it would have drawn, which
``zero_mask=False`` reproduces). ``seg_logits`` keep the mask
probabilities.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'NoTargetScorer', 'NO_TARGET_KEY', 'PRED_NO_TARGET_KEY',
    'NO_TARGET_SCORE_KEY', 'NO_TARGET_DEFAULTS', 'check_no_target_cfg',
    'no_target_labels', 'no_target_loss'
]

#: metainfo key of the ground-truth flag (``PackReferSegInputs`` packs it)
NO_TARGET_KEY = 'no_target'
#: metainfo keys the segmentor writes on every output when its head has a
#: scorer: the decision (bool) and sigmoid(score) (float)
PRED_NO_TARGET_KEY = 'pred_no_target'
NO_TARGET_SCORE_KEY = 'no_target_score'

#: ``no_target_cfg`` of the heads: the scorer's hidden width, the weight of
#: ``loss_no_target``, the decision threshold on sigmoid(score) and whether
#: a "no target" answer empties the predicted mask
NO_TARGET_DEFAULTS = dict(hidden_channels=256, loss_weight=1.0,
                          threshold=0.5, zero_mask=True)


def check_no_target_cfg(cfg: Optional[dict], owner: str) -> Optional[dict]:
    """``cfg`` completed with :data:`NO_TARGET_DEFAULTS`; None stays None.

    Raises:
        ValueError: an unknown key, a hidden width below 1, a negative loss
            weight or a threshold outside (0, 1).
    """
    if cfg is None:
        return None
    unknown = sorted(set(cfg) - set(NO_TARGET_DEFAULTS))
    if unknown:
        raise ValueError(f'{owner}: no_target_cfg has unknown keys {unknown}'
                         f'; valid: {sorted(NO_TARGET_DEFAULTS)}')
    out = dict(NO_TARGET_DEFAULTS, **cfg)
    if int(out['hidden_channels']) < 1:
        raise ValueError(f'{owner}: no_target_cfg.hidden_channels must be '
                         f'>= 1, got {out["hidden_channels"]}')
    if float(out['loss_weight']) < 0:
        raise ValueError(f'{owner}: no_target_cfg.loss_weight must be >= 0, '
                         f'got {out["loss_weight"]}')
    if not isinstance(out['zero_mask'], bool):
        raise ValueError(f'{owner}: no_target_cfg.zero_mask must be a bool, '
                         f'got {out["zero_mask"]!r}')
    if not 0.0 < float(out['threshold']) < 1.0:
        raise ValueError(f'{owner}: no_target_cfg.threshold must lie in '
                         f'(0, 1), got {out["threshold"]}')
    return out


class NoTargetScorer(nn.Module):
    """No-target logit from a map and the sentence (see the module
    docstring)::

        z = LN([GAP(V), GMP(V), s]);  score = W2 ReLU(W1 z + b1) + b2

    Args:
        in_channels: d, width of V.
        text_dims: Cp, width of s.
        hidden_channels: width of the hidden layer.

    ``forward(V: B x d x h x w, s: B x Cp) -> B`` logits.
    """

    def __init__(self, *, in_channels: int, text_dims: int,
                 hidden_channels: int) -> None:
        super().__init__()
        width = 2 * in_channels + text_dims
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden_channels), nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, 1))

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        z = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3)),
                       pooled.to(x.dtype)], dim=1)
        return self.mlp(self.norm(z)).squeeze(1)


def no_target_labels(samples: Sequence, gt_label: Tensor,
                     ignore_index: int = 255) -> Tensor:
    """Targets y (B float) of ``loss_no_target``: the metainfo flag
    ``no_target`` where a sample has it, else "its ground truth has no
    object pixel" (``gt_label``: B x 1 x H x W in {0, 1, ignore_index}).

    Computed without reading a tensor value on the host.
    """
    known: List[bool] = []
    flags: List[bool] = []
    for sample in samples:
        meta = sample.metainfo if hasattr(sample, 'metainfo') else sample
        value = meta.get(NO_TARGET_KEY)
        known.append(value is not None)
        flags.append(bool(value) if value is not None else False)
    device = gt_label.device
    empty = ~((gt_label == 1).flatten(1).any(dim=1))  # B
    known_t = torch.tensor(known, device=device)
    flags_t = torch.tensor(flags, device=device)
    return torch.where(known_t, flags_t, empty).float()


def no_target_loss(scores: Tensor, labels: Tensor, *,
                   loss_weight: float) -> Dict[str, Tensor]:
    """``loss_no_target = loss_weight * mean_b BCE(score_b, y_b)`` with
    ``BCE(x, y) = -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]``, and
    ``acc_no_target``, the share (x100) of samples whose decision
    ``score > 0`` (sigmoid > 0.5) matches y (logged, not trained)."""
    loss = F.binary_cross_entropy_with_logits(scores.float(), labels)
    with torch.no_grad():
        acc = ((scores > 0) == labels.bool()).float().mean() * 100.0
    return dict(loss_no_target=loss * loss_weight, acc_no_target=acc)
