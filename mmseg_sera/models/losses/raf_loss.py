"""SegVLM's referring-aware fusion (RAF) loss (PEERS.md 4.4), pure torch.

Binary case: logits z (B x H x W), target y in [0, 1] (hard {0, 1} or soft
edges), valid mask v (target != ignore_index), p = sigmoid(z). Each term
below is a pure function of (z, y, v); :class:`RAFLoss` weights and names
them::

    L_bce   = mean_v BCE(z, y)
    L_focal = mean_v [-a y (1-p)^g log p - (1-a)(1-y) p^g log(1-p)]
    L_dice  = generalised / plain / log-cosh Dice, per sample, averaged
    L_bd    = mean_v [(1 + beta band(y)) BCE(z, y)] - L_bce
    RAF     = l_bce L_bce + l_focal L_focal + l_dice L_dice + l_bd L_bd

``mean_v`` is the mean over the valid pixels of the whole batch. Ignored
pixels take no part in any term: their logits and targets are replaced by
constants before anything is computed, so any value there (even inf or
nan) changes neither the loss nor, through them, the gradient.

SegVLM's text names the three first terms ("BCE + Focal + Adaptive Dice",
third-party summary); the formulas, "adaptive" = generalised Dice
(Sudre et al. 2017), the focal constants (Lin et al. 2017) and the
boundary term are our interpretation.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmseg.registry import MODELS
from torch import Tensor

__all__ = [
    'RAFLoss', 'valid_inputs', 'bce_term', 'focal_term', 'dice_term',
    'boundary_band', 'boundary_term', 'DICE_MODES'
]

DICE_MODES = ('generalised', 'plain', 'log_cosh')


def valid_inputs(logits: Tensor, target: Tensor,
                 ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(z, y, v), all B x H x W float32: logits and target set to 0 where
    ``target == ignore_index``, and the valid mask v (1 valid, 0 ignored).

    logits: B x 1 x H x W or B x H x W; target: B x H x W or B x 1 x H x W
    (labels {0, 1, ignore_index} or soft values in [0, 1]).
    """
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError('RAF loss takes 1-channel logits, got shape '
                             f'{tuple(logits.shape)}')
        logits = logits[:, 0]
    if target.dim() == 4:
        target = target[:, 0]
    if logits.shape != target.shape:
        raise ValueError(f'logits {tuple(logits.shape)} and target '
                         f'{tuple(target.shape)} differ in size')
    valid = target != ignore_index
    zero = logits.new_zeros((), dtype=torch.float32)
    z = torch.where(valid, logits.float(), zero)
    y = torch.where(valid, target.float(), zero)
    return z, y, valid.float()


def _mean_valid(values: Tensor, v: Tensor) -> Tensor:
    """sum(values * v) / max(sum v, 1)."""
    return (values * v).sum() / v.sum().clamp(min=1.0)


def bce_term(z: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """``mean_v [-(y log p + (1 - y) log(1 - p))]``."""
    return _mean_valid(
        F.binary_cross_entropy_with_logits(z, y, reduction='none'), v)


def focal_term(z: Tensor, y: Tensor, v: Tensor, *, alpha: float = 0.25,
               gamma: float = 2.0) -> Tensor:
    """``mean_v [-a y (1-p)^g log p - (1-a)(1-y) p^g log(1-p)]``
    (Lin et al. 2017, alpha on the positives); ``log p = logsigmoid(z)``,
    ``log(1 - p) = logsigmoid(-z)`` for stability."""
    p = torch.sigmoid(z)
    pos = -alpha * y * (1 - p).pow(gamma) * F.logsigmoid(z)
    neg = -(1 - alpha) * (1 - y) * p.pow(gamma) * F.logsigmoid(-z)
    return _mean_valid(pos + neg, v)


def _generalised_weights(sums: Tensor) -> Tensor:
    """B x 2 class sums S_c -> B x 2 weights proportional to 1 / S_c^2,
    normalised to sum 1 per sample. An absent class (S_c = 0, infinite
    weight) takes the other class's weight: a sample without foreground
    then scores ``L = mean_v p`` (the MONAI rule). A sample without valid
    pixels gets weights 0."""
    w = 1.0 / sums.square()
    finite = torch.isfinite(w)
    w = torch.where(finite, w, w.new_zeros(()))
    w = torch.where(finite, w, w.amax(dim=1, keepdim=True))
    return w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)


def dice_term(z: Tensor, y: Tensor, v: Tensor, *, mode: str = 'generalised',
              eps: float = 1e-6) -> Tensor:
    """Dice loss per sample b (sums over its valid pixels), then the mean
    over the samples that have valid pixels.

    ``generalised`` (Sudre et al. 2017), classes c in {fg, bg} with
    p_fg = p, p_bg = 1 - p, y_fg = y, y_bg = 1 - y::

        w_c = 1 / (sum y_c)^2            (normalised: w_fg + w_bg = 1)
        L_b = 1 - (2 sum_c w_c sum p_c y_c + eps)
                  / (sum_c w_c sum (p_c + y_c) + eps)

    The normalisation leaves the ratio unchanged (up to eps) and keeps eps
    small against the sums. ``plain``: foreground only,
    ``L_b = 1 - (2 sum p y + eps) / (sum p + sum y + eps)``.
    ``log_cosh``: ``log(cosh(plain))`` (Jadon 2020).
    """
    if mode not in DICE_MODES:
        raise ValueError(f'dice mode must be one of {DICE_MODES}, got '
                         f'{mode!r}')
    prob = torch.sigmoid(z)
    p = prob * v
    dims = tuple(range(1, z.dim()))
    has_pixels = (v.sum(dim=dims) > 0).float()  # B
    if mode == 'generalised':
        q, t = (1 - prob) * v, (1 - y) * v  # background, valid pixels
        inter = torch.stack([(p * y).sum(dims), (q * t).sum(dims)], 1)
        union = torch.stack([(p + y).sum(dims), (q + t).sum(dims)], 1)
        sums = torch.stack([y.sum(dims), t.sum(dims)], 1)
        w = _generalised_weights(sums)
        loss = 1 - (2 * (w * inter).sum(1) + eps) / (
            (w * union).sum(1) + eps)
    else:
        loss = 1 - (2 * (p * y).sum(dims) + eps) / (
            p.sum(dims) + y.sum(dims) + eps)
        if mode == 'log_cosh':
            loss = torch.log(torch.cosh(loss))
    return (loss * has_pixels).sum() / has_pixels.sum().clamp(min=1.0)


def boundary_band(y: Tensor, v: Tensor, kernel_size: int = 5) -> Tensor:
    """Morphological gradient of the target, B x H x W in [0, 1]:
    ``maxpool_k(y) - minpool_k(y)`` (k x k dilation minus erosion).
    Ignored pixels count as background for the dilation and as foreground
    for the erosion, so an ignore region never draws a band; outside the
    map nothing is seen (max-pool's padding is -inf)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError('boundary kernel_size must be a positive odd int,'
                         f' got {kernel_size}')
    pad = kernel_size // 2
    fg_only = (y * v)[:, None]
    fg_or_ignored = (y * v + (1 - v))[:, None]
    dilated = F.max_pool2d(fg_only, kernel_size, stride=1, padding=pad)
    eroded = -F.max_pool2d(-fg_or_ignored, kernel_size, stride=1,
                           padding=pad)
    return (dilated - eroded).clamp(min=0.0)[:, 0]


def boundary_term(z: Tensor, y: Tensor, v: Tensor, *, beta: float = 4.0,
                  kernel_size: int = 5) -> Tensor:
    """``mean_v [(1 + beta band(y)) BCE(z, y)] - L_bce
    = beta mean_v [band(y) BCE(z, y)]``: extra BCE weight on a band of
    width ~k around the target's edges."""
    bce = F.binary_cross_entropy_with_logits(z, y, reduction='none')
    band = boundary_band(y, v, kernel_size)
    return beta * _mean_valid(band * bce, v)


@MODELS.register_module()
class RAFLoss(nn.Module):
    """Referring-aware fusion loss (PEERS.md 4.4) for 1-channel logits.

    ``forward(seg_logits, target, weight=None, ignore_index=255)`` returns
    the weighted terms as a dict, ``{<loss_name>_bce, <loss_name>_focal,
    <loss_name>_dice[, <loss_name>_boundary]}``: each is logged and
    mmengine sums every ``loss_*`` key. A term whose weight is 0 is
    neither computed nor returned (the boundary term by default). See the
    module docstring for the formulas.

    Args:
        lambda_bce / lambda_focal / lambda_dice / lambda_boundary: term
            weights (1, 1, 1, 0); ``loss_weight`` multiplies all of them.
        alpha / gamma: focal constants (0.25, 2).
        dice_mode: ``'generalised'`` (default), ``'plain'``, ``'log_cosh'``.
        dice_eps: eps of the Dice ratio.
        boundary_beta / boundary_kernel: beta (4) and k (5) of the band.
        loss_name: key prefix; must start with ``loss_``.

    ``target`` holds {0, 1, ignore_index} or soft values in [0, 1] with
    ``ignore_index`` at ignored pixels (``accepts_soft_targets``: the
    referring heads then pass ``gt_soft_mask``).
    """

    #: the referring heads pass soft targets (gt_soft_mask) to this loss
    accepts_soft_targets = True

    def __init__(self,
                 *,
                 lambda_bce: float = 1.0,
                 lambda_focal: float = 1.0,
                 lambda_dice: float = 1.0,
                 lambda_boundary: float = 0.0,
                 alpha: float = 0.25,
                 gamma: float = 2.0,
                 dice_mode: str = 'generalised',
                 dice_eps: float = 1e-6,
                 boundary_beta: float = 4.0,
                 boundary_kernel: int = 5,
                 loss_weight: float = 1.0,
                 loss_name: str = 'loss_raf') -> None:
        super().__init__()
        if dice_mode not in DICE_MODES:
            raise ValueError(f'RAFLoss: dice_mode must be one of '
                             f'{DICE_MODES}, got {dice_mode!r}')
        if not loss_name.startswith('loss_'):
            raise ValueError(f'RAFLoss: loss_name must start with "loss_" '
                             f'(mmengine sums those keys), got {loss_name!r}')
        lambdas = dict(bce=lambda_bce, focal=lambda_focal, dice=lambda_dice,
                       boundary=lambda_boundary)
        if any(w < 0 for w in lambdas.values()) or not any(lambdas.values()):
            raise ValueError(f'RAFLoss: term weights must be >= 0 with at '
                             f'least one > 0, got {lambdas}')
        if boundary_kernel < 1 or boundary_kernel % 2 == 0:
            raise ValueError('RAFLoss: boundary_kernel must be a positive '
                             f'odd int, got {boundary_kernel}')
        self.lambdas = {k: float(w) for k, w in lambdas.items() if w > 0}
        self.alpha = alpha
        self.gamma = gamma
        self.dice_mode = dice_mode
        self.dice_eps = dice_eps
        self.boundary_beta = boundary_beta
        self.boundary_kernel = boundary_kernel
        self.loss_weight = loss_weight
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        """Prefix of the returned keys (mmseg's loss interface)."""
        return self._loss_name

    def terms(self, z: Tensor, y: Tensor, v: Tensor) -> Dict[str, Tensor]:
        """Unweighted terms of the non-zero weights, from
        :func:`valid_inputs`' (z, y, v)."""
        fns = dict(
            bce=lambda: bce_term(z, y, v),
            focal=lambda: focal_term(z, y, v, alpha=self.alpha,
                                     gamma=self.gamma),
            dice=lambda: dice_term(z, y, v, mode=self.dice_mode,
                                   eps=self.dice_eps),
            boundary=lambda: boundary_term(z, y, v, beta=self.boundary_beta,
                                           kernel_size=self.boundary_kernel))
        return {k: fns[k]() for k in self.lambdas}

    def forward(self, seg_logits: Tensor, target: Tensor,
                weight: Optional[Tensor] = None,
                ignore_index: int = 255) -> Dict[str, Tensor]:
        """seg_logits B x 1 x H x W, target B x H x W -> dict of scalars."""
        if weight is not None:
            raise ValueError('RAFLoss does not take per-pixel weights')
        z, y, v = valid_inputs(seg_logits, target, ignore_index)
        return {
            f'{self.loss_name}_{k}': self.loss_weight * self.lambdas[k] * t
            for k, t in self.terms(z, y, v).items()
        }
