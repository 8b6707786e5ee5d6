"""Axial rotary position encoding (RoPE) of the DINOv3 ViTs.

For an h x w patch grid and a head width d (``d % 4 == 0``), with
``P = (p_0 .. p_{d/4-1})`` the periods::

    y_r = 2 (r + 1/2) / h - 1,   x_c = 2 (c + 1/2) / w - 1   (in [-1, 1])
    a   = 2 pi [y / P, x / P]          (d/2 angles per patch, y half first)
    sin, cos of [a, a]                 ((h*w) x d each)
    rope(t) = t * cos + rotate_half(t) * sin,  rotate_half([u, v]) = [-v, u]

Each axis is normalised on its own ("separate"), so a non-square grid is
stretched to [-1, 1] on both axes. The rotation applies to the queries and
keys of the patch tokens only: the prefix tokens (class, registers) that
come first get none. The default periods are ``base ** (4 j / d)``,
j = 0 .. d/4 - 1 (``base`` 100).

The periods are a persistent buffer, so that a checkpoint's own values
travel with it: the official DINOv3 weights store them rounded to bfloat16
(1, 1.3359375, 1.78125, ...), while timm recomputes them in float32; the
two give features about 2e-3 apart on the same weights (see
``tools/model_converters/dinov3_to_sera.py`` and ``docs/backbone.md``).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

#: (sin, cos) of the patch grid, each (h*w) x d (float32)
RopeTables = Tuple[Tensor, Tensor]

#: how the periods are obtained: the checkpoint's stored values, or
#: ``base ** (4 j / d)`` recomputed in float32
PERIOD_MODES = ('stored', 'fp32')


def rope_periods(head_dims: int, base: float,
                 dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> Tensor:
    """``base ** (2 j / (d / 2))`` (= ``base ** (4 j / d)``) for
    j = 0 .. d/4 - 1, computed in ``dtype`` (d/4 values)."""
    j = torch.arange(head_dims // 4, dtype=dtype, device=device)
    return base**(2 * j / (head_dims // 2))


def rotate_half(t: Tensor) -> Tensor:
    """``[u, v] -> [-v, u]`` on the last dimension (halves u, v)."""
    u, v = t.chunk(2, dim=-1)
    return torch.cat([-v, u], dim=-1)


def apply_rope(q: Tensor, k: Tensor,
               tables: RopeTables) -> Tuple[Tensor, Tensor]:
    """Rotate the last h*w tokens of q and k (B x heads x N x d).

    The first ``N - h*w`` tokens (class, registers) pass unchanged. The
    rotation runs in the tables' dtype (float32) and the result is cast back
    to the input dtype, as the official code does with float32 RoPE.
    """
    sin, cos = tables
    n = sin.shape[-2]
    P = q.shape[-2] - n
    if P < 0:
        raise ValueError(f'RoPE tables for {n} patches, but only '
                         f'{q.shape[-2]} tokens')

    def rotate(t: Tensor) -> Tensor:
        patches = t[..., P:, :].to(sin.dtype)
        patches = patches * cos + rotate_half(patches) * sin
        return torch.cat([t[..., :P, :], patches.to(t.dtype)], dim=-2)

    return rotate(q), rotate(k)


class AxialRoPE(nn.Module):
    """Sine/cosine tables of the axial RoPE for an h x w grid.

    Args:
        head_dims: per-head width d (a multiple of 4).
        base: period base; periods ``base ** (4 j / d)``.
        rescale_coords: in training mode only, every call multiplies the
            coordinates by one scale drawn log-uniformly in
            ``[1 / rescale_coords, rescale_coords]`` (DINOv3 pre-training
            uses 2). None: never. A frozen backbone keeps this module in
            eval mode, so it never fires there.
        mode: ``'stored'``: the ``periods`` buffer as loaded (float32
            ``base ** (4 j / d)`` until a checkpoint overwrites it);
            ``'fp32'``: ``base ** (4 j / d)`` recomputed in float32 on
            every call, whatever the buffer holds. Settable (``.mode``).

    Buffer ``periods`` (d/4, persistent): the checkpoint's periods.
    """

    def __init__(self, *, head_dims: int, base: float = 100.,
                 rescale_coords: Optional[float] = None,
                 mode: str = 'stored') -> None:
        super().__init__()
        if head_dims % 4:
            raise ValueError(f'RoPE needs a head width divisible by 4, got '
                             f'{head_dims}')
        if rescale_coords is not None and rescale_coords < 1:
            raise ValueError('rescale_coords must be >= 1 (or None), got '
                             f'{rescale_coords}')
        self.head_dims = head_dims
        self.base = float(base)
        self.rescale_coords = rescale_coords
        self.register_buffer('periods', rope_periods(head_dims, self.base))
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in PERIOD_MODES:
            raise ValueError(f'RoPE period mode must be one of '
                             f'{PERIOD_MODES}, got {value!r}')
        self._mode = value

    def current_periods(self) -> Tensor:
        """The periods the forward uses (d/4, float32; see ``mode``)."""
        if self.mode == 'fp32':
            return rope_periods(self.head_dims, self.base,
                                device=self.periods.device)
        return self.periods.float()

    def forward(self, h: int, w: int) -> RopeTables:
        """(sin, cos) for an h x w grid, each (h*w) x d, float32."""
        dd = dict(dtype=torch.float32, device=self.periods.device)
        ys = (torch.arange(h, **dd) + 0.5) / h
        xs = (torch.arange(w, **dd) + 0.5) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)
        coords = 2 * coords.flatten(0, 1) - 1  # (h*w) x 2, (y, x)
        if self.training and self.rescale_coords is not None:
            log_s = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-log_s,
                                                            log_s).exp()
        periods = self.current_periods()
        angles = 2 * math.pi * coords[:, :, None] / periods  # hw x 2 x d/4
        angles = angles.flatten(1).tile(2)  # hw x d
        return torch.sin(angles), torch.cos(angles)

    def extra_repr(self) -> str:
        return (f'head_dims={self.head_dims}, base={self.base}, '
                f'rescale_coords={self.rescale_coords}, mode={self.mode!r}')
