"""Dense mixture of convolutions (DETRIS "D-MoC"), in 1-D and 2-D."""
from typing import Sequence

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def conv_bn_relu(ndim: int, in_dims: int, out_dims: int, kernel_size: int,
                 bn_eps: float) -> nn.Sequential:
    """CBR_k: Conv (bias, 'same' padding k // 2) + BatchNorm + ReLU."""
    return nn.Sequential(
        _CONV[ndim](in_dims, out_dims, kernel_size,
                    padding=kernel_size // 2, bias=True),
        _NORM[ndim](out_dims, eps=bn_eps),
        nn.ReLU(inplace=True))


def _as_int(value: float, what: str) -> int:
    n = int(round(value))
    if n < 1 or abs(n - value) > 1e-6:
        raise ValueError(f'DenseMoC: {what} = {value} must be a positive '
                         'integer')
    return n


@MODELS.register_module()
class DenseMoC(BaseModule):
    """Dense multi-scale convolutions: branch k sees the input concatenated
    with every earlier branch output (DenseNet-style), kernels grow 1 -> 3
    -> 5. With X the input (B x D x L or B x D x h x w), w_k = D * ratios[k]
    and b = D * bottleneck::

        b_1 = CBR_1(D -> w_1)(X)
        b_2 = CBR_3(b -> w_2)(CBR_1(D + w_1 -> b)([X, b_1]))
        b_3 = CBR_5(b -> w_3)(CBR_1(D + w_1 + w_2 -> b)([X, b_1, b_2]))
        out = [b_1, b_2, b_3]  (+ X if inner_residual)

    CBR_k = Conv (with bias, padding k // 2) + BatchNorm (eps ``bn_eps``) +
    ReLU; ``[.]`` concatenates channels. Output: B x sum(w_k) x (same
    spatial size). DETRIS uses it in the Dense Aligner (2-D,
    ``inner_residual=True``; 20,656 parameters at D = 128) and the Text
    Adapter (1-D over word tokens, ``inner_residual=False``; 3,608 at D =
    64). PyTorch default initialisation.

    Args:
        dims: D, the input channels.
        ndim: 2 (B x D x h x w maps) or 1 (B x D x L sequences).
        ratios: branch widths as fractions of D (each D * r an integer).
        bottleneck: width of the 1x1 bottleneck before branches 2.. as a
            fraction of D.
        kernel_sizes: the branch kernels (odd; one per ratio).
        inner_residual: add X to the concatenated branches (needs
            sum(ratios) = 1).
        bn_eps: BatchNorm epsilon (1e-3 in DETRIS).
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 *,
                 dims: int,
                 ndim: int = 2,
                 ratios: Sequence[float] = (1 / 2, 1 / 4, 1 / 4),
                 bottleneck: float = 1 / 16,
                 kernel_sizes: Sequence[int] = (1, 3, 5),
                 inner_residual: bool = True,
                 bn_eps: float = 1e-3,
                 init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        if ndim not in _CONV:
            raise ValueError(f'DenseMoC: ndim must be 1 or 2, got {ndim}')
        if len(ratios) != len(kernel_sizes) or not ratios:
            raise ValueError(
                f'DenseMoC: {len(ratios)} ratios but {len(kernel_sizes)} '
                'kernel sizes; give one ratio per branch')
        if any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError('DenseMoC: kernel_sizes must be odd, got '
                             f'{tuple(kernel_sizes)}')
        widths = [
            _as_int(dims * r, f'dims * ratios[{k}]')
            for k, r in enumerate(ratios)
        ]
        neck = _as_int(dims * bottleneck, 'dims * bottleneck')
        if inner_residual and sum(widths) != dims:
            raise ValueError(
                f'DenseMoC: inner_residual adds X (D = {dims}) to the '
                f'branches ({sum(widths)} channels); ratios must sum to 1')
        self.dims = dims
        self.ndim = ndim
        self.out_dims = sum(widths)
        self.inner_residual = inner_residual
        self.branches = nn.ModuleList()
        seen = dims  # channels of [X, b_1, ..., b_{k-1}]
        for k, (width, ks) in enumerate(zip(widths, kernel_sizes)):
            if k == 0:
                branch = conv_bn_relu(ndim, dims, width, ks, bn_eps)
            else:
                branch = nn.Sequential(
                    conv_bn_relu(ndim, seen, neck, 1, bn_eps),
                    conv_bn_relu(ndim, neck, width, ks, bn_eps))
            self.branches.append(branch)
            seen += width

    def forward(self, x: Tensor) -> Tensor:
        """B x D x (L | h x w) -> B x sum(w_k) x (L | h x w)."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.dims:
            raise ValueError(
                f'DenseMoC ({self.ndim}-D) expects B x {self.dims} x '
                f'{"L" if self.ndim == 1 else "h x w"}, got {tuple(x.shape)}')
        dense = [x]
        for k, branch in enumerate(self.branches):
            inp = x if k == 0 else torch.cat(dense, dim=1)
            dense.append(branch(inp))
        out = torch.cat(dense[1:], dim=1)
        return out + x if self.inner_residual else out

    def extra_repr(self) -> str:
        return (f'dims={self.dims}, ndim={self.ndim}, out_dims='
                f'{self.out_dims}, inner_residual={self.inner_residual}')
