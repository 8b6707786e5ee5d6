"""Routers of mixture-of-experts layers for dense feature maps.

A router maps each *routed unit* (a pooled sample vector, or a single token)
``z`` of width D to a dense weight vector over E experts. Inputs may carry any
number of leading dimensions: ``... x D`` gives ``... x E`` weights; the
examples below write ``M x D`` with M the number of routed units.

Two routers are provided:

* :class:`NoisyTopKRouter` - sparse gating of Shazeer et al. (2017),
  "Outrageously large neural networks": clean logits ``r``, in training
  ``h = r + eps * (softplus(W_noise z) + noise_floor)`` with ``eps ~ N(0, 1)``,
  top-K of ``h``, softmax over the K kept values, zeros elsewhere.
* :class:`SoftRouter` - dense softmax gating over all E experts (K = E).

Both return a :class:`RouterOutput` (named outputs, as in ST-MoE / Switch
reference code); auxiliary losses are computed from it by the pure functions
of :mod:`mmseg_sera.models.moe.losses`, never stored in the module.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

_LOGIT_FNS = ('dot', 'laplace', 'gaussian')
_GATE_INITS = ('normal', 'zeros', 'default')


@dataclass
class RouterOutput:
    """Named outputs of a router (``...`` = the leading dims of the input).

    Attributes:
        weights: ``... x E`` float32 gate weights, exactly zero outside the
            top-K, each row sums to 1.
        indices: ``... x K`` int64 indices of the kept experts, sorted by
            decreasing weight (``indices[..., 0]`` is the top-1 expert).
        logits: ``... x E`` clean logits ``r`` (no noise), float32; the
            z-loss reads these.
        probs: ``... x E`` float32 softmax over all E of the logits the
            top-K was taken on (noisy in training); the token-assignment loss
            reads these.
        noisy_logits: ``... x E`` float32 logits ``h`` the top-K was taken on
            (equal to ``logits`` in eval mode or without noise).
        load: ``E`` float32 expected number of units per expert. With noise
            in training and ``K < E`` it is Shazeer's smooth estimator
            ``sum_m P(h_{m,e} in top-K | new noise)`` (differentiable w.r.t.
            the gate and noise weights), otherwise the hard count of units
            whose top-K holds ``e``.
    """
    weights: Tensor
    indices: Tensor
    logits: Tensor
    probs: Tensor
    noisy_logits: Tensor
    load: Tensor

    @property
    def num_experts(self) -> int:
        return self.weights.shape[-1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    @property
    def importance(self) -> Tensor:
        """``E`` summed gate weight per expert, ``u_e = sum_m weights[m, e]``
        (the quantity whose squared coefficient of variation is the balance
        loss)."""
        return self.weights.reshape(-1, self.num_experts).sum(0)


def _check_input(z: Tensor, in_dims: int, name: str) -> None:
    if z.dim() < 1 or z.shape[-1] != in_dims:
        raise ValueError(f'{name} expects inputs of shape ... x {in_dims}, '
                         f'got {tuple(z.shape)}')


@MODELS.register_module()
class NoisyTopKRouter(BaseModule):
    """Noisy top-K gating (Shazeer et al. 2017).

    Formulas, for a routed unit ``z`` (width D) and E experts:

    * clean logits ``r`` (``logit_fn``):

      - ``'dot'``: ``r = W_g z (+ b)``
      - ``'laplace'``: ``r_e = -||z - w_e||_2`` (prototype distance, as the
        SpectralMoE release)
      - ``'gaussian'``: ``r_e = -||z - w_e||_2^2``

      with ``W_g = [w_1; ...; w_E]`` (E x D).
    * training with ``noise=True``:
      ``h = r + eps * (softplus(W_noise z) + noise_floor)``, ``eps ~ N(0, 1)``;
      otherwise (eval mode, or ``noise=False``) ``h = r`` (deterministic).
    * ``weights = scatter(softmax(topK(h)))``: softmax over the K kept
      values, zero elsewhere; ``probs = softmax(h)`` over all E.

    Softmaxes are computed in float32 (also under autocast), and the
    max-subtraction of softmax keeps logits of +-1e4 finite.

    Args:
        in_dims: width D of a routed unit.
        num_experts: E.
        top_k: K, ``1 <= K <= E``.
        noise: add the learned Gaussian noise in training.
        noise_floor: constant added to the noise std (SpectralMoE: 0.01).
        logit_fn: ``'dot'`` | ``'laplace'`` | ``'gaussian'``.
        gate_init: ``'normal'`` (N(0, gate_std), bias 0) | ``'zeros'``
            (all logits equal at start; ties break to the lowest index in
            eval) | ``'default'`` (PyTorch's Linear init). The noise
            projection always starts at zero, so the initial noise std is
            ``softplus(0) + noise_floor = 0.693 + noise_floor``.
        gate_std: std of the ``'normal'`` init.
        bias: learnable bias on the ``'dot'`` logits.
        init_cfg: mmengine init config. :meth:`init_weights` re-applies the
            gate init above after it, so a parent's init_cfg cannot change
            the routing initialisation.
    """

    def __init__(self,
                 in_dims: int,
                 num_experts: int,
                 top_k: int = 1,
                 *,
                 noise: bool = True,
                 noise_floor: float = 0.0,
                 logit_fn: str = 'dot',
                 gate_init: str = 'normal',
                 gate_std: float = 0.02,
                 bias: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if in_dims < 1 or num_experts < 1:
            raise ValueError('NoisyTopKRouter: in_dims and num_experts must '
                             f'be positive, got {in_dims}, {num_experts}')
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'NoisyTopKRouter: top_k must be in [1, '
                             f'num_experts={num_experts}], got {top_k}')
        if logit_fn not in _LOGIT_FNS:
            raise ValueError(f'NoisyTopKRouter: logit_fn must be one of '
                             f'{_LOGIT_FNS}, got {logit_fn!r}')
        if gate_init not in _GATE_INITS:
            raise ValueError(f'NoisyTopKRouter: gate_init must be one of '
                             f'{_GATE_INITS}, got {gate_init!r}')
        if noise_floor < 0:
            raise ValueError('NoisyTopKRouter: noise_floor must be >= 0, got '
                             f'{noise_floor}')
        self.in_dims = in_dims
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise = noise
        self.noise_floor = float(noise_floor)
        self.logit_fn = logit_fn
        self.gate_init = gate_init
        self.gate_std = gate_std
        self.gate = nn.Linear(in_dims, num_experts,
                              bias=bias and logit_fn == 'dot')
        self.noise_proj = nn.Linear(in_dims, num_experts, bias=False)
        self._reset_router()

    def _reset_router(self) -> None:
        if self.gate_init == 'normal':
            nn.init.normal_(self.gate.weight, std=self.gate_std)
        elif self.gate_init == 'zeros':
            nn.init.zeros_(self.gate.weight)
        else:
            self.gate.reset_parameters()
        if self.gate.bias is not None and self.gate_init != 'default':
            nn.init.zeros_(self.gate.bias)
        nn.init.zeros_(self.noise_proj.weight)

    def init_weights(self) -> None:
        super().init_weights()
        self._reset_router()

    def clean_logits(self, z: Tensor) -> Tensor:
        """``... x D`` -> ``... x E`` float32 clean logits ``r``."""
        if self.logit_fn == 'dot':
            return self.gate(z).float()
        zf = z.float()
        w = self.gate.weight.float()
        # ||z - w||^2 = ||z||^2 - 2 z.w + ||w||^2, clamped against round-off;
        # avoids materialising a ... x E x D difference tensor.
        with torch.autocast(device_type=zf.device.type, enabled=False):
            d2 = (zf.pow(2).sum(-1, keepdim=True) - 2 * zf @ w.t() +
                  w.pow(2).sum(-1)).clamp_min(0)
        if self.logit_fn == 'gaussian':
            return -d2
        return -torch.sqrt(d2 + 1e-12)

    def forward(self, z: Tensor) -> RouterOutput:
        """Route ``z`` (``... x D``); see the class docstring for formulas."""
        _check_input(z, self.in_dims, type(self).__name__)
        r = self.clean_logits(z)
        noisy = self.noise and self.training
        if noisy:
            std = F.softplus(self.noise_proj(z).float()) + self.noise_floor
            h = r + torch.randn_like(r) * std
        else:
            std = None
            h = r
        kept, indices = torch.topk(h, self.top_k, dim=-1, sorted=True)
        gates = torch.softmax(kept, dim=-1)
        weights = torch.zeros_like(h).scatter(-1, indices, gates)
        probs = torch.softmax(h, dim=-1)
        if noisy and self.top_k < self.num_experts:
            load = self._smooth_load(r, h, std)
        else:
            load = torch.zeros_like(h).scatter(-1, indices, 1.0)
            load = load.reshape(-1, self.num_experts).sum(0)
        return RouterOutput(
            weights=weights,
            indices=indices,
            logits=r,
            probs=probs,
            noisy_logits=h,
            load=load)

    def _smooth_load(self, r: Tensor, h: Tensor, std: Tensor) -> Tensor:
        """Shazeer's differentiable load estimate (``E``).

        ``P(e in top-K) = Phi((r_e - t_e) / std_e)``, where ``t_e`` is the
        K-th largest noisy logit among the *other* experts: the (K+1)-th
        largest of ``h`` if ``e`` is currently in the top-K, the K-th
        otherwise.
        """
        E = self.num_experts
        r2, h2, s2 = (t.reshape(-1, E) for t in (r, h, std))
        s2 = s2.clamp_min(1e-9)  # softplus underflows to 0 for huge inputs
        top = torch.topk(h2, self.top_k + 1, dim=-1).values
        thr_in = top[:, self.top_k:self.top_k + 1]
        thr_out = top[:, self.top_k - 1:self.top_k]
        is_in = h2 > thr_in
        # the standard normal CDF; torch.special.ndtr reads no value on the
        # host (a validated torch.distributions.Normal would, per call)
        p_in = torch.special.ndtr((r2 - thr_in) / s2)
        p_out = torch.special.ndtr((r2 - thr_out) / s2)
        return torch.where(is_in, p_in, p_out).sum(0)

    def extra_repr(self) -> str:
        return (f'in_dims={self.in_dims}, num_experts={self.num_experts}, '
                f'top_k={self.top_k}, noise={self.noise}, '
                f'noise_floor={self.noise_floor}, logit_fn={self.logit_fn!r}')


@MODELS.register_module()
class SoftRouter(BaseModule):
    """Dense soft gating: ``weights = softmax(W z + b)`` over all E experts.

    Every expert is kept (K = E); ``indices`` lists all experts sorted by
    decreasing weight. ``probs == weights``, ``noisy_logits == logits`` and
    ``load`` is the number of routed units for every expert.
    Used by the SERA-Adapter, where soft routing keeps the frozen backbone
    stable.

    Args:
        in_dims: width D of a routed unit.
        num_experts: E.
        bias: learnable bias.
        temperature: logits are divided by it before the softmax.
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 in_dims: int,
                 num_experts: int,
                 *,
                 bias: bool = True,
                 temperature: float = 1.0,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if in_dims < 1 or num_experts < 1:
            raise ValueError('SoftRouter: in_dims and num_experts must be '
                             f'positive, got {in_dims}, {num_experts}')
        if not temperature > 0 or math.isinf(temperature):
            raise ValueError('SoftRouter: temperature must be a positive '
                             f'finite number, got {temperature}')
        self.in_dims = in_dims
        self.num_experts = num_experts
        self.top_k = num_experts
        self.temperature = float(temperature)
        self.gate = nn.Linear(in_dims, num_experts, bias=bias)

    def forward(self, z: Tensor) -> RouterOutput:
        """Route ``z`` (``... x D``) to ``... x E`` soft weights."""
        _check_input(z, self.in_dims, type(self).__name__)
        r = self.gate(z).float()
        weights = torch.softmax(r / self.temperature, dim=-1)
        indices = torch.argsort(weights, dim=-1, descending=True)
        return RouterOutput(
            weights=weights,
            indices=indices,
            logits=r,
            probs=weights,
            noisy_logits=r,
            load=torch.full((self.num_experts, ),
                            float(weights.numel() // self.num_experts),
                            device=weights.device))

    def extra_repr(self) -> str:
        return (f'in_dims={self.in_dims}, num_experts={self.num_experts}, '
                f'temperature={self.temperature}')
