"""SERA-Fusion: fusion-level mixture of experts with noisy top-K routing."""
import copy
from typing import Dict, List, Optional, Sequence

import torch
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..moe.losses import (balance_loss, cv_squared, token_assignment_loss,
                          z_loss)
from ..moe.router import NoisyTopKRouter, RouterOutput
from ..structures import NeckOutput, TextFeatures

_ROUTING = ('sample', 'token')
_DEFAULT_LOSS_WEIGHTS = dict(z=1e-3, balance=1e-2, token=1e-2)


@MODELS.register_module()
class SERAFusion(BaseModule):
    """SERA-Fusion neck.

    Inputs: L backbone levels ``F_i`` (``B x C_i x h x w``, one grid) and
    the sentence embedding ``s = text.pooled`` (``B x Ct``). With d =
    ``channels``::

        P_i = ReLU(BN(Conv1x1_{C_i->d}(F_i)))
        Q_i = P_i * g_i,   g_i = W_i s + b_i            (per-channel gate)
        X   = ReLU(BN(Conv_{L d->d}([Q_1, ..., Q_L])))   B x d x h x w

    The sentence gate ``g_i`` is what the CRIS/ETRIS/DETRIS neck's one-key
    cross-attention reduces to (softmax over a single key is 1), computed
    directly. Router input (expression-aware)::

        per sample: z = [LN(GAP(X)), LN(s)]              B x (d + Ct)
        per token:  z_n = [LN(X_n), LN(s)]                B x N x (d + Ct)

    A :class:`NoisyTopKRouter` gives weights ``w`` (top-K, softmax over the
    kept logits, zero elsewhere) and the output is

        per sample: Y_b = sum_{e in topK(b)} w_{b,e} E_e(X_b)
        per token:  Y_{b,n} = sum_{e in topK(b,n)} w_{b,n,e} E_e(X_b)_n

    Each expert runs only on the batch rows routed to it (per token: rows
    with at least one token routed to it); with ``top_k == num_experts``
    every expert runs on the whole batch without gathering.

    Auxiliary losses (always returned, in train and eval; the segmentor adds
    them to the objective only in ``loss()``), with ``r`` the clean logits,
    ``u_e = sum_m w_{m,e}`` the importance and m over routed units::

        loss_moe_z       = lambda_z   * mean(r^2)
        loss_moe_balance = lambda_bal * CV(u)^2  (+ CV(load)^2: balance_load)
        loss_moe_token   = lambda_tok * E * sum_e f_e P_e

    With ``top_k=1`` the kept weight is the constant 1, so the task loss and
    ``CV(u)^2`` give the router no gradient; it then learns only from the
    z and token losses (and ``CV(load)^2`` with ``balance_load=True``).

    Args:
        in_channels: C_i, one per backbone level.
        channels: d.
        text_dims: Ct, width of ``text.pooled``.
        num_experts: E; must match the expert list (default: 4 experts in
            the fixed order spatial, context, boundary, shape).  ``0``
            turns the MoE off: the neck returns the fused map X, with no
            router and no auxiliary losses (the ablation baseline).
        experts: optional list of expert config dicts (``type`` registered
            in MODELS, ``channels`` filled in with d) replacing the default.
        top_k: K (paper: 4 best, 1 worst).
        routing: ``'sample'`` (default) or ``'token'``.
        noise: noisy gating in training.
        noise_floor: added to the noise std.
        logit_fn: router logits, ``'dot'`` | ``'laplace'`` | ``'gaussian'``.
        gate_init: router init (see :class:`NoisyTopKRouter`).
        loss_weights: ``dict(z=..., balance=..., token=...)``; missing keys
            take the defaults ``z=1e-3, balance=1e-2, token=1e-2``.
        balance_load: also add ``CV(load)^2`` (Shazeer's smooth load) to the
            balance loss.
        context_heads: heads of the default context expert.
        fuse_kernel_size: kernel of the level-aggregation conv.
        norm_cfg, act_cfg: of the projection and aggregation convs.
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 in_channels: Sequence[int],
                 *,
                 channels: int = 256,
                 text_dims: int = 512,
                 num_experts: int = 4,
                 experts: Optional[Sequence[dict]] = None,
                 top_k: int = 4,
                 routing: str = 'sample',
                 noise: bool = True,
                 noise_floor: float = 0.0,
                 logit_fn: str = 'dot',
                 gate_init: str = 'normal',
                 loss_weights: Optional[Dict[str, float]] = None,
                 balance_load: bool = False,
                 context_heads: int = 8,
                 fuse_kernel_size: int = 1,
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='ReLU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        in_channels = list(in_channels)
        if not in_channels or any(int(c) < 1 for c in in_channels):
            raise ValueError('SERAFusion: in_channels must be a non-empty '
                             f'list of positive ints, got {in_channels}')
        if channels < 1 or text_dims < 1:
            raise ValueError('SERAFusion: channels and text_dims must be '
                             f'positive, got {channels}, {text_dims}')
        if routing not in _ROUTING:
            raise ValueError(f'SERAFusion: routing must be one of {_ROUTING}'
                             f', got {routing!r}')
        if fuse_kernel_size < 1 or fuse_kernel_size % 2 == 0:
            raise ValueError('SERAFusion: fuse_kernel_size must be a positive '
                             f'odd number, got {fuse_kernel_size}')
        weights = dict(_DEFAULT_LOSS_WEIGHTS)
        unknown = set(loss_weights or {}) - set(weights)
        if unknown:
            raise ValueError(f'SERAFusion: unknown loss_weights keys '
                             f'{sorted(unknown)}; expected {sorted(weights)}')
        weights.update(loss_weights or {})
        self.loss_weights = {k: float(v) for k, v in weights.items()}
        self.in_channels = in_channels
        self.channels = d = channels
        self.text_dims = text_dims
        self.routing = routing
        self.balance_load = balance_load

        if experts is None and num_experts == 0:
            experts = []  # fusion only: the ablation baseline without MoE
        if experts is None:
            if num_experts != 4:
                raise ValueError(
                    'SERAFusion: the default expert set has 4 experts '
                    f'(spatial, context, boundary, shape); num_experts='
                    f'{num_experts} needs an explicit `experts` list')
            experts = [
                dict(type='SpatialExpert'),
                dict(type='ContextExpert', num_heads=context_heads),
                dict(type='BoundaryExpert'),
                dict(type='ShapeExpert'),
            ]
        if len(experts) != num_experts:
            raise ValueError(f'SERAFusion: num_experts={num_experts} but '
                             f'{len(experts)} expert configs were given')
        if num_experts and not 1 <= top_k <= num_experts:
            raise ValueError(f'SERAFusion: top_k must be in [1, num_experts='
                             f'{num_experts}], got {top_k}')
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts = nn.ModuleList(self._build_expert(c) for c in experts)
        self.expert_names: List[str] = [
            type(e).__name__ for e in self.experts
        ]

        self.lateral_convs = nn.ModuleList(
            ConvModule(c, d, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
            for c in in_channels)
        self.text_gates = nn.ModuleList(
            nn.Linear(text_dims, d) for _ in in_channels)
        self.aggregate = ConvModule(
            len(in_channels) * d,
            d,
            fuse_kernel_size,
            padding=fuse_kernel_size // 2,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg)

        if not num_experts:
            return
        self.router_norm_visual = nn.LayerNorm(d)
        self.router_norm_text = nn.LayerNorm(text_dims)
        self.router = NoisyTopKRouter(
            d + text_dims,
            num_experts,
            top_k,
            noise=noise,
            noise_floor=noise_floor,
            logit_fn=logit_fn,
            gate_init=gate_init)

    def _build_expert(self, cfg: dict) -> nn.Module:
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise ValueError('SERAFusion: each expert must be a config dict '
                             f'with a `type`, got {cfg!r}')
        cfg = copy.deepcopy(dict(cfg))
        if cfg.setdefault('channels', self.channels) != self.channels:
            raise ValueError(f'SERAFusion: expert {cfg["type"]} has channels='
                             f'{cfg["channels"]}, the neck needs '
                             f'{self.channels}')
        return MODELS.build(cfg)

    # ------------------------------------------------------------------ steps
    def _check_inputs(self, feats: Sequence[Tensor],
                      text: Optional[TextFeatures]) -> None:
        if len(feats) != len(self.in_channels):
            raise ValueError(f'SERAFusion expects {len(self.in_channels)} '
                             f'levels, got {len(feats)}')
        ref = feats[0]
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if (f.dim() != 4 or f.shape[1] != c or f.shape[0] != ref.shape[0]
                    or f.shape[-2:] != ref.shape[-2:]):
                raise ValueError(
                    f'SERAFusion: level {i} must be B x {c} x h x w with the '
                    f'batch and grid of level 0 {tuple(ref.shape)}, got '
                    f'{tuple(f.shape)}')
        if text is None:
            raise ValueError('SERAFusion needs text features (got text=None)')
        if tuple(text.pooled.shape) != (ref.shape[0], self.text_dims):
            raise ValueError(f'SERAFusion: text.pooled must be '
                             f'{ref.shape[0]} x {self.text_dims}, got '
                             f'{tuple(text.pooled.shape)}')

    def fuse(self, feats: Sequence[Tensor], text: TextFeatures) -> Tensor:
        """Levels + sentence -> X, ``B x d x h x w`` (before the experts)."""
        gated = []
        for f, conv, gate in zip(feats, self.lateral_convs, self.text_gates):
            p = conv(f)
            g = gate(text.pooled).to(p.dtype)
            gated.append(p * g[:, :, None, None])
        return self.aggregate(torch.cat(gated, dim=1))

    def router_input(self, x: Tensor, text: TextFeatures) -> Tensor:
        """``B x (d + Ct)`` (per sample) or ``B x N x (d + Ct)`` (per
        token)."""
        s = self.router_norm_text(text.pooled)
        if self.routing == 'sample':
            v = self.router_norm_visual(x.mean(dim=(2, 3)))
            return torch.cat([v, s.to(v.dtype)], dim=-1)
        v = self.router_norm_visual(x.flatten(2).transpose(1, 2))
        s = s.to(v.dtype)[:, None, :].expand(-1, v.shape[1], -1)
        return torch.cat([v, s], dim=-1)

    def mix(self, x: Tensor, route: RouterOutput) -> Tensor:
        """Weighted sum of the routed experts' outputs, ``B x d x h x w``.

        ``route.weights`` is ``B x E`` (per sample) or ``B x N x E`` (per
        token, N = h * w row-major).
        """
        B, _, H, W = x.shape
        if self.routing == 'sample':
            w_map = route.weights[:, :, None, None, None]  # B x E x 1 x 1 x 1
            routed = route.indices  # B x K
        else:
            w_map = route.weights.transpose(1, 2).reshape(
                B, self.num_experts, 1, H, W)  # B x E x 1 x h x w
            routed = route.indices.flatten(1)  # B x (N K)
        out = x.new_zeros(x.shape)
        for e, expert in enumerate(self.experts):
            if self.top_k == self.num_experts:
                y = expert(x)
                out = out + (y * w_map[:, e].to(y.dtype)).to(out.dtype)
                continue
            rows = (routed == e).any(dim=-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue  # not computed at all
            y = expert(x.index_select(0, rows))
            w = w_map.index_select(0, rows)[:, e].to(y.dtype)
            out = out.index_add(0, rows, (y * w).to(out.dtype))
        return out

    def aux_losses(self, route: RouterOutput) -> Dict[str, Tensor]:
        """The three weighted auxiliary losses of a router output."""
        bal = balance_loss(route.weights)
        if self.balance_load:
            bal = bal + cv_squared(route.load)
        return {
            'loss_moe_z': self.loss_weights['z'] * z_loss(route.logits),
            'loss_moe_balance': self.loss_weights['balance'] * bal,
            'loss_moe_token': self.loss_weights['token'] *
            token_assignment_loss(route.probs, route.indices),
        }

    def forward(self, feats: Sequence[Tensor],
                text: TextFeatures) -> NeckOutput:
        """Fuse and refine.

        Args:
            feats: L maps ``B x C_i x h x w`` (one grid, e.g. ViT levels).
            text: sentence features (``text.pooled`` ``B x Ct`` is used).

        Returns:
            NeckOutput: ``feats=(Y,)`` with Y ``B x d x h x w``;
            ``aux_losses`` with ``loss_moe_z``, ``loss_moe_balance``,
            ``loss_moe_token``; ``routing`` with ``weights`` (``B x E`` or
            ``B x N x E``), ``indices`` (``B x K`` or ``B x N x K``) and
            clean ``logits`` (like ``weights``).
        """
        self._check_inputs(feats, text)
        x = self.fuse(feats, text)
        if not self.num_experts:
            return NeckOutput(feats=(x, ))
        route = self.router(self.router_input(x, text))
        y = self.mix(x, route)
        return NeckOutput(
            feats=(y, ),
            aux_losses=self.aux_losses(route),
            routing={
                'weights': route.weights,
                'indices': route.indices,
                'logits': route.logits
            })

    def extra_repr(self) -> str:
        return (f'in_channels={self.in_channels}, channels={self.channels}, '
                f'experts={self.expert_names}, top_k={self.top_k}, '
                f'routing={self.routing!r}, loss_weights={self.loss_weights}')
