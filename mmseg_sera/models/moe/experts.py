"""Dense experts: ``B x C x h x w`` -> ``B x C x h x w`` feature refiners.

Fusion-level experts (SERA-Fusion, one of them per routed sample):

* :class:`SpatialExpert`  ``X + alpha * Conv1x1(coords)``
* :class:`ContextExpert`  flatten -> pre-norm MHSA -> pre-norm FFN, residuals
* :class:`BoundaryExpert` fixed Sobel,
  ``X + phi(Conv1x1([X, G_mag, G_x + G_y]))``
* :class:`ShapeExpert`    ``X + phi(Conv1x1([blur(X), laplacian(X)]))``

Light experts (SERA-Adapter, run on every sample with soft weights):

* :class:`DWConvBoundaryExpert` ``ReLU(BN(G + beta * DWConv3x3(G)))``
* :class:`DWConvSpatialExpert`  ``phi(DWConv3x3(G)) + alpha * G``

Fixed filters (Sobel, Laplacian, fixed blur) are persistent buffers, not
parameters: they are saved in the state dict but never trained. Every filter
pads with edge replication, so a constant map has zero gradient also at the
border (zero padding would fake an edge along the image frame).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

__all__ = [
    'coord_grid', 'SpatialExpert', 'ContextExpert', 'BoundaryExpert',
    'ShapeExpert', 'DWConvBoundaryExpert', 'DWConvSpatialExpert'
]


def coord_grid(h: int, w: int, *, device: Optional[torch.device] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised coordinate grid, ``1 x 2 x h x w``.

    Channel 0 is x (``linspace(-1, 1, w)`` along the width), channel 1 is y
    (``linspace(-1, 1, h)`` along the height). A side of length 1 gets 0.
    """

    def axis(n: int) -> Tensor:
        if n == 1:
            return torch.zeros(1, device=device, dtype=dtype)
        return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)

    ys, xs = torch.meshgrid(axis(h), axis(w), indexing='ij')
    return torch.stack([xs, ys], dim=0).unsqueeze(0)


def _pad_replicate(x: Tensor, p: int) -> Tensor:
    """``F.pad(x, (p, p, p, p), mode='replicate')`` as two index gathers.

    Same values and gradients; written this way because Inductor
    (``torch.compile``, CPU, torch 2.14) mis-predicts the strides of the
    replication-pad backward kernel and stops with an assertion.
    """
    H, W = x.shape[-2:]
    rows = torch.arange(-p, H + p, device=x.device).clamp_(0, H - 1)
    cols = torch.arange(-p, W + p, device=x.device).clamp_(0, W - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _depthwise(x: Tensor, kernel: Tensor) -> Tensor:
    """Apply one k x k ``kernel`` (``K x 1 x k x k``, K filters) to every
    channel of ``x`` (``B x C x h x w``) with replicate padding.

    Returns ``B x C x K x h x w``.
    """
    B, C, H, W = x.shape
    K, _, k, _ = kernel.shape
    p = k // 2
    xp = _pad_replicate(x, p)
    weight = kernel.to(dtype=x.dtype).repeat(C, 1, 1, 1)  # (C*K) x 1 x k x k
    y = F.conv2d(xp, weight, groups=C)
    return y.view(B, C, K, H, W)


def _binomial_kernel(size: int) -> Tensor:
    """Normalised 2-D binomial (discrete Gaussian) kernel, ``size x size``."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)],
                       dtype=torch.float32)
    k2 = torch.outer(row, row)
    return k2 / k2.sum()


class _DenseExpert(BaseModule):
    """Shared input check of the dense experts."""

    def __init__(self, channels: int, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if channels < 1:
            raise ValueError(f'{type(self).__name__}: channels must be '
                             f'positive, got {channels}')
        self.channels = channels

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f'{type(self).__name__} expects B x '
                             f'{self.channels} x h x w, got {tuple(x.shape)}')

    def extra_repr(self) -> str:
        return f'channels={self.channels}'


@MODELS.register_module()
class SpatialExpert(_DenseExpert):
    """Positional expert: ``E(X) = X + alpha * Conv1x1(coords)``.

    ``coords`` is :func:`coord_grid` built at run time for the input size
    (2 channels, x then y, in [-1, 1]); ``Conv1x1`` (2 -> C, with bias)
    turns it into a learned per-channel linear ramp.

    Args:
        channels: C.
        alpha: scale of the positional term (the paper gives none; 0.1 keeps
            the expert close to the identity at start).
        learnable_alpha: make ``alpha`` a trained scalar parameter
            (initialised to ``alpha``) instead of a fixed constant.
    """

    def __init__(self,
                 channels: int,
                 *,
                 alpha: float = 0.1,
                 learnable_alpha: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(channels, init_cfg)
        self.coord_proj = nn.Conv2d(2, channels, 1)
        if learnable_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:
            self.register_buffer('alpha', torch.tensor(float(alpha)),
                                 persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x h x w``."""
        self._check(x)
        grid = coord_grid(*x.shape[-2:], device=x.device,
                          dtype=self.coord_proj.weight.dtype)
        return x + (self.alpha * self.coord_proj(grid)).to(x.dtype)


@MODELS.register_module()
class ContextExpert(_DenseExpert):
    """Long-range context expert (a pre-norm Transformer encoder layer).

    With ``T = flatten(X)`` (``B x hw x C``)::

        T = T + MHSA(LN(T))
        T = T + FFN(LN(T)),   FFN = Linear(C, r C) -> GELU -> Linear(r C, C)

    and the result reshaped back to ``B x C x h x w``. No positional code is
    added (position is the spatial expert's job).

    Args:
        channels: C.
        num_heads: attention heads (C must be divisible by it).
        ffn_ratio: hidden width factor r of the FFN.
        dropout: dropout on attention weights and FFN output.
        act_cfg: FFN activation.
    """

    def __init__(self,
                 channels: int,
                 *,
                 num_heads: int = 8,
                 ffn_ratio: float = 2.0,
                 dropout: float = 0.0,
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(channels, init_cfg)
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f'ContextExpert: channels={channels} must be '
                             f'divisible by num_heads={num_heads}')
        hidden = max(1, int(round(channels * ffn_ratio)))
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(
            channels, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, hidden), build_activation_layer(act_cfg),
            nn.Linear(hidden, channels), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x h x w``."""
        self._check(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # B x hw x C
        q = self.norm1(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.ffn(self.norm2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


@MODELS.register_module()
class BoundaryExpert(_DenseExpert):
    """Sobel boundary expert.

    Per channel (depthwise, fixed kernels, replicate padding)::

        G_x = S_x * X,   G_y = S_y * X,   G_mag = sqrt(G_x^2 + G_y^2 + eps)
        E(X) = X + phi(Conv1x1([X, G_mag, G_x + G_y]))     (3C -> C)

    with ``S_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8``, ``S_y = S_x^T``
    (the 1/8 makes them central-difference derivative estimates) and
    ``phi`` = GELU. ``eps`` keeps the square root differentiable on flat
    regions. The Sobel kernels are a persistent buffer ``sobel``
    (``2 x 1 x 3 x 3``), not parameters.

    Args:
        channels: C.
        eps: inside the magnitude's square root.
        act_cfg: phi.
    """

    def __init__(self,
                 channels: int,
                 *,
                 eps: float = 1e-6,
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(channels, init_cfg)
        sx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]) / 8
        self.register_buffer(
            'sobel', torch.stack([sx, sx.t()]).unsqueeze(1), persistent=True)
        self.eps = eps
        self.proj = nn.Conv2d(3 * channels, channels, 1)
        self.act = build_activation_layer(act_cfg)

    def gradients(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x 2 x h x w`` (``G_x``, ``G_y``)."""
        return _depthwise(x, self.sobel)

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x h x w``."""
        self._check(x)
        g = self.gradients(x)
        gx, gy = g[:, :, 0], g[:, :, 1]
        mag = torch.sqrt(gx * gx + gy * gy + self.eps)
        return x + self.act(self.proj(torch.cat([x, mag, gx + gy], dim=1)))


@MODELS.register_module()
class ShapeExpert(_DenseExpert):
    """Shape expert: low-pass and high-pass branches, residual.

    Per channel (depthwise, replicate padding)::

        L = blur * X                  (binomial k x k low-pass)
        H = Lap * X,  Lap = [[0, 1, 0], [1, -4, 1], [0, 1, 0]]   (fixed)
        E(X) = X + phi(Conv1x1([L, H]))                          (2C -> C)

    ``phi`` = GELU. The blur is fixed (a buffer) by default; with
    ``learnable_blur=True`` it is a per-channel depthwise parameter
    initialised to the same binomial kernel. The Laplacian is always fixed.

    Args:
        channels: C.
        blur_kernel_size: odd k of the blur (5 by default: a wider low-pass
            than the 3 x 3 Laplacian, for coarse structure).
        learnable_blur: train the blur kernel.
        act_cfg: phi.
    """

    def __init__(self,
                 channels: int,
                 *,
                 blur_kernel_size: int = 5,
                 learnable_blur: bool = False,
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(channels, init_cfg)
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise ValueError('ShapeExpert: blur_kernel_size must be a '
                             f'positive odd number, got {blur_kernel_size}')
        self.blur_kernel_size = blur_kernel_size
        self.learnable_blur = learnable_blur
        blur = _binomial_kernel(blur_kernel_size)[None, None]
        if learnable_blur:
            self.blur = nn.Parameter(blur.repeat(channels, 1, 1, 1))
        else:
            self.register_buffer('blur', blur, persistent=True)
        lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])
        self.register_buffer('laplacian', lap[None, None], persistent=True)
        self.proj = nn.Conv2d(2 * channels, channels, 1)
        self.act = build_activation_layer(act_cfg)

    def init_weights(self) -> None:
        super().init_weights()
        if self.learnable_blur:
            kernel = _binomial_kernel(self.blur_kernel_size)[None, None]
            with torch.no_grad():
                self.blur.copy_(kernel.expand_as(self.blur))

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x h x w``."""
        self._check(x)
        if self.learnable_blur:
            p = self.blur_kernel_size // 2
            low = F.conv2d(_pad_replicate(x, p),
                           self.blur.to(x.dtype), groups=self.channels)
        else:
            low = _depthwise(x, self.blur)[:, :, 0]
        high = _depthwise(x, self.laplacian)[:, :, 0]
        return x + self.act(self.proj(torch.cat([low, high], dim=1)))


@MODELS.register_module()
class DWConvBoundaryExpert(_DenseExpert):
    """Light boundary expert (SERA-Adapter):
    ``B = ReLU(Norm(G + beta * DWConv3x3(G)))``.

    ``DWConv3x3`` is a learnable depthwise 3 x 3 conv (with bias, zero
    padding); Norm is BatchNorm by default.

    Args:
        channels: C.
        beta: scale of the depthwise branch (paper: 0.1).
        norm_cfg: mmcv norm config.
    """

    def __init__(self,
                 channels: int,
                 *,
                 beta: float = 0.1,
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(channels, init_cfg)
        self.beta = float(beta)
        self.dwconv = nn.Conv2d(
            channels, channels, 3, padding=1, groups=channels)
        self.norm = build_norm_layer(norm_cfg, channels)[1]
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x h x w``."""
        self._check(x)
        return self.act(self.norm(x + self.beta * self.dwconv(x)))


@MODELS.register_module()
class DWConvSpatialExpert(_DenseExpert):
    """Light spatial-consistency expert (SERA-Adapter):
    ``S = phi(DWConv3x3(G)) + alpha * G``, phi = GELU.

    Args:
        channels: C.
        alpha: scale of the identity path (paper: 0.3).
        act_cfg: phi.
    """

    def __init__(self,
                 channels: int,
                 *,
                 alpha: float = 0.3,
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(channels, init_cfg)
        self.alpha = float(alpha)
        self.dwconv = nn.Conv2d(
            channels, channels, 3, padding=1, groups=channels)
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x C x h x w``."""
        self._check(x)
        return self.act(self.dwconv(x)) + self.alpha * x
