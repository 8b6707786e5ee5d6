"""SERA-Adapter: backbone-level, expression-routed refinement of ViT tokens."""
from typing import Optional, Sequence, Tuple

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..moe.experts import DWConvBoundaryExpert, DWConvSpatialExpert
from ..moe.losses import balance_loss
from ..moe.router import SoftRouter
from ..structures import AdapterOutput, TextFeatures

_MULTI_SCALE = ('sum', 'concat')


@MODELS.register_module()
class SERAAdapter(BaseModule):
    """SERA-Adapter (soft-routed light experts + cross-modal attention).

    Runs after a backbone block on its patch tokens (prefix tokens such as
    CLS/registers are the caller's business). With d = ``hidden_dims``::

        X = grid(Linear_{C->d}(x))                              B x d x h x w
        G = GELU(Norm(Conv1x1(X) + Conv3x3(X) + Conv5x5(X)))    ('sum')
          | GELU(Norm(Conv1x1([Conv1x1 X, Conv3x3 X, Conv5x5 X])))  ('concat')
        S = GELU(DWConv3x3(G)) + alpha * G                      spatial expert
        B = ReLU(BN(G + beta * DWConv3x3(G)))                   boundary expert
        z = [GAP(G), Linear_{Cp->d}(text.pooled)]      (route_with_text)
        [w_s, w_b] = softmax(Linear(z))                B x 2
        F = G + f_s * w_s * S + f_b * w_b * B          f_s=0.25, f_b=0.15
        T = flatten(F) + MHA(q=LN(flatten F),
                             k=v=Linear_{Ct->d}(text.tokens),
                             key_padding_mask=text.mask)   B x N x d
        out = x + Linear_{d->C}(T)                     zero-initialised

    The fusion equation ``F`` is our documented choice (the paper note omits
    it); its coefficients are arguments. Because the up-projection starts at
    zero (and stays zero after :meth:`init_weights`), a fresh adapter is the
    identity.

    Without text (``text=None``) the cross-attention is skipped (``T =
    flatten(F)``) and the text half of ``z`` is zeros, so the same adapter
    serves text-free configs. A sample whose mask pads every word also skips
    the attention (its attention output is set to zero instead of NaN).
    ``text_dims=None`` builds an image-only adapter without any text part
    (no parameter that would never get a gradient, so DDP needs no
    ``find_unused_parameters``); it refuses text.

    Args:
        embed_dims: C, the ViT width.
        text_dims: Ct, width of ``text.tokens``; None for an image-only
            adapter (no cross-attention, routing on the image alone).
        pooled_dims: Cp, width of ``text.pooled``; defaults to ``text_dims``.
        hidden_dims: d.
        num_heads: heads of the cross-modal attention (d divisible by it).
        route_with_text: concatenate the projected sentence embedding to the
            router input (expression-aware routing).
        spatial_alpha: alpha of the spatial expert (paper: 0.3).
        boundary_beta: beta of the boundary expert (paper: 0.1).
        fuse_spatial: f_s in F (0.25).
        fuse_boundary: f_b in F (0.15).
        kernel_sizes: the multi-scale conv kernels (1, 3, 5).
        multi_scale: ``'sum'`` (one norm after summing the branches, the
            default: cheaper) or ``'concat'`` (concat + 1x1 conv).
        norm_cfg: norm of the multi-scale block and the boundary expert.
        act_cfg: activation of the multi-scale block and spatial expert.
        attn_drop: dropout on the cross-attention weights.
        balance_weight: weight of ``loss_adapter_balance`` = ``CV(u)^2``,
            ``u_e`` the routing weight of expert e summed over the batch,
            in training (**ours**; the paper gives the adapter no routing
            loss, 0 = off). It penalises a router that sends every
            sentence to one expert, not one that routes each sentence
            sharply; several adapters' terms are summed. Note that a
            50/50 split for every sentence minimises it too, and is what
            the tiny model learned with 0.1 (docs/benchmarks.md).
        init_cfg: mmengine init config.
    """

    #: order of the routing weights ``[w_s, w_b]``
    expert_names = ('spatial', 'boundary')

    def __init__(self,
                 embed_dims: int,
                 *,
                 text_dims: Optional[int] = 512,
                 pooled_dims: Optional[int] = None,
                 hidden_dims: int = 64,
                 num_heads: int = 4,
                 route_with_text: bool = True,
                 spatial_alpha: float = 0.3,
                 boundary_beta: float = 0.1,
                 fuse_spatial: float = 0.25,
                 fuse_boundary: float = 0.15,
                 kernel_sizes: Sequence[int] = (1, 3, 5),
                 multi_scale: str = 'sum',
                 norm_cfg: dict = dict(type='BN'),
                 act_cfg: dict = dict(type='GELU'),
                 attn_drop: float = 0.0,
                 balance_weight: float = 0.0,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if balance_weight < 0:
            raise ValueError('SERAAdapter: balance_weight must be >= 0, got '
                             f'{balance_weight}')
        if text_dims is None:  # image-only adapter
            route_with_text = False
            pooled_dims = None
        else:
            pooled_dims = text_dims if pooled_dims is None else pooled_dims
        for name, v in (('embed_dims', embed_dims), ('text_dims', text_dims),
                        ('pooled_dims', pooled_dims),
                        ('hidden_dims', hidden_dims)):
            if v is not None and v < 1:
                raise ValueError(f'SERAAdapter: {name} must be positive, '
                                 f'got {v}')
        if num_heads < 1 or hidden_dims % num_heads:
            raise ValueError(f'SERAAdapter: hidden_dims={hidden_dims} must '
                             f'be divisible by num_heads={num_heads}')
        if multi_scale not in _MULTI_SCALE:
            raise ValueError(f'SERAAdapter: multi_scale must be one of '
                             f'{_MULTI_SCALE}, got {multi_scale!r}')
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError('SERAAdapter: kernel_sizes must be positive odd '
                             f'numbers, got {tuple(kernel_sizes)}')
        self.embed_dims = embed_dims
        self.text_dims = text_dims
        self.pooled_dims = pooled_dims
        self.hidden_dims = d = hidden_dims
        self.route_with_text = route_with_text
        self.fuse_spatial = float(fuse_spatial)
        self.fuse_boundary = float(fuse_boundary)
        self.multi_scale = multi_scale
        self.balance_weight = float(balance_weight)

        self.down_proj = nn.Linear(embed_dims, d)
        self.ms_convs = nn.ModuleList(
            nn.Conv2d(d, d, k, padding=k // 2) for k in kernel_sizes)
        self.ms_fuse = (
            nn.Conv2d(len(kernel_sizes) * d, d, 1)
            if multi_scale == 'concat' else nn.Identity())
        self.ms_norm = build_norm_layer(norm_cfg, d)[1]
        self.ms_act = build_activation_layer(act_cfg)

        self.spatial_expert = DWConvSpatialExpert(
            d, alpha=spatial_alpha, act_cfg=act_cfg)
        self.boundary_expert = DWConvBoundaryExpert(
            d, beta=boundary_beta, norm_cfg=norm_cfg)

        self.route_text_proj = (
            nn.Linear(pooled_dims, d) if route_with_text else None)
        self.router = SoftRouter(2 * d if route_with_text else d, 2)

        if text_dims is not None:
            self.text_proj = nn.Linear(text_dims, d)
            self.query_norm = nn.LayerNorm(d)
            self.cross_attn = nn.MultiheadAttention(
                d, num_heads, dropout=attn_drop, batch_first=True)

        self.up_proj = nn.Linear(d, embed_dims)
        self._zero_up_proj()

    def _zero_up_proj(self) -> None:
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def init_weights(self) -> None:
        """mmengine init, then re-zero the up-projection (identity start),
        whatever a parent's ``init_cfg`` did to it."""
        super().init_weights()
        self._zero_up_proj()

    def _check_inputs(self, x: Tensor, hw: Tuple[int, int],
                      text: Optional[TextFeatures]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.embed_dims:
            raise ValueError(f'SERAAdapter expects tokens B x N x '
                             f'{self.embed_dims}, got {tuple(x.shape)}')
        h, w = hw
        if h * w != x.shape[1]:
            raise ValueError(f'SERAAdapter: hw={tuple(hw)} gives {h * w} '
                             f'patches but x has N={x.shape[1]} tokens')
        if text is None:
            return
        if self.text_dims is None:
            raise ValueError('SERAAdapter was built without text parts '
                             '(text_dims=None) but was given text')
        B = x.shape[0]
        if (text.tokens.dim() != 3 or text.tokens.shape[0] != B
                or text.tokens.shape[-1] != self.text_dims):
            raise ValueError(f'SERAAdapter: text.tokens must be {B} x L x '
                             f'{self.text_dims}, got '
                             f'{tuple(text.tokens.shape)}')
        if text.mask.shape != text.tokens.shape[:2]:
            raise ValueError('SERAAdapter: text.mask must be B x L '
                             f'{tuple(text.tokens.shape[:2])}, got '
                             f'{tuple(text.mask.shape)}')
        if text.mask.dtype != torch.bool:
            raise ValueError('SERAAdapter: text.mask must be a bool tensor '
                             f'(True = padding), got {text.mask.dtype}')
        if self.route_with_text and tuple(text.pooled.shape) != (
                B, self.pooled_dims):
            raise ValueError(f'SERAAdapter: text.pooled must be {B} x '
                             f'{self.pooled_dims}, got '
                             f'{tuple(text.pooled.shape)}')

    def multi_scale_features(self, x: Tensor) -> Tensor:
        """``B x d x h x w`` -> G, ``B x d x h x w``."""
        if self.multi_scale == 'sum':
            y = sum(conv(x) for conv in self.ms_convs)
        else:
            y = self.ms_fuse(torch.cat([conv(x) for conv in self.ms_convs], 1))
        return self.ms_act(self.ms_norm(y))

    def route(self, g: Tensor, text: Optional[TextFeatures]) -> Tensor:
        """Soft routing weights ``[w_s, w_b]`` (``B x 2``, float32) from G
        (``B x d x h x w``) and, if enabled, the sentence embedding."""
        z = g.mean(dim=(2, 3))
        if self.route_with_text:
            if text is None:
                t = z.new_zeros(z.shape)
            else:
                t = self.route_text_proj(text.pooled).to(z.dtype)
            z = torch.cat([z, t], dim=-1)
        return self.router(z).weights

    def cross_attend(self, f: Tensor, text: TextFeatures) -> Tensor:
        """Residual cross-modal attention of visual tokens ``f``
        (``B x N x d``) to the projected word tokens; ``B x N x d``."""
        kv = self.text_proj(text.tokens)
        # A sample with no valid word attends to its padding instead (no
        # NaN) and its attention output is zeroed.  Done without asking
        # whether such a sample exists: that question would make a GPU
        # forward wait for the device in every adapter.
        empty = text.mask.all(dim=1)  # B
        mask = text.mask & ~empty[:, None]
        q = self.query_norm(f)
        a = self.cross_attn(q, kv, kv, key_padding_mask=mask,
                            need_weights=False)[0]
        return f + a * (~empty).to(a.dtype)[:, None, None]

    def forward(self,
                x: Tensor,
                hw: Tuple[int, int],
                text: Optional[TextFeatures] = None) -> AdapterOutput:
        """Refine patch tokens.

        Args:
            x: ``B x N x C`` patch tokens, N = h * w (row-major grid).
            hw: the patch grid ``(h, w)``.
            text: sentence features or None (text-free).

        Returns:
            AdapterOutput: ``tokens`` ``B x N x C`` (``x + delta``),
            ``routing`` ``B x 2`` = ``[w_s, w_b]``, ``aux_losses``
            ``loss_adapter_balance`` in training with ``balance_weight``,
            else empty.
        """
        self._check_inputs(x, hw, text)
        B, N, _ = x.shape
        h, w = hw
        y = self.down_proj(x)  # B x N x d
        y = y.transpose(1, 2).reshape(B, self.hidden_dims, h, w)
        g = self.multi_scale_features(y)
        s = self.spatial_expert(g)
        b = self.boundary_expert(g)
        weights = self.route(g, text)  # B x 2
        ws = weights[:, 0].to(g.dtype)[:, None, None, None]
        wb = weights[:, 1].to(g.dtype)[:, None, None, None]
        f = g + self.fuse_spatial * ws * s + self.fuse_boundary * wb * b
        f = f.flatten(2).transpose(1, 2)  # B x N x d
        if text is not None:
            f = self.cross_attend(f, text)
        delta = self.up_proj(f)
        losses = {}
        if self.training and self.balance_weight:
            losses['loss_adapter_balance'] = (
                self.balance_weight * balance_loss(weights))
        return AdapterOutput(
            tokens=x + delta.to(x.dtype), routing=weights, aux_losses=losses)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, hidden_dims='
                f'{self.hidden_dims}, route_with_text={self.route_with_text}, '
                f'fuse_spatial={self.fuse_spatial}, '
                f'fuse_boundary={self.fuse_boundary}')
