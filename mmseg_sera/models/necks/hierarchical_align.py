"""Hierarchical alignment neck of the CRIS lineage (ETRIS "HA", DETRIS
"Neck"): three backbone levels gated by the sentence, fused into one map,
then two coordinate-aware 3x3 convolutions.

With F_i: B x C_i x h x w (one grid for all levels), s: B x Ct the sentence
and d = ``channels`` (512 in the peers)::

    s'  = W_s s + b_s                                  Linear Ct -> d
    G_i = CBR_1x1(F_i): C_i -> d        (the last level: 1x1 ConvTranspose)
    Q_i = G_i * g_i(s')                 per-channel sentence gate
    A   = CBR_1x1([Q_1, ..., Q_n]): n d -> d
    C   = CBR_3x3(CBR_3x3([A, x, y]))   x, y = linspace(-1, 1) grids
    out = C        (coord_residual=False, ETRIS)
    out = A + C    (coord_residual=True, DETRIS)

CBR = conv + BatchNorm + ReLU (conv without bias when a norm follows).
"""
import math
import re
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..structures import NeckOutput, TextFeatures

__all__ = [
    'HierarchicalAlignNeck', 'SentenceGate', 'conv_norm_act',
    'add_coord_channels', 'mha_gate_to_linear'
]

_GATES = ('mha', 'linear')


def conv_norm_act(in_channels: int,
                  out_channels: int,
                  kernel_size: int,
                  *,
                  transpose: bool = False,
                  norm_cfg: Optional[dict] = dict(type='BN'),
                  act_cfg: Optional[dict] = dict(type='ReLU')
                  ) -> nn.Sequential:
    """CBR: ``conv`` (or ``ConvTranspose2d`` with ``transpose``), stride 1,
    padding ``k // 2``, then ``bn`` and ``act`` (either omitted when its
    config is ``None``). The conv has a bias only without a norm.

    All layers keep PyTorch's default initialisation (as the CRIS-lineage
    peers; mmcv's ``ConvModule`` would re-initialise the conv with Kaiming
    normal).
    """
    conv_type = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers = OrderedDict(
        conv=conv_type(
            in_channels, out_channels, kernel_size,
            padding=kernel_size // 2, bias=norm_cfg is None))
    if norm_cfg is not None:
        layers['bn'] = build_norm_layer(norm_cfg, out_channels)[1]
    if act_cfg is not None:
        layers['act'] = build_activation_layer(act_cfg)
    return nn.Sequential(layers)


def add_coord_channels(x: Tensor) -> Tensor:
    """CoordConv input: B x C x h x w -> B x (C + 2) x h x w, the last two
    channels ``x[j] = linspace(-1, 1, w)[j]`` (x first) and
    ``y[i] = linspace(-1, 1, h)[i]``."""
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])
    return torch.cat([x, grid[None].expand(b, 2, h, w)], dim=1)


class SentenceGate(nn.Module):
    """Per-channel sentence gate ``G * g`` of the hierarchical neck.

    ``mode='mha'`` (faithful): ``g = MHA(q = G, k = s', v = s')`` with
    ``nn.MultiheadAttention(d, num_heads)`` and the sentence as its only key.
    A softmax over one key is the constant 1, so the output does not depend
    on the query::

        g = W_o (W_v s' + b_v) + b_o                      B x d

    and the q/k rows of ``in_proj`` get no gradient. ``mode='linear'``
    computes this formula directly with two ``Linear(d, d)`` (``value``,
    ``out``): the same function with 2 d^2 + 2 d parameters instead of the
    MHA's 4 d^2 + 4 d (no dead q/k projections). Its initialisation draws
    from the distributions the MHA gives its v and out slices
    (xavier-uniform over the 3d x d ``in_proj``, PyTorch's Linear default
    for ``out``, zero biases). :func:`mha_gate_to_linear` converts weights.

    Forward: G: B x d x h x w, s': B x d -> G * g, B x d x h x w.
    """

    def __init__(self, *, dims: int, num_heads: int = 8,
                 mode: str = 'mha') -> None:
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f'SentenceGate: mode must be one of {_GATES}, '
                             f'got {mode!r}')
        self.mode = mode
        if mode == 'mha':
            self.attn = nn.MultiheadAttention(
                dims, num_heads, batch_first=True)
        else:
            self.value = nn.Linear(dims, dims)
            self.out = nn.Linear(dims, dims)
            # xavier-uniform bound of the MHA's 3d x d in_proj
            bound = math.sqrt(6.0 / (dims + 3 * dims))
            nn.init.uniform_(self.value.weight, -bound, bound)
            nn.init.zeros_(self.value.bias)
            nn.init.zeros_(self.out.bias)

    def gate(self, x: Tensor, sentence: Tensor) -> Tensor:
        """The gate: B x N x d (``mha``, one row per query pixel) or
        B x 1 x d (``linear``) for x: B x N x d, sentence: B x d."""
        s = sentence[:, None]  # B x 1 x d, the only key
        if self.mode == 'mha':
            return self.attn(x, s, s, need_weights=False)[0]
        return self.out(self.value(s))

    def forward(self, x: Tensor, sentence: Tensor) -> Tensor:
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B x hw x d
        g = self.gate(tokens, sentence.to(x.dtype))
        return (tokens * g).transpose(1, 2).reshape(b, d, h, w)


def mha_gate_to_linear(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Neck state dict with ``gate='mha'`` -> the same neck with
    ``gate='linear'`` (pure function; other keys are copied).

    For each ``<p>.attn.in_proj_weight`` (3d x d, rows q, k, v) of a
    :class:`SentenceGate`: ``<p>.value.{weight,bias}`` = the v rows of
    ``in_proj_{weight,bias}`` and ``<p>.out.*`` = ``<p>.attn.out_proj.*``;
    the q/k rows are dropped.
    """
    out = OrderedDict()
    pattern = re.compile(r'^(.*)\.attn\.(in_proj_weight|in_proj_bias|'
                         r'out_proj\.weight|out_proj\.bias)$')
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, name = match.groups()
        if name.startswith('in_proj'):
            d = value.shape[0] // 3
            kind = name.split('_')[-1]  # weight | bias
            out[f'{prefix}.value.{kind}'] = value[2 * d:].clone()
        else:
            out[f'{prefix}.out.{name.split(".")[-1]}'] = value.clone()
    return out


@MODELS.register_module()
class HierarchicalAlignNeck(BaseModule):
    """Hierarchical alignment neck (PEERS.md 1.3); see the module docstring
    for the formulas.

    Inputs: ``feats``, n maps B x C_i x h x w on one grid (any h x w,
    non-square included), and ``text`` (uses ``text.pooled``, B x Ct).
    Output: ``NeckOutput(feats=(B x d x h x w, ))``.

    Parameters at the peer widths (d = Ct = 512, 8 heads, ``gate='mha'``):
    10,114,560 with ``in_channels=(768, 768, 768)`` (DETRIS), 9,983,488 with
    ``(768, 768, 512)`` (ETRIS); ``gate='linear'`` saves 525,312 per level.

    Args:
        in_channels: C_i per level; the last level is projected by a 1x1
            ConvTranspose (as the peers), the others by a 1x1 Conv.
        channels: d, the width of every map after the projections.
        text_dims: Ct, width of ``text.pooled``.
        num_heads: heads of the ``mha`` gate (no effect on the function).
        gate: ``'mha'`` (faithful: the peers' tensors, same shapes and
            layout; their keys are renamed by
            :mod:`mmseg_sera.models.peer_checkpoints`) or ``'linear'`` (the
            same function without the dead q/k parameters); see
            :class:`SentenceGate`.
        coord_residual: ``False``: out = C (ETRIS); ``True``: out = A + C
            (DETRIS).
        norm_cfg, act_cfg: of every CBR (SyncBN in the peers' multi-GPU
            runs).
        init_cfg: mmengine init config; none by default (PyTorch defaults,
            as the peers).
    """

    def __init__(self,
                 *,
                 in_channels: Sequence[int] = (768, 768, 768),
                 channels: int = 512,
                 text_dims: int = 512,
                 num_heads: int = 8,
                 gate: str = 'mha',
                 coord_residual: bool = False,
                 norm_cfg: Optional[dict] = dict(type='BN'),
                 act_cfg: Optional[dict] = dict(type='ReLU'),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        in_channels = [int(c) for c in in_channels]
        if not in_channels or min(in_channels) < 1:
            raise ValueError('HierarchicalAlignNeck: in_channels must be a '
                             f'non-empty list of positive ints, got '
                             f'{in_channels}')
        if gate not in _GATES:
            raise ValueError(f'HierarchicalAlignNeck: gate must be one of '
                             f'{_GATES}, got {gate!r}')
        if gate == 'mha' and channels % num_heads:
            raise ValueError(f'HierarchicalAlignNeck: channels={channels} is '
                             f'not divisible by num_heads={num_heads}')
        self.in_channels = in_channels
        self.channels = d = channels
        self.text_dims = text_dims
        self.gate = gate
        self.coord_residual = coord_residual
        cbr = dict(norm_cfg=norm_cfg, act_cfg=act_cfg)

        self.txt_proj = nn.Linear(text_dims, d)
        last = len(in_channels) - 1
        self.projs = nn.ModuleList(
            conv_norm_act(c, d, 1, transpose=i == last, **cbr)
            for i, c in enumerate(in_channels))
        self.gates = nn.ModuleList(
            SentenceGate(dims=d, num_heads=num_heads, mode=gate)
            for _ in in_channels)
        self.aggr = conv_norm_act(len(in_channels) * d, d, 1, **cbr)
        self.coord_convs = nn.Sequential(
            conv_norm_act(d + 2, d, 3, **cbr), conv_norm_act(d, d, 3, **cbr))

    def _check_inputs(self, feats: Sequence[Tensor],
                      text: TextFeatures) -> None:
        if len(feats) != len(self.in_channels):
            raise ValueError(f'HierarchicalAlignNeck: expected '
                             f'{len(self.in_channels)} maps, got {len(feats)}')
        grid = feats[0].shape[-2:]
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c or f.shape[-2:] != grid:
                raise ValueError(
                    f'HierarchicalAlignNeck: map {i} has shape '
                    f'{tuple(f.shape)}; expected B x {c} x '
                    f'{grid[0]} x {grid[1]} (one grid for all levels)')
        pooled = text.pooled
        if pooled.shape != (feats[0].shape[0], self.text_dims):
            raise ValueError(
                f'HierarchicalAlignNeck: text.pooled has shape '
                f'{tuple(pooled.shape)}; expected {feats[0].shape[0]} x '
                f'{self.text_dims}')

    def fuse(self, feats: Sequence[Tensor], text: TextFeatures) -> Tensor:
        """A = CBR_1x1([G_i * g_i(s')]_i): B x d x h x w."""
        s = self.txt_proj(text.pooled.to(feats[0].dtype))
        gated = [
            gate(proj(f), s)
            for f, proj, gate in zip(feats, self.projs, self.gates)
        ]
        return self.aggr(torch.cat(gated, dim=1))

    def forward(self, feats: Sequence[Tensor],
                text: TextFeatures) -> NeckOutput:
        """feats: n maps B x C_i x h x w, text: TextFeatures ->
        ``NeckOutput(feats=(B x d x h x w, ))``."""
        self._check_inputs(feats, text)
        a = self.fuse(feats, text)
        c = self.coord_convs(add_coord_channels(a))
        return NeckOutput(feats=(a + c if self.coord_residual else c, ))
