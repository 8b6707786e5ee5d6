"""SpectralMoE adapter: routed low-rank token experts after a backbone block,
fed by a second modality (PEERS.md 5).

After block l, with f the block's patch tokens (B x N x D) and t the second
modality's tokens (B x N2 x D: another backbone's block-l tokens, or the
projected words of the sentence)::

    g_v = router_v(f),  g_t = router_t(t)          noisy top-K, per token
    delta_v = combine_e(delta_e(f), g_v)            LowRankTokenExpert,
    delta_t = combine_e(delta_e(t), g_t)            experts shared by both
    delta = fuse(delta_v, delta_t)
    out = f + s * (W_df (delta + f) + b_df)

``combine``:

* ``'gated_sum'``: ``sum_{e in topK} g_e delta_e`` (with K = 1 the gate is
  exactly 1, so the router's only gradient is the balance loss's);
* ``'released'``: Shazeer's ``SparseDispatcher.combine`` without gates, as
  released: ``log(sum_{e in topK} exp(delta_e))``, exact zeros of the sum
  replaced by float64 eps (2.2e-16) before the log; computed in float32.

``fusion``:

* ``'xattn'`` (the paper's wording): ``delta = delta_v + softmax(delta_v
  delta_t^T / sqrt(D), key padding) delta_t``;
* ``'diag'`` (the released code): ``A = softmax(delta_t delta_v^T /
  sqrt(D))`` (rows: second-modality positions), ``delta[n] = A[n, n]
  delta_v[n]``, a per-token scalar gate; needs N2 = N;
* ``'none'``: ``delta = delta_v`` (visual only, no second router).

Aux loss ``loss_moe_balance = loss_weight / num_layers * sum_routers
(cv^2(importance) + cv^2(load))``: the backbone sums its adapters' losses,
so with ``num_layers`` = the number of adapted blocks it is the mean over
layers, as released.

Shared parts (:class:`SpectralMoEShared`: ``W_tf``, ``W_df``, ``s`` and the
second modality's projection). The slots build one adapter per block from
one config, so each adapter starts with its own. :func:`tie_shared_parts`
makes every ``shared_out=True`` adapter under a module use the parts of the
first one, which alone keeps them in its state dict (``adapters.{i}.shared``
of the lowest block i); the others hold a reference that is not a
sub-module, so parameters, state dicts and optimiser groups list each shared
tensor once. A backbone's adapter slots tie them as soon as they are built
(:meth:`SpectralMoEAdapter.after_slots_built`); an adapter built by hand is
tied by calling :func:`tie_shared_parts` before loading a checkpoint.
"""
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..moe.losses import cv_squared
from ..moe.router import NoisyTopKRouter, RouterOutput
from ..moe.token_experts import LowRankTokenExpert
from ..structures import AdapterOutput, TextFeatures

__all__ = ['SpectralMoEShared', 'SpectralMoEAdapter', 'tie_shared_parts']

_FUSIONS = ('xattn', 'diag', 'none')
_COMBINES = ('gated_sum', 'released')
_SECOND_SOURCES = ('text', 'tokens')
_EXPERT_LOGITS = ('dot', 'sum')
_LOGIT_FNS = ('dot', 'laplace', 'gaussian')
#: what Shazeer's combine puts in place of an exact zero (numpy float eps)
COMBINE_EPS = float(torch.finfo(torch.float64).eps)


class SpectralMoEShared(BaseModule):
    """The parts SpectralMoE shares across all layers.

    Attributes:
        token_proj: ``W_tf``, Linear D -> D, maps expert tokens to feature
            adjustments (:class:`LowRankTokenExpert`).
        out_proj: ``W_df``, Linear D -> D, on ``delta + f``.
        scale: ``s``, a learnable scalar (``scale_init``, 1e-3).
        second_proj: Linear Cs -> D of the second modality's tokens, or None
            (they are already D wide).

    Both Linears keep PyTorch's init (kaiming-uniform weights with
    ``a = sqrt(5)``, uniform biases), which is the released init.
    """

    def __init__(self,
                 embed_dims: int,
                 *,
                 second_dims: Optional[int] = None,
                 scale_init: float = 1e-3,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.embed_dims = embed_dims
        self.second_dims = second_dims
        self.token_proj = nn.Linear(embed_dims, embed_dims)
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.second_proj = (None if second_dims is None else nn.Linear(
            second_dims, embed_dims))

    def forward(self, f: Tensor, delta: Tensor) -> Tensor:
        """``f + s * W_df(delta + f)`` (``B x N x D``)."""
        return f + self.scale.to(f.dtype) * self.out_proj(delta + f)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, '
                f'second_dims={self.second_dims}')


def _row_logsumexp(q: Tensor, k: Tensor, scale: float, chunk: int) -> Tensor:
    """``lse[b, n] = log sum_m exp(scale q[b, n] . k[b, m])``, ``B x N``.

    The row normaliser needs every score, so all ``N x N2`` are computed,
    but at most ``chunk`` rows at a time; with gradients each chunk is
    recomputed in the backward (activation checkpointing), so no ``B x N x
    N2`` tensor is kept either.
    """

    def piece(qc: Tensor, kk: Tensor) -> Tensor:
        return torch.logsumexp(scale * qc @ kk.transpose(1, 2), dim=-1)

    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    out = []
    for start in range(0, q.shape[1], chunk):
        qc = q[:, start:start + chunk]
        out.append(
            checkpoint(piece, qc, k, use_reentrant=False)
            if grad else piece(qc, k))
    return torch.cat(out, dim=1)


@MODELS.register_module()
class SpectralMoEAdapter(BaseModule):
    """SpectralMoE for one block (slot kind ``post_block``), see the module
    docstring for the formulas.

    The defaults are our RIS reading (the sentence as second modality,
    cross-attention fusion, gated sum, balance weight 1e-2, per-layer
    parts). ``released_compat=True`` changes every default marked
    "released" below to the released module's; an explicit argument still
    wins. The prefix tokens (CLS, registers) are the slot's business: the
    adapter only sees patch tokens.

    With the sentence as second modality, padded word positions are masked
    in the attention but still routed, so they count in the text router's
    balance statistics (masking them there would need the router's
    per-unit load, which :class:`NoisyTopKRouter` sums). Without text (or
    a ``'tokens'`` adapter without ``second``: an error) the visual stream
    runs alone and the second router gets no gradient.

    Args:
        embed_dims: D.
        num_experts: E (6).
        top_k: K (1).
        token_length: T (100).
        rank: r (16).
        fusion: ``'xattn'`` | ``'diag'`` (released) | ``'none'``.
        combine: ``'gated_sum'`` | ``'released'`` (released).
        second_source: where the second modality comes from: ``'text'``
            (``text.tokens`` through Linear ``text_dims`` -> D, padding
            masked in the attention) or ``'tokens'`` (released: the
            ``second`` argument, B x N2 x ``second_dims``). ``'diag'``
            needs ``'tokens'``.
        text_dims: Ct of ``text.tokens`` (``second_source='text'``).
        second_dims: width of ``second`` (``'tokens'``); a Linear
            ``second_dims`` -> D projects it. None: no projection, the
            tokens are D wide (the release: both backbones are as wide).
        logit_fn: router logits, ``'laplace'`` (released, ``-||x - w||``)
            | ``'gaussian'`` | ``'dot'``.
        noise: noisy gating in training.
        noise_floor: added to the noise std (released 0.01).
        gate_init: router init, ``'zeros'`` (released: every logit ties at
            start; in eval every token goes to expert 0) | ``'normal'`` |
            ``'default'``.
        expert_logits: ``'dot'`` | ``'sum'`` (released), see
            :class:`LowRankTokenExpert`.
        shared_out: whether :func:`tie_shared_parts` ties this adapter's
            :class:`SpectralMoEShared` with the other adapters' (released:
            True). In a backbone's slots they are tied when built; an
            adapter built alone has its own (and warns at forward).
        scale_init: start value of s.
        loss_weight: coefficient of the balance loss, 1e-2 (released 1e3,
            far above our other aux terms).
        unbiased_cv: cv^2 with the sample variance (released, Shazeer's
            code: ``E / (E - 1)`` times :func:`cv_squared`).
        num_layers: number of blocks that carry this adapter; each divides
            its balance loss by it so that the backbone's sum is the mean.
        diag_chunk: rows of scores computed at a time by ``'diag'``.
        released_compat: switch the defaults above to the released ones.
        init_cfg: mmengine init config.

    State dict: ``experts.tokens_a`` (E x T x r), ``experts.tokens_b``
    (E x r x D), ``router.{gate,noise_proj}.weight`` (E x D, visual),
    ``second_router.*`` (second modality; absent with ``fusion='none'``),
    ``shared.{token_proj,out_proj}.{weight,bias}``, ``shared.scale``,
    ``shared.second_proj.*`` (absent without a projection; all of
    ``shared.*`` only in the owner once tied).
    """

    slot_kind = 'post_block'

    @classmethod
    def after_slots_built(cls, slots: nn.Module) -> None:
        """Called by a tower's adapter slots once all its adapters are
        built: ties the ``shared_out=True`` adapters'
        (:func:`tie_shared_parts`)."""
        tie_shared_parts(slots)

    def __init__(self,
                 embed_dims: int,
                 *,
                 num_experts: int = 6,
                 top_k: int = 1,
                 token_length: int = 100,
                 rank: int = 16,
                 fusion: Optional[str] = None,
                 combine: Optional[str] = None,
                 second_source: Optional[str] = None,
                 text_dims: int = 512,
                 second_dims: Optional[int] = None,
                 logit_fn: str = 'laplace',
                 noise: bool = True,
                 noise_floor: float = 0.01,
                 gate_init: str = 'zeros',
                 expert_logits: Optional[str] = None,
                 shared_out: Optional[bool] = None,
                 scale_init: float = 1e-3,
                 loss_weight: Optional[float] = None,
                 unbiased_cv: Optional[bool] = None,
                 num_layers: int = 1,
                 diag_chunk: int = 256,
                 released_compat: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)

        def pick(value, released, ours):
            if value is not None:
                return value
            return released if released_compat else ours

        fusion = pick(fusion, 'diag', 'xattn')
        combine = pick(combine, 'released', 'gated_sum')
        second_source = pick(second_source, 'tokens', 'text')
        expert_logits = pick(expert_logits, 'sum', 'dot')
        for name, value, choices in (
                ('fusion', fusion, _FUSIONS),
                ('combine', combine, _COMBINES),
                ('second_source', second_source, _SECOND_SOURCES),
                ('expert_logits', expert_logits, _EXPERT_LOGITS),
                ('logit_fn', logit_fn, _LOGIT_FNS)):
            if value not in choices:
                raise ValueError(f'SpectralMoEAdapter: {name} must be one '
                                 f'of {choices}, got {value!r}')
        if fusion == 'diag' and second_source != 'tokens':
            raise ValueError(
                "SpectralMoEAdapter: fusion='diag' pairs token n of both "
                'streams, so it needs a same-grid second stream '
                "(second_source='tokens'); use 'xattn' with the sentence")
        for name, v in (('embed_dims', embed_dims), ('text_dims', text_dims),
                        ('second_dims', second_dims),
                        ('num_layers', num_layers),
                        ('diag_chunk', diag_chunk)):
            if v is not None and v < 1:
                raise ValueError(f'SpectralMoEAdapter: {name} must be '
                                 f'positive, got {v}')
        self.loss_weight = float(pick(loss_weight, 1e3, 1e-2))
        if self.loss_weight < 0:
            raise ValueError('SpectralMoEAdapter: loss_weight must be >= 0, '
                             f'got {self.loss_weight}')
        self.embed_dims = embed_dims
        self.fusion = fusion
        self.combine = combine
        self.second_source = second_source
        self.text_dims = text_dims
        self.second_dims = second_dims
        self.shared_out = bool(pick(shared_out, True, False))
        self.unbiased_cv = bool(pick(unbiased_cv, True, False))
        self.num_layers = num_layers
        self.diag_chunk = diag_chunk
        self.released_compat = released_compat

        self.experts = LowRankTokenExpert(
            embed_dims,
            num_experts=num_experts,
            token_length=token_length,
            rank=rank,
            released_compat=expert_logits == 'sum')
        router_cfg = dict(
            top_k=top_k,
            noise=noise,
            noise_floor=noise_floor,
            logit_fn=logit_fn,
            gate_init=gate_init)
        self.router = NoisyTopKRouter(embed_dims, num_experts, **router_cfg)
        self.second_router = (None if fusion == 'none' else NoisyTopKRouter(
            embed_dims, num_experts, **router_cfg))
        if fusion == 'none':
            proj_in = None
        elif second_source == 'text':
            proj_in = text_dims
        else:
            proj_in = second_dims
        self.shared = SpectralMoEShared(
            embed_dims, second_dims=proj_in, scale_init=scale_init)
        # a plain attribute, not a sub-module: after tie_shared_parts it
        # points to the owner's parts (see the module docstring)
        self._parts: Tuple[SpectralMoEShared] = (self.shared, )
        self._tied = False

    # ------------------------------------------------------------------
    # shared parts
    # ------------------------------------------------------------------
    @property
    def shared_parts(self) -> SpectralMoEShared:
        """The :class:`SpectralMoEShared` this adapter uses (its own, or
        the owner's once tied)."""
        return self._parts[0]

    @property
    def owns_shared(self) -> bool:
        """Whether the shared parts are in this adapter's state dict."""
        return 'shared' in self._modules

    @property
    def is_tied(self) -> bool:
        return self._tied

    def _link_shared(self, parts: SpectralMoEShared, own: bool) -> None:
        """Use ``parts``; keep them as the sub-module ``shared`` iff
        ``own``."""
        mine = self.shared_parts
        if parts is not mine:
            want = {k: v.shape for k, v in mine.state_dict().items()}
            got = {k: v.shape for k, v in parts.state_dict().items()}
            if want != got:
                raise ValueError(
                    'tie_shared_parts: SpectralMoEAdapters with different '
                    f'shared parts cannot share them: {want} vs {got}')
        if self.owns_shared:
            del self.shared
        if own:
            self.shared = parts
        self._parts = (parts, )
        self._tied = True

    # ------------------------------------------------------------------
    # parts of the forward
    # ------------------------------------------------------------------
    def expert_delta(self, x: Tensor, route: RouterOutput) -> Tensor:
        """Combined expert adjustment of units ``x`` (``... x D``) routed
        by ``route``; ``... x D`` (see ``combine``)."""
        proj = self.shared_parts.token_proj
        if self.combine == 'gated_sum':
            gates = route.weights.gather(-1, route.indices)
            return self.experts.mix(x, proj, route.indices,
                                    gates).to(x.dtype)
        summed = self.experts(x, proj, route.indices).float().exp().sum(-2)
        summed = summed.masked_fill(summed == 0, COMBINE_EPS)
        return summed.log().to(x.dtype)

    def diag_gate(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Diagonal ``A[n, n]`` of ``A = softmax(rows cols^T / sqrt(D))``
        (softmax over the columns), ``B x N`` float32, without the ``N x
        N`` matrix: ``exp(rows_n . cols_n / sqrt(D) - lse_n)`` with the row
        normaliser ``lse_n`` from :func:`_row_logsumexp`.

        Args:
            rows: ``B x N x D`` (the second modality's delta_t).
            cols: ``B x N x D`` (the visual delta_v).
        """
        scale = 1.0 / math.sqrt(self.embed_dims)
        r, c = rows.float(), cols.float()
        diag = (r * c).sum(-1) * scale
        return torch.exp(diag - _row_logsumexp(r, c, scale, self.diag_chunk))

    def fuse(self, delta_v: Tensor, delta_t: Tensor,
             mask: Optional[Tensor] = None) -> Tensor:
        """``delta`` from ``delta_v`` (``B x N x D``) and ``delta_t``
        (``B x N2 x D``; ``mask`` ``B x N2`` bool, True = padding)."""
        if self.fusion == 'diag':
            if delta_t.shape[1] != delta_v.shape[1]:
                raise ValueError(
                    "SpectralMoEAdapter: fusion='diag' needs as many second-"
                    f'modality tokens as patches, got N2={delta_t.shape[1]} '
                    f'and N={delta_v.shape[1]}')
            gate = self.diag_gate(delta_t, delta_v)
            return gate.to(delta_v.dtype)[..., None] * delta_v
        if mask is None:
            return delta_v + F.scaled_dot_product_attention(
                delta_v, delta_t, delta_t)
        # A sample whose words are all padding attends to its padding (no
        # NaN) and its context is zeroed, without asking on the host
        # whether such a sample exists.
        empty = mask.all(dim=1)  # B
        keep = ~(mask & ~empty[:, None])
        ctx = F.scaled_dot_product_attention(
            delta_v, delta_t, delta_t, attn_mask=keep[:, None, :])
        return delta_v + ctx * (~empty).to(ctx.dtype)[:, None, None]

    def balance(self, route: RouterOutput) -> Tensor:
        """``cv^2(importance) + cv^2(load)`` of one router (float32
        scalar, times ``E / (E - 1)`` with ``unbiased_cv``)."""
        loss = cv_squared(route.importance) + cv_squared(route.load)
        E = route.num_experts
        if self.unbiased_cv and E > 1:
            loss = loss * (E / (E - 1))
        return loss

    def _second_tokens(
            self, f: Tensor, text: Optional[TextFeatures],
            second: Optional[Tensor]) -> Optional[Tuple[Tensor, Optional[
                Tensor]]]:
        """The second modality as ``(B x N2 x D tokens, B x N2 padding mask
        or None)``, or None when this call has none."""
        if self.fusion == 'none':
            return None
        B = f.shape[0]
        proj = self.shared_parts.second_proj
        if self.second_source == 'tokens':
            if second is None:
                raise ValueError(
                    "SpectralMoEAdapter(second_source='tokens') needs the "
                    'second modality: call it with second=B x N2 x C2 '
                    'tokens (e.g. DualStreamDINOv2 passes them)')
            width = self.embed_dims if proj is None else self.second_dims
            if (second.dim() != 3 or second.shape[0] != B
                    or second.shape[-1] != width):
                raise ValueError('SpectralMoEAdapter: second must be '
                                 f'{B} x N2 x {width}, got '
                                 f'{tuple(second.shape)}')
            t = second if proj is None else proj(second)
            return t.to(f.dtype), None
        if second is not None:
            raise ValueError(
                "SpectralMoEAdapter(second_source='text') takes its second "
                "modality from the sentence; use second_source='tokens' to "
                'feed second=')
        if text is None:
            return None
        if (text.tokens.dim() != 3 or text.tokens.shape[0] != B
                or text.tokens.shape[-1] != self.text_dims):
            raise ValueError(f'SpectralMoEAdapter: text.tokens must be {B} '
                             f'x L x {self.text_dims}, got '
                             f'{tuple(text.tokens.shape)}')
        if text.mask.shape != text.tokens.shape[:2] or \
                text.mask.dtype != torch.bool:
            raise ValueError('SpectralMoEAdapter: text.mask must be a bool '
                             f'B x L {tuple(text.tokens.shape[:2])} tensor, '
                             f'got {text.mask.dtype} '
                             f'{tuple(text.mask.shape)}')
        return proj(text.tokens).to(f.dtype), text.mask

    def _check_patches(self, x: Tensor, hw: Tuple[int, int]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.embed_dims:
            raise ValueError('SpectralMoEAdapter expects patches B x N x '
                             f'{self.embed_dims}, got {tuple(x.shape)}')
        h, w = hw
        if h * w != x.shape[1]:
            raise ValueError(f'SpectralMoEAdapter: hw={tuple(hw)} gives '
                             f'{h * w} patches but there are N={x.shape[1]}')

    def forward(self,
                patches: Tensor,
                *,
                hw: Tuple[int, int],
                text: Optional[TextFeatures] = None,
                second: Optional[Tensor] = None) -> AdapterOutput:
        """Adapt the patch tokens of one block.

        Args:
            patches: ``B x N x D`` patch tokens f (no prefix tokens).
            hw: the patch grid, ``h * w = N``.
            text: sentence features (``second_source='text'``); None runs
                the visual stream alone.
            second: ``B x N2 x C2`` second-modality tokens
                (``second_source='tokens'``, required there).

        Returns:
            AdapterOutput: ``tokens`` ``B x N x D``; ``routing`` ``B x N x
            E`` float32 weights of the visual router; ``aux_losses``
            ``{'loss_moe_balance': scalar}``.
        """
        self._check_patches(patches, hw)
        if self.shared_out and not self._tied:
            warnings.warn(
                'SpectralMoEAdapter(shared_out=True) runs with its own W_tf, '
                'W_df and s: call tie_shared_parts(backbone) after building '
                'to share them across blocks')
        f = patches
        route_v = self.router(f)
        delta = self.expert_delta(f, route_v)
        loss = self.balance(route_v)
        second_tokens = self._second_tokens(f, text, second)
        if second_tokens is not None:
            t, mask = second_tokens
            route_t = self.second_router(t)
            delta = self.fuse(delta, self.expert_delta(t, route_t), mask)
            loss = loss + self.balance(route_t)
        tokens = self.shared_parts(f, delta)
        loss = loss * (self.loss_weight / self.num_layers)
        return AdapterOutput(
            tokens=tokens,
            routing=route_v.weights,
            aux_losses={'loss_moe_balance': loss})

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, fusion={self.fusion!r}, '
                f'combine={self.combine!r}, '
                f'second_source={self.second_source!r}, '
                f'shared_out={self.shared_out}, tied={self._tied}, '
                f'loss_weight={self.loss_weight}, '
                f'num_layers={self.num_layers}')


def tie_shared_parts(root: nn.Module) -> Optional[SpectralMoEShared]:
    """Share one :class:`SpectralMoEShared` among every
    ``shared_out=True`` :class:`SpectralMoEAdapter` under ``root`` (e.g. a
    backbone; call it per tower).

    The first such adapter in module order (the lowest block) keeps its
    parts as the sub-module ``shared``; the others drop theirs and use it
    through a plain reference, so each shared tensor is listed once in
    ``parameters()``, ``state_dict()`` and optimiser groups, and a deep
    copy keeps the sharing. Idempotent. Call it right after building,
    before loading weights or building the optimiser.

    Returns:
        The shared parts, or None when ``root`` has no such adapter.

    Raises:
        ValueError: the adapters' shared parts differ in shape (e.g.
            different widths or second-modality projections).
    """
    group = [
        m for m in root.modules()
        if isinstance(m, SpectralMoEAdapter) and m.shared_out
    ]
    if not group:
        return None
    parts = group[0].shared_parts
    for m in group:
        m._link_shared(parts, own=m is group[0])
    return parts
