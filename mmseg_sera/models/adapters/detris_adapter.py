"""DETRIS adapters: the Dense Aligner (image blocks) and the Text Adapter
(CLIP text blocks), as parallel branches of a block's MLP.

DETRIS (Huang et al., AAAI 2025) puts both beside the MLP of every other
block and scales them by 0.2; see ``docs/peers.md`` for the sources. The
slot machinery is in :mod:`mmseg_sera.models.backbones.slots`.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from ..structures import TextFeatures
from .dense_moc import DenseMoC

TEXT_SOURCES = ('tokens', 'pooled')


@MODELS.register_module()
class DETRISDenseAligner(BaseModule):
    """DETRIS Dense Aligner (DA), slot kind ``parallel_mlp``.

    Runs beside the MLP of a DINOv2 block on h = LN2(z) of all tokens, P
    prefix (class + registers) then N = h_g * w_g patches::

        x0 = ReLU(fc1 h)                              B x (P + N) x d
        X  = grid(x0[:, P:])                          B x d x h_g x w_g
        M  = tokens(DenseMoC(X))                      B x N x d  (+X inside)
        Y  = W_back(MHA(q = W_img M, k = v = W_txt T))        B x N x d
        U  = concat[x0[:, :P], Y] + x0                B x (P + N) x d
        out = fc2 U                                   B x (P + N) x C

    T = ``text.tokens`` (B x L x Ct, every word, padding included). The
    cross-attention output **replaces** the conv features, so a patch
    token's output is ``fc2(x0 + W_back(out_proj(sum_j alpha_j v_j)))``:
    the values come only from text, the convs only shape the attention
    weights alpha through the query. Prefix tokens skip the convs and the
    attention and become ``fc2(2 x0)``. The block adds ``scale * out``
    (DETRIS: 0.2) to the MLP output inside LayerScale 2. The patch grid is
    given explicitly, so non-square inputs work (DETRIS assumes a square).

    Initialisation (DETRIS's effective one): every Linear, the attention's
    ``out_proj`` included, trunc-normal(std 0.02) with zero bias; convs
    kaiming-normal (fan_in, ReLU) with zero bias; the attention's packed
    in-projection xavier-uniform, zero bias; BatchNorm 1 / 0. The output is
    not zero at the start.

    Parameters at (C, d) = (768, 128), attn 128, Ct 512: 382,896 (fc1
    98,432; fc2 99,072; D-MoC 20,656; W_img 16,512; W_txt 65,664; MHA
    66,048; W_back 16,512). At (1024, 128): 448,688.

    Args:
        embed_dims: C, the ViT width (filled in by the backbone).
        hidden_dims: d, the adapter width.
        attn_dims: width of the cross-attention.
        num_heads: heads of the cross-attention.
        text_dims: Ct, width of the text features used as keys.
        attn_drop: dropout on the attention weights (0.1 in DETRIS).
        text_source: ``'tokens'`` (DETRIS code: every word of
            ``text.tokens``) or ``'pooled'`` (the slides' reading: one key,
            ``text.pooled``; then ``text_dims`` is its width).
        key_padding: mask padded words out of the attention
            (``text.mask``). DETRIS attends to padding: off by default.
        cross_residual: ``Y + M`` instead of ``Y`` (the convs then also
            reach the output directly). Off by default (DETRIS replaces).
        init_cfg: mmengine init config; without one the DETRIS init above
            is used.
    """

    slot_kind = 'parallel_mlp'

    def __init__(self,
                 *,
                 embed_dims: int,
                 hidden_dims: int = 128,
                 attn_dims: int = 128,
                 num_heads: int = 8,
                 text_dims: int = 512,
                 attn_drop: float = 0.1,
                 text_source: str = 'tokens',
                 key_padding: bool = False,
                 cross_residual: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if text_source not in TEXT_SOURCES:
            raise ValueError(f'DETRISDenseAligner: text_source must be one '
                             f'of {TEXT_SOURCES}, got {text_source!r}')
        if key_padding and text_source == 'pooled':
            raise ValueError('DETRISDenseAligner: key_padding=True needs '
                             "text_source='tokens' (one pooled key has no "
                             'padding)')
        if num_heads < 1 or attn_dims % num_heads:
            raise ValueError(f'DETRISDenseAligner: attn_dims={attn_dims} '
                             f'must be divisible by num_heads={num_heads}')
        self.embed_dims = embed_dims
        self.hidden_dims = d = hidden_dims
        self.text_dims = text_dims
        self.text_source = text_source
        self.key_padding = key_padding
        self.cross_residual = cross_residual

        self.fc1 = nn.Linear(embed_dims, d)
        self.dmoc = DenseMoC(dims=d, ndim=2, inner_residual=True)
        self.img_proj = nn.Linear(d, attn_dims)  # W_img
        self.text_proj = nn.Linear(text_dims, attn_dims)  # W_txt
        self.cross_attn = nn.MultiheadAttention(
            attn_dims, num_heads, dropout=attn_drop, batch_first=True)
        self.back_proj = nn.Linear(attn_dims, d)  # W_back
        self.fc2 = nn.Linear(d, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The DETRIS init (see the class docstring)."""
        # in_proj: xavier / 0 (out_proj.bias 0 as well); out_proj.weight is
        # then set by the Linear rule below, as DETRIS's ViT init does.
        self.cross_attn._reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """mmengine's ``init_cfg`` if given, else :meth:`reset_parameters`.
        """
        if self.init_cfg:
            super().init_weights()
        else:
            self.reset_parameters()

    def _check_inputs(self, h: Tensor, hw: Tuple[int, int],
                      text: Optional[TextFeatures], num_prefix: int) -> None:
        if h.dim() != 3 or h.shape[-1] != self.embed_dims:
            raise ValueError('DETRISDenseAligner expects tokens B x (P + N) '
                             f'x {self.embed_dims}, got {tuple(h.shape)}')
        if num_prefix + hw[0] * hw[1] != h.shape[1]:
            raise ValueError(
                f'DETRISDenseAligner: num_prefix={num_prefix} and hw='
                f'{tuple(hw)} give {num_prefix + hw[0] * hw[1]} tokens, got '
                f'{h.shape[1]}')
        if text is None:
            raise ValueError('DETRISDenseAligner needs text features (the '
                             'backbone was called with text=None)')
        keys = text.tokens if self.text_source == 'tokens' else text.pooled
        if keys.shape[0] != h.shape[0] or keys.shape[-1] != self.text_dims:
            raise ValueError(
                f'DETRISDenseAligner: text.{self.text_source} must be '
                f'{h.shape[0]} x ... x {self.text_dims}, got '
                f'{tuple(keys.shape)}')

    def cross_attend(self, m: Tensor, text: TextFeatures) -> Tensor:
        """Y = W_back(MHA(q = W_img m, k = v = W_txt T)): B x N x d."""
        if self.text_source == 'pooled':
            kv = self.text_proj(text.pooled[:, None])  # B x 1 x a
            mask = None
        else:
            kv = self.text_proj(text.tokens)  # B x L x a
            mask = None
            if self.key_padding:
                # a sample without any word keeps its keys (no NaN rows)
                mask = text.mask & ~text.mask.all(dim=1, keepdim=True)
        a = self.cross_attn(self.img_proj(m), kv, kv, key_padding_mask=mask,
                            need_weights=False)[0]
        return self.back_proj(a)

    def forward(self, h: Tensor, *, hw: Tuple[int, int],
                text: Optional[TextFeatures], num_prefix: int) -> Tensor:
        """B x (P + N) x C -> B x (P + N) x C (see the class docstring).

        Args:
            h: LN2 output of all tokens, prefix first, then the patches of
                the row-major h_g x w_g grid.
            hw: the patch grid (h_g, w_g).
            text: sentence features (``tokens`` or ``pooled`` are used).
            num_prefix: P, the class and register tokens.
        """
        self._check_inputs(h, hw, text, num_prefix)
        B = h.shape[0]
        P = num_prefix
        x0 = F.relu(self.fc1(h))  # B x (P + N) x d
        grid = x0[:, P:].transpose(1, 2).reshape(B, self.hidden_dims, *hw)
        m = self.dmoc(grid).flatten(2).transpose(1, 2)  # B x N x d
        y = self.cross_attend(m, text)
        if self.cross_residual:
            y = y + m
        u = torch.cat([x0[:, :P], y], dim=1) + x0
        return self.fc2(u)

    def extra_repr(self) -> str:
        return (f'text_source={self.text_source!r}, key_padding='
                f'{self.key_padding}, cross_residual={self.cross_residual}')


@MODELS.register_module()
class DETRISTextAdapter(BaseModule):
    """DETRIS Text Adapter (TA), slot kind ``parallel_mlp_text``.

    Runs beside the MLP of a CLIP text block on the *un-normalised* residual
    stream x after attention (B x L x Ct)::

        x0  = ReLU(fc1 x)                          B x L x d
        M   = DenseMoC_1d(x0[:, 1:] as B x d x (L-1))  (no +X inside)
        U   = concat[x0[:, :1], M] + x0            token 0 (SOT) skips
        out = fc2 U                                B x L x Ct

    and the block becomes ``x = x + mlp(ln_2 x) + scale * TA(x)`` (DETRIS:
    0.2). The 1-D convs are not causal and run over the padding too, so a
    word sees up to two later words (and the padding after the sentence).
    PyTorch default initialisation. 69,720 parameters at (Ct, d) =
    (512, 64).

    Args:
        embed_dims: Ct, the text width (filled in by the encoder).
        hidden_dims: d, the adapter width.
        init_cfg: mmengine init config.
    """

    slot_kind = 'parallel_mlp_text'

    def __init__(self,
                 *,
                 embed_dims: int,
                 hidden_dims: int = 64,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.embed_dims = embed_dims
        self.hidden_dims = hidden_dims
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.dmoc = DenseMoC(dims=hidden_dims, ndim=1, inner_residual=False)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        """B x L x Ct -> B x L x Ct (L >= 2)."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dims or x.shape[1] < 2:
            raise ValueError('DETRISTextAdapter expects B x L x '
                             f'{self.embed_dims} with L >= 2, got '
                             f'{tuple(x.shape)}')
        x0 = F.relu(self.fc1(x))
        m = self.dmoc(x0[:, 1:].transpose(1, 2)).transpose(1, 2)
        u = torch.cat([x0[:, :1], m], dim=1) + x0
        return self.fc2(u)
