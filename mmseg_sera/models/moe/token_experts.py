"""Low-rank token experts (SpectralMoE's "perceptual map", after Rein).

Expert e holds T learnable tokens of width D, factored as
``T_e = A_e B_e`` (``A_e``: T x r, ``B_e``: r x D). A unit x (width D)
attends to them and reads a projection of tokens 2..T::

    u_e(x) = x T_e^T                          'dot' (the natural reading)
           | (sum_c x_c) (sum_d T_e[:, d])    'sum' (the released code)
    S_e(x) = softmax(u_e(x) / sqrt(D))        T weights
    delta_e(x) = sum_{t=2..T} S_e(x)_t (W_tf T_e[t] + b_tf)

``W_tf`` (``token_proj``) is not part of the expert: SpectralMoE shares one
Linear D -> D across all layers and experts, so the caller passes it in.
Token 1 takes part in the softmax but not in the sum (Rein's convention).

The released code writes the logits as ``einsum('bc,td->bt', x, T_e)``:
the two summed indices differ, so it computes the product of two sums, not
a dot product. ``released_compat=True`` reproduces that form.
"""
import math
from typing import Callable, Optional

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

__all__ = ['LowRankTokenExpert']

TokenProj = Callable[[Tensor], Tensor]


@MODELS.register_module()
class LowRankTokenExpert(BaseModule):
    """The E low-rank token experts of one layer, with stacked parameters.

    Parameters (state-dict names):

    * ``tokens_a``: ``E x T x r``; each ``T x r`` slice is kaiming-uniform
      with ``a = sqrt(5)`` (fan-in r, bound ``1 / sqrt(r)``), as the
      released per-expert ``T x r`` tensors.
    * ``tokens_b``: ``E x r x D``, zeros, so every expert's tokens start at
      zero: ``S`` is uniform and ``delta_e(x) = (1 - 1/T) b_tf`` for every
      x and e.

    Holding the experts stacked makes top-K dispatch a gather and one
    matrix product (no loop over experts, no host read of the routing).
    The logits of all E experts are computed (``... x E x T``); the
    un-chosen ones are cheap to drop.

    Args:
        embed_dims: D.
        num_experts: E.
        token_length: T (>= 2: token 1 is only in the softmax).
        rank: r.
        released_compat: use the released sum form of the logits,
            ``(sum_c x_c)(sum_d T_e[t, d])``, instead of the dot product.
        init_cfg: mmengine init config; :meth:`init_weights` re-applies
            the init above after it.
    """

    def __init__(self,
                 embed_dims: int,
                 *,
                 num_experts: int = 1,
                 token_length: int = 100,
                 rank: int = 16,
                 released_compat: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        for name, v in (('embed_dims', embed_dims),
                        ('num_experts', num_experts), ('rank', rank)):
            if v < 1:
                raise ValueError(f'LowRankTokenExpert: {name} must be '
                                 f'positive, got {v}')
        if token_length < 2:
            raise ValueError('LowRankTokenExpert: token_length must be >= 2 '
                             '(token 1 only takes part in the softmax), got '
                             f'{token_length}')
        self.embed_dims = embed_dims
        self.num_experts = num_experts
        self.token_length = token_length
        self.rank = rank
        self.released_compat = released_compat
        self.tokens_a = nn.Parameter(
            torch.empty(num_experts, token_length, rank))
        self.tokens_b = nn.Parameter(
            torch.empty(num_experts, rank, embed_dims))
        self._reset_tokens()

    def _reset_tokens(self) -> None:
        for a in self.tokens_a.data:  # each T x r slice: fan-in r
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.tokens_b)

    def init_weights(self) -> None:
        super().init_weights()
        self._reset_tokens()

    def tokens(self) -> Tensor:
        """``E x T x D`` expert tokens ``T_e = A_e B_e``."""
        return self.tokens_a @ self.tokens_b

    def logits(self, x: Tensor, tokens: Optional[Tensor] = None) -> Tensor:
        """Raw logits ``u`` of every expert, ``... x D`` -> ``... x E x T``
        (not yet divided by sqrt(D))."""
        self._check(x)
        tok = self.tokens() if tokens is None else tokens
        tok = tok.to(x.dtype)
        if self.released_compat:
            return x.sum(-1)[..., None, None] * tok.sum(-1)
        return torch.einsum('...d,etd->...et', x, tok)

    def _weights(self, x: Tensor, tok: Tensor, indices: Tensor) -> Tensor:
        """Softmax weights of the chosen experts, ``... x K x T``
        (float32)."""
        u = self.logits(x, tok)  # ... x E x T
        idx = indices[..., None].expand(*indices.shape, self.token_length)
        u = u.gather(-2, idx).float()
        return torch.softmax(u / math.sqrt(self.embed_dims), dim=-1)

    def _dense(self, s: Tensor, indices: Tensor) -> Tensor:
        """Scatter ``... x K x T`` weights of tokens 2..T to their experts:
        ``... x K x E x (T - 1)`` (zeros for the other experts)."""
        experts = torch.arange(self.num_experts, device=indices.device)
        hot = (indices[..., None] == experts).to(s.dtype)  # ... x K x E
        return hot[..., None] * s[..., None, 1:]

    def forward(self,
                x: Tensor,
                token_proj: TokenProj,
                indices: Optional[Tensor] = None) -> Tensor:
        """Outputs ``delta_e(x)`` of the chosen experts.

        Args:
            x: ``... x D`` units.
            token_proj: the shared ``W_tf`` (a Linear D -> D).
            indices: ``... x K`` int64 expert indices per unit (a router's
                ``indices``); None: every expert, in order (K = E).

        Returns:
            ``... x K x D``: slot j holds ``delta_{indices[..., j]}(x)``.
        """
        lead = x.shape[:-1]
        if indices is None:
            indices = torch.arange(self.num_experts, device=x.device)
            indices = indices.expand(*lead, self.num_experts)
        self._check_indices(indices, lead)
        tok = self.tokens()
        values = token_proj(tok[:, 1:])  # E x (T - 1) x D
        w = self._dense(self._weights(x, tok, indices), indices)
        K = indices.shape[-1]
        w = w.reshape(*lead, K, -1).to(values.dtype)
        return w @ values.reshape(-1, values.shape[-1])

    def mix(self, x: Tensor, token_proj: TokenProj, indices: Tensor,
            gates: Tensor) -> Tensor:
        """Gated sum ``sum_j gates[..., j] delta_{indices[..., j]}(x)``,
        ``... x D``, as one matrix product.

        Args:
            x: ``... x D`` units.
            token_proj: the shared ``W_tf``.
            indices: ``... x K`` chosen experts.
            gates: ``... x K`` their weights (e.g. the router's weights
                gathered at ``indices``).
        """
        lead = x.shape[:-1]
        self._check_indices(indices, lead)
        if gates.shape != indices.shape:
            raise ValueError('LowRankTokenExpert.mix: gates must have the '
                             f'shape of indices {tuple(indices.shape)}, got '
                             f'{tuple(gates.shape)}')
        tok = self.tokens()
        values = token_proj(tok[:, 1:])  # E x (T - 1) x D
        s = self._weights(x, tok, indices) * gates[..., None].float()
        w = self._dense(s, indices).sum(-3)  # ... x E x (T - 1)
        w = w.reshape(*lead, -1).to(values.dtype)
        return w @ values.reshape(-1, values.shape[-1])

    def _check(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.embed_dims:
            raise ValueError('LowRankTokenExpert expects units of shape ... '
                             f'x {self.embed_dims}, got {tuple(x.shape)}')

    def _check_indices(self, indices: Tensor, lead) -> None:
        if indices.dim() != len(lead) + 1 or indices.shape[:-1] != lead:
            raise ValueError('LowRankTokenExpert: indices must be ... x K '
                             f'with the leading dims {tuple(lead)} of x, got '
                             f'{tuple(indices.shape)}')
        if indices.dtype != torch.int64:
            raise ValueError('LowRankTokenExpert: indices must be int64, got '
                             f'{indices.dtype}')

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_experts='
                f'{self.num_experts}, token_length={self.token_length}, '
                f'rank={self.rank}, released_compat={self.released_compat}')
