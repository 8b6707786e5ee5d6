"""Two DINOv2 towers, the second feeding the adapters of the first.

SpectralMoE (PEERS.md 5) adapts a frozen foundation model with routed
low-rank experts after every block; a second frozen backbone (a depth
network on a DINOv2-L encoder in the release) adds its block-l tokens as a
second modality to the adapter of block l. :class:`DualStreamDINOv2` wires
that up for mmseg's stock segmentors::

    x: B x bands x H x W
    ├─ x[:, second_bands] ─> second.block_tokens ─> g_0 .. g_{L2-1}
    │                                              (B x N2 x C2, no grad)
    └─ x[:, backbone_bands] ─> backbone blocks; after block l its
       post_block adapter gets A(f_l, hw, second=g_{block_map[l]})
       ─> out_indices maps ─> (optional out_scales) ─> BackboneFeatures

:class:`BackboneFeatures` is a plain ``tuple`` of B x C x h x w maps for
the decode head (``UPerHead``, ``FCNHead``), carrying the adapters'
``aux_losses`` and ``routing`` as attributes;
:class:`~mmseg_sera.models.heads.aux_loss_head.BackboneAuxLossHead` puts
the losses into ``EncoderDecoder.loss`` (keys ``aux.loss_*``).
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from .dinov2 import DINOv2

__all__ = [
    'DualStreamDINOv2', 'BackboneFeatures', 'resolve_block_map',
    'check_out_scales', 'resample_pyramid'
]

BlockMap = Union[None, str, Mapping[int, int], Sequence[Optional[int]]]


class BackboneFeatures(tuple):
    """A tuple of feature maps that also carries the backbone's adapter
    outputs, so that it passes through mmseg heads as is.

    Attributes:
        aux_losses: summed ``loss_*`` terms of the adapters.
        routing: block index -> the adapter's routing tensor.
    """

    def __new__(cls, feats: Sequence[Tensor],
                aux_losses: Optional[Dict[str, Tensor]] = None,
                routing: Optional[Dict[int, Tensor]] = None):
        obj = super().__new__(cls, feats)
        obj.aux_losses = dict(aux_losses or {})
        obj.routing = dict(routing or {})
        return obj


def resolve_block_map(block_map: BlockMap, num_main: int,
                      num_second: int) -> Dict[int, int]:
    """Main block -> second block whose tokens it gets. Pure function.

    Args:
        block_map: ``None`` (equal depths, block l <-> block l),
            ``'proportional'`` (main block i gets second block
            ``max(0, floor((i + 1) L2 / L1) - 1)``: the last blocks line
            up), a ``{main: second}`` mapping, or a sequence of length L1
            (entry i: the second block for main block i, or None).
            Negative indices count from the end.
        num_main, num_second: depths L1 and L2.

    Raises:
        ValueError: unequal depths without a map, an index out of range,
            a sequence of the wrong length.
    """

    def index(j: int, n: int, what: str, where: str) -> int:
        if isinstance(j, bool) or not isinstance(j, int) or \
                not -n <= j < n:
            raise ValueError(f'block_map{where}: {what} {j!r} is out of '
                             f'range ({n} blocks)')
        return j + n if j < 0 else j

    if block_map is None:
        if num_main != num_second:
            raise ValueError(
                f'the backbone has {num_main} blocks and the second '
                f'backbone {num_second}: set block_map (a dict, a list or '
                "'proportional') to say which second block feeds which "
                'backbone block')
        return {i: i for i in range(num_main)}
    if block_map == 'proportional':
        return {
            i: max(0, (i + 1) * num_second // num_main - 1)
            for i in range(num_main)
        }
    if isinstance(block_map, str):
        raise ValueError(f"block_map must be None, 'proportional', a dict or "
                         f'a list, got {block_map!r}')
    if isinstance(block_map, Mapping):
        return {
            index(i, num_main, 'backbone block', ''):
            index(j, num_second, 'second-backbone block', f'[{i}]')
            for i, j in block_map.items()
        }
    if len(block_map) != num_main:
        raise ValueError(f'block_map has {len(block_map)} entries, the '
                         f'backbone {num_main} blocks')
    return {
        i: index(j, num_second, 'second-backbone block', f'[{i}]')
        for i, j in enumerate(block_map) if j is not None
    }


def _check_bands(bands: Optional[Sequence[int]], in_channels: int,
                 tower_channels: int, what: str) -> Optional[Tuple[int]]:
    if bands is None:
        if tower_channels != in_channels:
            raise ValueError(
                f'the {what} takes {tower_channels} bands and the input has '
                f'{in_channels}: set {what}_bands to the {tower_channels} '
                'input channels it should see')
        return None
    bands = tuple(int(b) for b in bands)
    if len(bands) != tower_channels:
        raise ValueError(
            f'{what}_bands selects {len(bands)} bands {bands}, but the '
            f'{what} has in_channels={tower_channels}')
    bad = [b for b in bands if not 0 <= b < in_channels]
    if bad:
        raise ValueError(f'{what}_bands {bands}: bands {bad} do not exist in '
                         f'a {in_channels}-band input')
    return bands


def check_out_scales(out_scales: Sequence[float],
                     num_levels: int) -> tuple:
    """``out_scales`` as floats; one positive scale per level, and a scale
    below 1 must be 1 / k for an integer k (average pooling).

    Raises:
        ValueError: another count, a non-positive scale, a scale below 1
            that is not 1 / k.
    """
    scales = tuple(float(s) for s in out_scales)
    if len(scales) != num_levels or min(scales, default=1.) <= 0:
        raise ValueError(f'out_scales {scales} must give one positive scale '
                         f'per returned level ({num_levels})')
    for s in scales:
        if s < 1 and abs(1 / s - round(1 / s)) > 1e-6:
            raise ValueError('out_scales: a scale below 1 must be 1 / k '
                             f'(k x k average pooling), got {s}')
    return scales


def resample_pyramid(feats: Sequence[Tensor],
                     out_scales: Sequence[float]) -> List[Tensor]:
    """Map i (B x C x h x w) scaled by ``out_scales[i]``: bilinear up for
    s > 1, k x k average pooling (ceil mode) for s = 1 / k, unchanged for
    s = 1."""
    out = []
    for f, s in zip(feats, out_scales):
        if s > 1:
            f = F.interpolate(f, scale_factor=s, mode='bilinear',
                              align_corners=False)
        elif s < 1:
            k = int(round(1 / s))
            f = F.avg_pool2d(f, kernel_size=k, stride=k, ceil_mode=True)
        out.append(f)
    return out


@MODELS.register_module()
class DualStreamDINOv2(BaseModule):
    """A DINOv2 adapted with a frozen second backbone's per-block tokens.

    Args:
        backbone: config of the adapted :class:`DINOv2`, with ``post_block``
            adapters that take ``second=`` (``SpectralMoEAdapter``); its
            ``trainable`` option freezes it (SpectralMoE: ``'frozen'``,
            adapters train). Its ``out_indices`` are the returned levels.
        second: config of the second :class:`DINOv2` (e.g. the encoder of a
            depth network), with its own ``init_cfg=dict(type='Pretrained',
            checkpoint=...)`` in mmseg_sera layout (convert official files
            with ``tools/model_converters/dinov2_to_sera.py``).
            ``trainable`` defaults to ``'frozen'``; it must have no
            adapters. Only its blocks up to the last one mapped to an
            adapter run.
        in_channels: bands of the input. Default: the backbone's
            ``in_channels`` (required when ``backbone_bands`` is set).
        backbone_bands: input channels the backbone sees, in order (default
            all), e.g. ``(2, 1, 0)`` to feed a pretrained RGB backbone.
        second_bands: input channels the second backbone sees (default
            all), e.g. ``(2, 1, 0)`` for the RGB bands of a multispectral
            image.
        block_map: which second block feeds which backbone block, see
            :func:`resolve_block_map` (default: equal depths, l <-> l).
        second_norm: apply the second backbone's final LayerNorm to each
            of its block outputs.
        out_scales: resample the i-th returned map by ``out_scales[i]``
            (> 1 bilinear up, 1 / k: k x k average pooling;
            parameter-free) to
            give a pyramid to heads such as ``UPerHead`` without a neck
            (an mmseg neck would return a plain tuple and drop the aux
            losses). Default: all maps at stride ``patch_size``.
        init_cfg: for this wrapper (the towers use their own).

    Band counts are checked at construction (a selection whose length
    differs from the tower's ``in_channels``, an index outside the input)
    and at run time (an input whose channel count is not ``in_channels``);
    both raise ``ValueError`` naming the two numbers. A checkpoint whose
    patch embedding has another band count than its tower is refused by
    :meth:`DINOv2.load_pretrained` (no silent inflation: select 3 bands).
    """

    def __init__(self,
                 *,
                 backbone: Dict,
                 second: Dict,
                 in_channels: Optional[int] = None,
                 backbone_bands: Optional[Sequence[int]] = None,
                 second_bands: Optional[Sequence[int]] = None,
                 block_map: BlockMap = None,
                 second_norm: bool = False,
                 out_scales: Optional[Sequence[float]] = None,
                 init_cfg: Optional[Dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        second = dict(second)
        second.setdefault('trainable', 'frozen')
        self.backbone = MODELS.build(backbone)
        self.second = MODELS.build(second)
        for name, tower in (('backbone', self.backbone),
                            ('second', self.second)):
            if not isinstance(tower, DINOv2):
                raise ValueError(f'{name} must build a DINOv2, got '
                                 f'{type(tower).__name__}')
        if len(self.second.adapters):
            raise ValueError('the second backbone must have no adapters '
                             '(its block_tokens run the bare blocks)')
        adapted = self.backbone.adapters.indices('post_block')
        if not adapted:
            raise ValueError('the backbone has no post_block adapter: '
                             'nothing would read the second backbone')
        if in_channels is None:
            if backbone_bands is not None:
                raise ValueError('set in_channels (bands of the input) when '
                                 'backbone_bands selects some of them')
            in_channels = self.backbone.in_channels
        self.in_channels = int(in_channels)
        self.backbone_bands = _check_bands(backbone_bands, self.in_channels,
                                           self.backbone.in_channels,
                                           'backbone')
        self.second_bands = _check_bands(second_bands, self.in_channels,
                                         self.second.in_channels, 'second')
        full = resolve_block_map(block_map, self.backbone.num_layers,
                                 self.second.num_layers)
        # only the adapted blocks need second tokens
        self.block_map = {i: full[i] for i in adapted if i in full}
        self.second_norm = second_norm
        self.out_scales = None if out_scales is None else check_out_scales(
            out_scales, len(self.backbone.out_indices))

    @property
    def embed_dims(self) -> int:
        """Width C of the returned maps."""
        return self.backbone.embed_dims

    def second_tokens(self, x: Tensor) -> Dict[int, Tensor]:
        """Backbone block -> the second backbone's B x N2 x C2 tokens for
        it, from the full B x bands x H x W input."""
        if not self.block_map:
            return {}
        y = x if self.second_bands is None else x[:, list(self.second_bands)]
        tokens = self.second.block_tokens(
            y, num_blocks=max(self.block_map.values()) + 1,
            norm=self.second_norm)
        return {i: tokens[j] for i, j in self.block_map.items()}

    def forward(self, x: Tensor) -> BackboneFeatures:
        """B x bands x H x W -> :class:`BackboneFeatures` (the backbone's
        ``out_indices`` maps, B x C x h x w, rescaled by ``out_scales``)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'DualStreamDINOv2 expects {self.in_channels}-band input '
                f'(in_channels), got {x.shape[1] if x.ndim == 4 else "?"} '
                f'bands (shape {tuple(x.shape)}); check the dataset bands '
                'and the data_preprocessor mean/std')
        context = self.second_tokens(x)
        y = x if self.backbone_bands is None else \
            x[:, list(self.backbone_bands)]
        out = self.backbone.forward_features(y, block_context=context)
        return BackboneFeatures(
            list(out.feats) if self.out_scales is None else
            resample_pyramid(out.feats, self.out_scales),
            aux_losses=out.aux_losses,
            routing=out.routing)
