"""ETRIS Bridger: a bidirectional image-text bridge between the blocks of a
frozen ViT and a frozen CLIP text tower (slot kind ``bridge``).

ETRIS (Xu et al., ICCV 2023) runs both towers in lock-step and, after the
blocks in ``insert`` (3, 7, 11 for ViT-B/16), writes a residual into both
streams; see ``docs/peers.md`` (PEERS.md §2). The lock-step loop and the
slot are in :mod:`mmseg_sera.models.backbones.slots`.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from ..backbones.slots import BridgeOutput


def _zoom(kind: str, c_in: int, c_out: int) -> nn.Sequential:
    """1x1 Conv (``'conv'``) or ConvTranspose (``'convT'``), no bias, then
    BatchNorm and ReLU: B x c_in x h x w -> B x c_out x h x w."""
    conv = nn.Conv2d if kind == 'conv' else nn.ConvTranspose2d
    return nn.Sequential(
        conv(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


class BridgerStage(nn.Module):
    """The modules of one stage s (see :class:`ETRISBridger`).

    Parameters (C, Ct, d) = (768, 512, 64): zoom_in 49,280, zoom_out 50,688,
    text_in (Lin1) 32,832, text_out (Lin2) 33,280, two MHAs 16,640 each:
    199,360 (462,208 at d = 128).
    """

    def __init__(self, *, embed_dims: int, text_dims: int, hidden_dims: int,
                 num_heads: int, swap_zoom: bool, out_scale: bool) -> None:
        super().__init__()
        C, d = embed_dims, hidden_dims
        first, last = ('convT', 'conv') if swap_zoom else ('conv', 'convT')
        self.zoom_in = _zoom(first, C, d)
        self.zoom_out = _zoom(last, d, C)
        self.text_in = nn.Linear(text_dims, d)  # Lin1
        self.text_out = nn.Linear(d, text_dims)  # Lin2
        self.attn_v = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.attn_t = nn.MultiheadAttention(d, num_heads, batch_first=True)
        # zero_init_out: a per-channel gate on the image residual, starting
        # at 0 (zeroing the last BN instead would leave ReLU(0) with no
        # gradient, so the image side could never start)
        self.out_scale = nn.Parameter(torch.zeros(C)) if out_scale else None


@MODELS.register_module()
class ETRISBridger(BaseModule):
    """ETRIS Bridger, slot kind ``bridge``: S stages after the image blocks
    ``insert`` (and the text blocks beside them).

    Stage s gets the patch tokens (B x N x C, prefix tokens excluded, N =
    h x w) and the whole text stream z_t (B x L x Ct, padding included)::

        V~ = tokens(ZoomIn_s(grid(patches)))       B x N x d
        T~ = Lin1_s(z_t)                           B x L x d
        if s > 0:                                  chained across stages
            V~ = LN^v_{s-1}(V~ + V~_prev);  T~ = LN^t_{s-1}(T~ + T~_prev)
        carry = (V~, T~)                           read by stage s + 1
        V^ = V~ * MHA^v_s(q = V~, k = T~, v = T~)
        T^ = T~ * MHA^t_s(q = T~, k = V~, v = V~)  both from pre-fusion V~, T~
        patches += tokens(ZoomOut_s(grid(V^)))     >= 0 (ends in BN + ReLU)
        z_t     += Lin2_s(T^)                      every text token

    ZoomIn is a 1x1 Conv (no bias) + BN + ReLU and ZoomOut a 1x1
    ConvTranspose + BN + ReLU; the last stage swaps them (ConvTranspose
    in, Conv out), as ETRIS's ViT Bridger. With stride 1 both are plain 1x1
    projections. The MHAs have d / ``num_heads`` wide heads, dropout 0, and
    no key padding mask (ETRIS attends to padded words). The injected image
    residual is non-negative and not zero at the start.

    Initialisation (ETRIS): every Linear, each MHA's ``out_proj`` included,
    N(0, 0.02) with zero bias; the MHAs' packed ``in_proj`` xavier-uniform,
    zero bias; convs kaiming-normal (fan_out, ReLU); BN and LN weight 1,
    bias 0.

    Parameters: S x stage + 2 (S - 1) LayerNorms of d. (C, Ct, d) = (768,
    512, 64), S = 3: 3 x 199,360 + 512 = 598,592 (the released ViT-B/16
    config); d = 128: 1,387,648 (the paper's 1.39 M).

    Args:
        embed_dims: C, the image tower width (filled in by the backbone).
        insert: image blocks after which the stages run, increasing (filled
            in by the backbone's slots with the resolved indices); stage s
            runs after ``insert[s]``.
        text_dims: Ct, the text tower width (512 for CLIP ViT-B/16).
        hidden_dims: d, the bridge width (ETRIS ``ladder_dim``, 64).
        num_heads: heads of both MHAs per stage (8).
        zero_init_out: deviation, off by default. Lin2 starts at zero and
            the image residual is multiplied by a per-channel gate that
            starts at zero (C more parameters per stage), so that a fresh
            bridge leaves both frozen streams unchanged.
        key_padding: deviation, off by default. MHA^v ignores padded words
            (``text_mask``); a sample without words keeps all keys.
        init_cfg: mmengine init config; without one the ETRIS init above
            is used.
    """

    slot_kind = 'bridge'

    def __init__(self,
                 *,
                 embed_dims: int,
                 insert: Sequence[int] = (3, 7, 11),
                 text_dims: int = 512,
                 hidden_dims: int = 64,
                 num_heads: int = 8,
                 zero_init_out: bool = False,
                 key_padding: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        insert = (insert, ) if isinstance(insert, int) else tuple(insert)
        if not insert:
            raise ValueError('ETRISBridger: insert names no block')
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0
               for i in insert) or list(insert) != sorted(set(insert)):
            raise ValueError('ETRISBridger: insert must be increasing block '
                             f'indices >= 0, got {insert}')
        if num_heads < 1 or hidden_dims % num_heads:
            raise ValueError(f'ETRISBridger: hidden_dims={hidden_dims} must '
                             f'be divisible by num_heads={num_heads}')
        self.insert = insert
        self.embed_dims = embed_dims
        self.text_dims = text_dims
        self.hidden_dims = hidden_dims
        self.zero_init_out = zero_init_out
        self.key_padding = key_padding
        S = len(insert)
        self.stages = nn.ModuleList([
            BridgerStage(
                embed_dims=embed_dims, text_dims=text_dims,
                hidden_dims=hidden_dims, num_heads=num_heads,
                swap_zoom=(s == S - 1), out_scale=zero_init_out)
            for s in range(S)
        ])
        # LN^v_{s-1}, LN^t_{s-1} chain stage s - 1 into stage s
        self.norms_v = nn.ModuleList(
            [nn.LayerNorm(hidden_dims) for _ in range(S - 1)])
        self.norms_t = nn.ModuleList(
            [nn.LayerNorm(hidden_dims) for _ in range(S - 1)])
        self.reset_parameters()

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def reset_parameters(self) -> None:
        """The ETRIS init (see the class docstring), then the
        ``zero_init_out`` zeros."""
        for m in self.modules():
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()  # in_proj xavier, biases 0
        for m in self.modules():
            if isinstance(m, nn.Linear):  # out_proj included
                nn.init.normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(
                    m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_out:
            for stage in self.stages:
                nn.init.zeros_(stage.text_out.weight)
                nn.init.zeros_(stage.text_out.bias)
                nn.init.zeros_(stage.out_scale)

    def init_weights(self) -> None:
        """mmengine's ``init_cfg`` if given, else :meth:`reset_parameters`.
        """
        if self.init_cfg:
            super().init_weights()
        else:
            self.reset_parameters()

    def _check_inputs(self, stage: int, patches: Tensor, text: Tensor,
                      hw: Tuple[int, int], carry) -> None:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f'ETRISBridger: stage {stage} out of range '
                             f'({self.num_stages} stages)')
        if patches.dim() != 3 or patches.shape[-1] != self.embed_dims or \
                patches.shape[1] != hw[0] * hw[1]:
            raise ValueError(
                f'ETRISBridger expects patches B x {hw[0] * hw[1]} x '
                f'{self.embed_dims} (hw={tuple(hw)}), got '
                f'{tuple(patches.shape)}')
        if text.dim() != 3 or text.shape[-1] != self.text_dims or \
                text.shape[0] != patches.shape[0]:
            raise ValueError(
                f'ETRISBridger expects the text stream B x L x '
                f'{self.text_dims} (text_dims), got {tuple(text.shape)}')
        if (stage > 0) != (carry is not None):
            raise ValueError(
                f'ETRISBridger: stage {stage} needs '
                f'{"the previous stage" if stage else "no"} carry; stages '
                'run in order, once each')

    def forward(self,
                stage: int,
                patches: Tensor,
                text: Tensor,
                *,
                hw: Tuple[int, int],
                text_mask: Optional[Tensor] = None,
                carry: Optional[Tuple[Tensor, Tensor]] = None
                ) -> BridgeOutput:
        """Run stage ``stage`` (see the class docstring).

        Args:
            stage: s, 0 .. S - 1, in order.
            patches: B x N x C patch tokens of the row-major h x w grid.
            text: B x L x Ct text stream (the raw residual stream).
            hw: the patch grid (h, w); non-square is fine.
            text_mask: B x L bool, True at padding (used only with
                ``key_padding=True``).
            carry: the previous stage's ``BridgeOutput.carry`` (None for
                stage 0).

        Returns:
            ``BridgeOutput(patches, text, carry)``: updated patches
            (B x N x C) and text (B x L x Ct), and (V~, T~) for stage s + 1.
        """
        self._check_inputs(stage, patches, text, hw, carry)
        m = self.stages[stage]
        B, N, C = patches.shape
        grid = patches.transpose(1, 2).reshape(B, C, *hw)
        v = m.zoom_in(grid).flatten(2).transpose(1, 2)  # B x N x d
        t = m.text_in(text)  # B x L x d
        if stage > 0:
            v_prev, t_prev = carry
            v = self.norms_v[stage - 1](v + v_prev)
            t = self.norms_t[stage - 1](t + t_prev)
        mask = None
        if self.key_padding and text_mask is not None:
            # a sample without any word keeps its keys (no NaN rows)
            mask = text_mask & ~text_mask.all(dim=1, keepdim=True)
        v_hat = v * m.attn_v(v, t, t, key_padding_mask=mask,
                             need_weights=False)[0]
        t_hat = t * m.attn_t(t, v, v, need_weights=False)[0]
        res_v = m.zoom_out(v_hat.transpose(1, 2).reshape(B, -1, *hw))
        res_v = res_v.flatten(2).transpose(1, 2)  # B x N x C, >= 0
        if m.out_scale is not None:
            res_v = res_v * m.out_scale
        return BridgeOutput(
            patches=patches + res_v, text=text + m.text_out(t_hat),
            carry=(v, t))

    def extra_repr(self) -> str:
        return (f'insert={self.insert}, zero_init_out={self.zero_init_out},'
                f' key_padding={self.key_padding}')
