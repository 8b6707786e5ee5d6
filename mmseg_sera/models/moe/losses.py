"""Auxiliary losses of mixture-of-experts routers (pure functions).

Each function takes router outputs (see
:class:`~mmseg_sera.models.moe.router.RouterOutput`) and returns a float32
scalar; the caller multiplies by the coefficient from the config. Inputs with
several leading dimensions (e.g. ``B x N x E`` per-token routing) are
flattened to ``M x E`` routed units.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['z_loss', 'cv_squared', 'balance_loss', 'token_assignment_loss']


def _as_units(x: Tensor, name: str) -> Tensor:
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f'{name} expects a non-empty ... x E tensor, got '
                         f'shape {tuple(x.shape)}')
    return x.reshape(-1, x.shape[-1]).float()


def z_loss(logits: Tensor) -> Tensor:
    """Mean squared router logit (SERA's "z-loss").

    ``L_z = 1 / (M E) * sum_{m,e} r_{m,e}^2 = mean(r^2)``

    with ``r`` the clean ``M x E`` logits (``... x E`` is flattened). This is
    the formula of the SERA paper (``1/(BE) ||r||_2^2``). It differs from the
    ST-MoE router z-loss (Zoph et al. 2022), which squares the log-partition
    function, ``mean_m (logsumexp_e r_{m,e})^2``: both keep the logits small,
    but ours also pulls logits of unselected experts towards zero.
    """
    r = _as_units(logits, 'z_loss')
    return r.pow(2).mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation (Shazeer et al. 2017).

    ``CV(x)^2 = var(x) / (mean(x)^2 + eps)``, with the *population* variance
    ``var(x) = 1/E sum_e (x_e - mean(x))^2`` over the E entries of ``x``
    (``E``, e.g. per-expert importance or load). Shazeer's reference code
    uses the sample variance (divide by E - 1), which is ``E/(E-1)`` times
    ours; the population form is the textbook CV and is 0 for a single
    expert instead of undefined. Returns 0 when ``E == 1``.
    """
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError('cv_squared expects a non-empty 1-D tensor (one '
                         f'value per expert), got shape {tuple(x.shape)}')
    x = x.float()
    if x.numel() == 1:
        return x.sum() * 0.0
    mean = x.mean()
    var = (x - mean).pow(2).mean()
    return var / (mean.pow(2) + eps)


def balance_loss(weights: Tensor, eps: float = 1e-10) -> Tensor:
    """Load-balancing loss on expert importance.

    ``L_balance = CV(u)^2`` with ``u_e = sum_m weights[m, e]`` (the summed
    gate weight of expert e over all routed units; ``... x E`` flattened).
    """
    w = _as_units(weights, 'balance_loss')
    return cv_squared(w.sum(0), eps=eps)


def token_assignment_loss(probs: Tensor, indices: Tensor) -> Tensor:
    """Switch-Transformer style assignment loss (Fedus et al. 2021).

    ``L_token = E * sum_e f_e * P_e``, where over the M routed units

    * ``f_e = 1/M * #{m : indices[m, 0] == e}``: share of units whose top-1
      expert is e (not differentiable);
    * ``P_e = 1/M * sum_m probs[m, e]``: mean router probability of e (the
      softmax over all E experts of the logits the top-K was taken on).

    It equals 1 under uniform routing and grows to E when all units pick
    the same expert with certainty. SERA names a "token assignment
    regulariser" without a formula; this is our documented choice.

    Args:
        probs: ``... x E`` router probabilities.
        indices: ``... x K`` expert indices sorted by decreasing weight
            (``indices[..., 0]`` is the top-1 expert).
    """
    p = _as_units(probs, 'token_assignment_loss')
    if indices.shape[:-1] != probs.shape[:-1] or indices.shape[-1] < 1:
        raise ValueError('token_assignment_loss: indices must be ... x K with '
                         f'the leading dims of probs {tuple(probs.shape)}, '
                         f'got {tuple(indices.shape)}')
    num_experts = p.shape[-1]
    top1 = indices.reshape(-1, indices.shape[-1])[:, 0]
    # checked on the device (a RuntimeError; on a GPU when it is reached)
    # rather than by reading the indices on the host in every step
    torch._assert_async(((top1 >= 0) & (top1 < num_experts)).all(),
                        'token_assignment_loss: expert indices must be in '
                        f'[0, {num_experts})')
    f = F.one_hot(top1, num_experts).float().mean(0)
    P = p.mean(0)
    return num_experts * torch.sum(f * P)
