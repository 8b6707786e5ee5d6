"""SegVLM's map blocks (PEERS.md 4.2-4.5): squeeze-and-excitation and
deformable refinement, optionally conditioned on the sentence.

Every block here maps x: B x C x H x W (and the pooled sentence
``state``: B x Cp) to B x C x H x W, so the head can put them anywhere a
map flows::

    SegVLMSEBlock      y = x * e,  e = sigmoid(W2 ReLU(W1 [GAP(x); W_s s]))
    DeformableRefine   y = x + SE(BN(DCNv2(x; offsets, mask from
                                           Conv3x3([x, tile(W_s s)]))))
    SegVLMRefineBlock  N DeformableRefine in a row

SegVLM's code and method section are not available: the formulas are our
reading of the abstract ("squeeze-and-excitation", "deformable
convolutions", "residual connections", "language-conditioned dynamic
kernels"), written with the standard SE (Hu et al. 2018) and DCNv2 (Zhu et
al. 2019).

DCNv2 runs on torchvision's ``deform_conv2d`` (default, no compilation) or
mmcv's compiled ``modulated_deform_conv2d``; both read the same parameters
(see :func:`modulated_deform_conv2d`).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmseg.registry import MODELS
from mmseg.utils import ConfigType
from torch import Tensor

__all__ = [
    'SegVLMSEBlock', 'DeformableRefine', 'SegVLMRefineBlock',
    'ModulatedDeformConv', 'modulated_deform_conv2d', 'DCN_BACKENDS'
]

DCN_BACKENDS = ('torchvision', 'mmcv')


def _check_backend(backend: str, owner: str) -> None:
    if backend not in DCN_BACKENDS:
        raise ValueError(f'{owner}: backend must be one of {DCN_BACKENDS}, '
                         f'got {backend!r}')


def modulated_deform_conv2d(x: Tensor, offset: Tensor, mask: Tensor,
                            weight: Tensor, bias: Optional[Tensor], *,
                            padding: int, dilation: int = 1,
                            backend: str = 'torchvision') -> Tensor:
    """DCNv2, stride 1: for every output position p and kernel point
    k = i K + j (row-major, K x K kernel, G = ``deform_groups`` offset
    groups, each for C_in / G input channels)::

        y(p) = b + sum_k w_k . x(p + p_k + (dy_gk(p), dx_gk(p))) m_gk(p)

    with bilinear sampling (zero outside the map).

    Layout, the same for both backends (read in their kernels:
    torchvision ``csrc/ops/cpu/deform_conv2d_kernel.cpp``, mmcv
    ``modulated_deform_conv_cuda_kernel.cuh`` and its CPU twin):
    ``offset`` B x 2GK^2 x H x W with channel ``g 2K^2 + 2k`` = dy and
    ``g 2K^2 + 2k + 1`` = dx (interleaved pairs, y first); ``mask``
    B x GK^2 x H x W with channel ``g K^2 + k``. mmcv's own
    ``ModulatedDeformConv2dPack`` chunks its offset-conv output into thirds
    (o1, o2, m) and passes ``cat(o1, o2)``: that is the first 2GK^2
    channels unchanged, so no reordering is needed anywhere.

    Args:
        x: B x C_in x H x W.
        offset, mask: as above (mask already in [0, 1]).
        weight: C_out x C_in x K x K; bias: C_out or None.
        padding, dilation: of the K x K kernel (stride is 1).
        backend: ``'torchvision'`` or ``'mmcv'`` (compiled mmcv ops).

    Returns:
        B x C_out x H' x W'.
    """
    _check_backend(backend, 'modulated_deform_conv2d')
    if backend == 'torchvision':
        from torchvision.ops import deform_conv2d
        return deform_conv2d(
            x, offset, weight, bias, stride=1, padding=padding,
            dilation=dilation, mask=mask)
    from mmcv.ops import modulated_deform_conv2d as mmcv_dcn
    groups = offset.shape[1] // (2 * weight.shape[-2] * weight.shape[-1])
    return mmcv_dcn(x, offset, mask, weight, bias, 1, padding, dilation, 1,
                    groups)


class ModulatedDeformConv(nn.Module):
    """A K x K DCNv2 layer (C -> C, stride 1, same size) that predicts its
    own offsets and mask: ``conv_offset`` (K x K, zero-initialised) maps
    [x; extra] to 3GK^2 channels, the first 2GK^2 are the offsets and the
    last GK^2 the mask logits (``m = sigmoid``). At initialisation the
    offsets are 0 and m = 0.5, so the layer is half a plain convolution.

    Parameter names (``weight``, ``bias``, ``conv_offset``) and the offset
    layout are those of mmcv's ``ModulatedDeformConv2dPack`` (``DCNv2``):
    with ``extra_channels=0`` its state dict loads here unchanged and gives
    the same output. Parameters: C^2 K^2 + C + (C + E) K^2 3GK^2 + 3GK^2
    (E = ``extra_channels``); C = 256, K = 3, G = 1: 590,080 + 62,235.

    Forward: x B x C x H x W, extra (B x E x H x W, or B x E tiled over the
    map; required iff E > 0) -> B x C x H x W.
    """

    def __init__(self, channels: int, *, kernel_size: int = 3,
                 deform_groups: int = 1, extra_channels: int = 0,
                 backend: str = 'torchvision') -> None:
        super().__init__()
        _check_backend(backend, type(self).__name__)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError('ModulatedDeformConv: kernel_size must be a '
                             f'positive odd int, got {kernel_size}')
        if deform_groups < 1 or channels % deform_groups:
            raise ValueError(f'ModulatedDeformConv: channels={channels} is '
                             f'not divisible by deform_groups='
                             f'{deform_groups}')
        self.channels = channels
        self.kernel_size = kernel_size
        self.deform_groups = deform_groups
        self.extra_channels = extra_channels
        self.backend = backend
        k2 = kernel_size**2
        self.weight = nn.Parameter(
            torch.empty(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_normal_(
            self.weight, mode='fan_out', nonlinearity='relu')
        self.conv_offset = nn.Conv2d(
            channels + extra_channels, 3 * deform_groups * k2, kernel_size,
            padding=kernel_size // 2)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offsets(self, x: Tensor,
                extra: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(offset B x 2GK^2 x H x W, mask B x GK^2 x H x W in (0, 1))."""
        if self.extra_channels:
            if extra is None:
                raise ValueError(
                    f'ModulatedDeformConv: extra_channels='
                    f'{self.extra_channels} needs an extra input')
            if extra.dim() == 2:
                extra = extra[:, :, None, None].expand(
                    -1, -1, x.shape[-2], x.shape[-1])
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        out = self.conv_offset(x)
        n = 2 * self.deform_groups * self.kernel_size**2
        return out[:, :n], out[:, n:].sigmoid()

    def forward(self, x: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        offset, mask = self.offsets(x, extra)
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias,
            padding=self.kernel_size // 2, backend=self.backend)


@MODELS.register_module()
class SegVLMSEBlock(nn.Module):
    """Squeeze-and-excitation (PEERS.md 4.2), optionally sentence-aware.

    With u = GAP(x) (B x C), hidden width h = max(1, C // ratio)::

        u' = [u; W_s s]        (text_cond; W_s: Cp -> h, s = ``state``)
        e  = sigmoid(W2 ReLU(W1 u' + b1) + b2)     W1: C (+ h) -> h,
                                                   W2: h -> C
        y  = x * e                                  (residual=False)
        y  = x + x * (2 e - 1)                      (residual=True)

    ``zero_init=True`` sets W2 = b2 = 0, so e = 0.5 at the start; with
    ``residual=True`` the block then starts as the identity. Parameters
    without text: 2 C h + C + h (C = 256: 8,464; 512: 33,312; 768: 74,544);
    ``text_cond`` adds Cp h + h (W_s) + h^2 (the wider W1).

    Forward: x B x C x H x W, state B x Cp (required with ``text_cond``,
    ignored otherwise) -> B x C x H x W.
    """

    def __init__(self, *, channels: int, ratio: int = 16,
                 text_cond: bool = False, text_dims: int = 512,
                 zero_init: bool = False, residual: bool = False) -> None:
        super().__init__()
        if ratio < 1:
            raise ValueError(f'SegVLMSEBlock: ratio must be >= 1, got '
                             f'{ratio}')
        hidden = max(1, channels // ratio)
        self.channels = channels
        self.hidden = hidden
        self.text_cond = text_cond
        self.residual = residual
        self.text_proj = nn.Linear(text_dims, hidden) if text_cond else None
        self.fc1 = nn.Linear(channels + (hidden if text_cond else 0), hidden)
        self.fc2 = nn.Linear(hidden, channels)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def gate(self, x: Tensor, state: Optional[Tensor] = None) -> Tensor:
        """The channel gate e: B x C, in (0, 1)."""
        u = x.mean(dim=(2, 3))
        if self.text_proj is not None:
            if state is None:
                raise ValueError('SegVLMSEBlock(text_cond=True) needs the '
                                 'pooled sentence (state)')
            u = torch.cat([u, self.text_proj(state.to(u.dtype))], dim=1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(u))))

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tensor:
        e = self.gate(x, state)[:, :, None, None]
        if self.residual:
            return x + x * (2 * e - 1)
        return x * e


@MODELS.register_module()
class DeformableRefine(nn.Module):
    """Deformable refinement (PEERS.md 4.3)::

        t      = tile(W_s s)                  B x E x H x W  (text_cond)
        Δp, m  = split(Conv3x3([x; t]))       2GK^2 + GK^2 channels,
                                              m = sigmoid; conv zero-init
        y      = x + SE(BN(DCNv2(x; Δp, m)))

    (``residual=False`` drops the ``x +``; ``se_ratio=None`` drops SE.)
    At initialisation Δp = 0 and m = 0.5: the DCN is half a plain 3x3
    convolution (kaiming-normal, fan-out). The text conditioning of the
    offsets is our reading of SegVLM's "language-conditioned dynamic
    kernels".

    Parameters: ``dcn`` (main conv + offset conv) C^2 K^2 + C +
    (C + E) 3GK^4 + 3GK^2, exactly PEERS.md's count: C = 256 -> 652,315;
    with E = 64 text channels 667,867; C = 512 -> 2,484,251. On top:
    W_s (Cp E + E, text_cond only), BN (2C) and the SE block.

    Args:
        channels: C.
        kernel_size / deform_groups: K (3) and G (1).
        text_cond: condition the offsets and mask on the sentence.
        text_dims: Cp, width of ``state``.
        text_channels: E, width of W_s s (64).
        backend: ``'torchvision'`` (default) or ``'mmcv'``; the same
            parameters give the same output under either, and the same
            gradients except for taps exactly on the top / left padding
            line (mmcv: 0, torchvision: the inward derivative; every
            border tap at initialisation; docs/peers.md). torchvision is
            the default because its CPU and CUDA kernels agree and ship
            with torch.
        norm_cfg: the norm after the DCN (BN).
        se_ratio: r of the SE block (16); ``None``: no SE.
        se_text_cond / se_zero_init: :class:`SegVLMSEBlock`'s
            ``text_cond`` / ``zero_init``.
        residual: add the input back.

    Forward: x B x C x H x W, state B x Cp (needed when text_cond or
    se_text_cond) -> B x C x H x W.
    """

    def __init__(self,
                 *,
                 channels: int,
                 kernel_size: int = 3,
                 deform_groups: int = 1,
                 text_cond: bool = False,
                 text_dims: int = 512,
                 text_channels: int = 64,
                 backend: str = 'torchvision',
                 norm_cfg: Optional[ConfigType] = dict(type='BN'),
                 se_ratio: Optional[int] = 16,
                 se_text_cond: bool = False,
                 se_zero_init: bool = False,
                 residual: bool = True) -> None:
        super().__init__()
        _check_backend(backend, type(self).__name__)
        self.text_proj = (nn.Linear(text_dims, text_channels)
                          if text_cond else None)
        self.dcn = ModulatedDeformConv(
            channels, kernel_size=kernel_size, deform_groups=deform_groups,
            extra_channels=text_channels if text_cond else 0,
            backend=backend)
        self.norm = (build_norm_layer(norm_cfg, channels)[1]
                     if norm_cfg is not None else nn.Identity())
        self.se = None
        if se_ratio is not None:
            self.se = SegVLMSEBlock(
                channels=channels, ratio=se_ratio, text_cond=se_text_cond,
                text_dims=text_dims, zero_init=se_zero_init)
        self.residual = residual

    @property
    def backend(self) -> str:
        return self.dcn.backend

    @backend.setter
    def backend(self, value: str) -> None:
        _check_backend(value, type(self).__name__)
        self.dcn.backend = value

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tensor:
        extra = None
        if self.text_proj is not None:
            if state is None:
                raise ValueError('DeformableRefine(text_cond=True) needs '
                                 'the pooled sentence (state)')
            extra = self.text_proj(state.to(x.dtype))
        y = self.norm(self.dcn(x, extra))
        if self.se is not None:
            y = self.se(y, state)
        return x + y if self.residual else y


@MODELS.register_module()
class SegVLMRefineBlock(nn.Module):
    """SegVLM's stackable refinement unit (PEERS.md 4.5): ``num_blocks``
    :class:`DeformableRefine` blocks in a row, each
    ``x <- x + SE(BN(DCNv2(x)))`` (DeformableRefine + SegVLMSEBlock +
    residual). The sentence ``state`` reaches every block.

    Args:
        channels: C.
        num_blocks: N >= 1.
        block_cfg: :class:`DeformableRefine`'s other arguments (not
            ``residual``, always on), shared by the N blocks.

    Forward: x B x C x H x W, state B x Cp -> B x C x H x W.
    """

    def __init__(self, *, channels: int, num_blocks: int = 1,
                 **block_cfg) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f'SegVLMRefineBlock: num_blocks must be >= 1, '
                             f'got {num_blocks}')
        # one argument list, DeformableRefine's (residual always on here)
        self.blocks = nn.ModuleList(
            DeformableRefine(channels=channels, residual=True, **block_cfg)
            for _ in range(num_blocks))

    def forward(self, x: Tensor, state: Optional[Tensor] = None) -> Tensor:
        for block in self.blocks:
            x = block(x, state)
        return x
