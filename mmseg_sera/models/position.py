"""Fixed sine position codes shared by the backbone and the head."""
import math

import torch
from torch import Tensor

__all__ = ['sine_position_1d', 'sine_position_2d']


def sine_position_2d(height: int, width: int, channels: int,
                     device: torch.device = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2-D sine code, (h*w) x C, row-major (y, x).

    The first C/2 channels encode x, the last C/2 encode y; within each half
    channel 2i is ``sin(p * f_i)`` and 2i+1 is ``cos(p * f_i)`` with
    ``f_i = 10000^(-2i / (C/2))`` and p the integer column (row) index.
    """
    if channels % 4:
        raise ValueError(f'2-D sine code needs channels % 4 == 0, '
                         f'got {channels}')
    half = channels // 2
    freq = torch.exp(
        torch.arange(0, half, 2, device=device, dtype=torch.float32) *
        (-math.log(10000.0) / half))  # half/2
    xs = torch.arange(width, device=device, dtype=torch.float32)[:, None]
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None]
    code_x = torch.stack([(xs * freq).sin(), (xs * freq).cos()],
                         dim=-1).flatten(1)  # w x half
    code_y = torch.stack([(ys * freq).sin(), (ys * freq).cos()],
                         dim=-1).flatten(1)  # h x half
    code = torch.cat([
        code_x[None].expand(height, width, half),
        code_y[:, None].expand(height, width, half)
    ], dim=-1)
    return code.reshape(height * width, channels).to(dtype)


def sine_position_1d(length: int, channels: int,
                     device: torch.device = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard 1-D sine code, L x C: channel 2i is ``sin(p * f_i)``, 2i+1
    is ``cos(p * f_i)``, ``f_i = 10000^(-2i / C)``."""
    if channels % 2:
        raise ValueError(f'1-D sine code needs even channels, got {channels}')
    freq = torch.exp(
        torch.arange(0, channels, 2, device=device, dtype=torch.float32) *
        (-math.log(10000.0) / channels))
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    code = torch.stack([(pos * freq).sin(), (pos * freq).cos()], dim=-1)
    return code.flatten(1).to(dtype)
