"""DINOv2 ViT-S/B/L/g-14 backbone with register tokens and adapter slots.

Parameter names follow the official DINOv2 / timm checkpoints, so that a
converted checkpoint (``tools/model_converters/dinov2_to_sera.py``) loads
with ``strict`` key checking::

    cls_token                1 x 1 x C
    register_tokens          1 x R x C          (only when R > 0)
    pos_embed                1 x (1 + M*M) x C  (class position + M x M grid,
                                                  M = img_size // patch_size)
    patch_embed.proj         Conv2d(3, C, 14, stride 14)
    blocks.N.norm1 / attn.qkv / attn.proj / ls1.gamma
    blocks.N.norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma
    norm                     final LayerNorm

The block loop is written out in :meth:`DINOv2.forward_features`; adapters
run between blocks (slot kind ``post_block``) or beside the MLP inside the
second LayerScale (``parallel_mlp``), managed by
:class:`~mmseg_sera.models.backbones.slots.AdapterSlots`. A second
modality's per-block tokens (``block_context``, e.g. a frozen second
backbone's :meth:`DINOv2.block_tokens`) reach the ``post_block`` adapters as
``second=``. See ``docs/backbone.md``.
"""
import os.path as osp
from contextlib import nullcontext
from functools import partial
from typing import (Callable, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from ..position import sine_position_2d
from ..structures import BackboneOutput, TextFeatures, merge_losses
from .rope import RopeTables, apply_rope
from .slots import (TRAINABLE_MODES, AdapterSlots, resolve_block_indices,
                    set_trainable)

CONVERTER = 'tools/model_converters/dinov2_to_sera.py'


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------
def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with
    probability ``rate`` and rescale the rest by ``1 / (1 - rate)``."""
    if rate == 0. or not training:
        return x
    keep = 1. - rate
    mask = x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class LayerScale(nn.Module):
    """Per-channel scale ``y = gamma * x`` (``gamma``: C)."""

    def __init__(self, dims: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dims, ), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class MaskedBiasLinear(nn.Linear):
    """``y = x W^T + b * bias_mask`` (the qkv projection of DINOv3).

    ``bias_mask`` (out_features, a persistent buffer: it comes with the
    weights) says which bias entries act. It starts as 1 / 0 / 1 over the
    q / k / v thirds (no key bias, as the official initialisation); DINOv3
    releases store either that or all zeros (no qkv bias acts).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        if out_features % 3:
            raise ValueError('a masked qkv bias needs out_features divisible '
                             f'by 3, got {out_features}')
        mask = torch.ones(out_features)
        mask[out_features // 3:2 * out_features // 3] = 0
        self.register_buffer('bias_mask', mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight,
                        self.bias * self.bias_mask.to(self.bias.dtype))


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d)) v``.

    ``qkv`` packs q, k, v (3C x C, in that order, heads contiguous), as the
    DINOv2 / DINOv3 / timm checkpoints do. B x N x C -> B x N x C.

    ``fused=True`` computes it with ``F.scaled_dot_product_attention`` (no
    N x N map is kept); ``False`` with explicit matmuls and softmax, as the
    official DINOv2 ``Attention`` does without xFormers (same result; the
    benchmark uses it as the peers' reference forward).

    The position encoding is the caller's: ``rope`` tables given to
    :meth:`forward` rotate q and k of the patch tokens
    (:func:`~.rope.apply_rope`, DINOv3); without them (DINOv2, whose
    position table is added to the tokens before the blocks) nothing is
    rotated. ``qkv_bias_mask`` makes ``qkv`` a :class:`MaskedBiasLinear`
    (DINOv3; needs ``qkv_bias``).
    """

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True, fused: bool = True,
                 qkv_bias_mask: bool = False) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims={embed_dims} is not divisible by '
                             f'num_heads={num_heads}')
        if qkv_bias_mask and not qkv_bias:
            raise ValueError('qkv_bias_mask needs qkv_bias=True')
        self.num_heads = num_heads
        self.fused = fused
        if qkv_bias_mask:
            self.qkv = MaskedBiasLinear(embed_dims, 3 * embed_dims)
        else:
            self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims, bias=proj_bias)

    def forward(self, x: Tensor, rope: Optional[RopeTables] = None) -> Tensor:
        B, N, C = x.shape
        # B x N x 3C -> 3 x B x heads x N x d
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * q.shape[-1]**-0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, C -> hidden -> C."""

    def __init__(self, embed_dims: int, hidden_dims: int,
                 bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, embed_dims, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN of DINOv2 ViT-g and DINOv3 S+/L+/H+/7B:
    ``[a, b] = fc1(x)``, ``fc2(SiLU(a) * b)``.

    ``fc1`` packs the two halves (2H x C; DINOv2 official name ``w12``,
    timm ``fc1``; DINOv3 official ``w1`` (a) and ``w2`` (b), timm ``fc1_g``
    and ``fc1_x``), ``fc2`` is H -> C (official ``w3``). As in the official
    code, H = ``align_to * ceil(int(2/3 * hidden_dims) / align_to)``
    (``align_to`` 8; 64 for DINOv3-7B, ffn type ``'swiglu64'``).
    """

    def __init__(self, embed_dims: int, hidden_dims: int,
                 bias: bool = True, align_to: int = 8) -> None:
        super().__init__()
        d = int(hidden_dims * 2 / 3)
        hidden = d + (-d) % align_to
        self.fc1 = nn.Linear(embed_dims, 2 * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, embed_dims, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


FFN_TYPES = {
    'mlp': Mlp,
    'swiglu': SwiGLUFFN,
    'swiglufused': SwiGLUFFN,
    'swiglu64': partial(SwiGLUFFN, align_to=64)
}

# A callable run in parallel with the MLP of a block: it gets LN2(z)
# (B x N x C, all tokens) and returns a B x N x C update (see DINOv2Block).
ParallelBranch = Callable[[Tensor], Tensor]


class DINOv2Block(nn.Module):
    """Pre-norm ViT block with LayerScale (DINOv2 and DINOv3)::

        z = z + ls1(attn(norm1(z)[, rope]))               # attention_part
        h = norm2(z)
        z = z + ls2(mlp(h) + sum_a parallel_a(h))         # mlp_part

    The two halves are separate methods so that a ``parallel_mlp`` adapter
    (DETRIS Dense Aligner: ``s * A(h, text)``) can be added inside ``ls2``
    without rewriting the block. ``rope`` (DINOv3's RoPE tables, see
    :class:`Attention`) is None for DINOv2. B x N x C -> B x N x C.
    """

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float = 4.,
                 ffn_type: str = 'mlp', qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True,
                 layer_scale_init_value: float = 1e-5,
                 drop_path_rate: float = 0., norm_eps: float = 1e-6,
                 qkv_bias_mask: bool = False) -> None:
        super().__init__()
        if ffn_type not in FFN_TYPES:
            raise ValueError(f'ffn_type must be one of {sorted(FFN_TYPES)}, '
                             f'got {ffn_type!r}')
        self.norm1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = Attention(embed_dims, num_heads, qkv_bias=qkv_bias,
                              proj_bias=proj_bias,
                              qkv_bias_mask=qkv_bias_mask)
        self.ls1 = LayerScale(embed_dims, layer_scale_init_value)
        self.norm2 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.mlp = FFN_TYPES[ffn_type](embed_dims, int(embed_dims * mlp_ratio),
                                       bias=ffn_bias)
        self.ls2 = LayerScale(embed_dims, layer_scale_init_value)
        self.drop_path_rate = drop_path_rate

    def attention_part(self, z: Tensor,
                       rope: Optional[RopeTables] = None) -> Tensor:
        """``z + ls1(attn(norm1(z), rope))``."""
        return z + drop_path(
            self.ls1(self.attn(self.norm1(z), rope)), self.drop_path_rate,
            self.training)

    def mlp_part(self, z: Tensor,
                 parallel: Sequence[ParallelBranch] = ()) -> Tensor:
        """``z + ls2(mlp(h) + sum(p(h) for p in parallel))``, h = norm2(z)."""
        h = self.norm2(z)
        update = self.mlp(h)
        for branch in parallel:
            update = update + branch(h)
        return z + drop_path(self.ls2(update), self.drop_path_rate,
                             self.training)

    def forward(self, z: Tensor,
                parallel: Sequence[ParallelBranch] = (),
                rope: Optional[RopeTables] = None) -> Tensor:
        return self.mlp_part(self.attention_part(z, rope), parallel)


class PatchEmbed(nn.Module):
    """Non-overlapping patches: B x 3 x H x W -> B x (h*w) x C, with
    h = H / p, w = W / p (H, W must be multiples of p)."""

    def __init__(self, patch_size: int, in_channels: int,
                 embed_dims: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size=patch_size,
                              stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


#: Second-modality tokens per block: one entry per block (None: nothing
#: for that block), a {block index: tensor} mapping, or ``i -> tensor``.
BlockContext = Union[Sequence[Optional[Tensor]], Mapping[int, Tensor],
                     Callable[[int], Optional[Tensor]]]


# --------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------
def _decode_resampling(value: Tensor) -> Tuple[float, bool]:
    """``pos_resampling`` buffer -> (interpolate_offset, antialias)."""
    offset, antialias = value.tolist()
    return offset / 1e4, bool(antialias)


@MODELS.register_module()
class DINOv2(BaseModule):
    """DINOv2 vision transformer (patch 14) with adapter slots.

    Args:
        arch: ``'small' | 'base' | 'large' | 'giant'`` (or ``'s'/'b'/'l'/'g'``)
            or a dict with ``embed_dims, num_layers, num_heads`` and optional
            ``mlp_ratio`` (4.0), ``ffn_type`` (``'mlp'`` | ``'swiglu'``).
            ``giant`` is the official ViT-g/14 (1536 wide, 40 blocks, SwiGLU).
        patch_size: patch side in pixels.
        img_size: pre-training image side; the stored position table covers
            an M x M grid, M = img_size // patch_size (518 -> 37).
        in_channels: image channels.
        num_register_tokens: 0 (DINOv2) or 4 (DINOv2-reg4).
        interpolate_offset: position-table resampling mode. ``> 0``: bicubic
            by scale factor ``((h + offset) / M, (w + offset) / M)`` (official
            models without registers, 0.1); ``0``: bicubic to size (h, w)
            (official reg models and timm). Default: 0.1 without registers,
            0.0 with registers.
        interpolate_antialias: antialias flag of that resampling. Default:
            False without registers, True with registers (timm: always True).
            Either option left at ``None`` follows the mode recorded with
            the weights when they are loaded (a converted checkpoint's
            ``meta``, a trained model's ``pos_resampling`` buffer); an
            explicit value always wins. See ``apply_recorded_resampling``.
        out_indices: block indices whose outputs are returned (``-1`` = the
            last block), as B x C x h x w maps, in increasing block order.
        out_norm: ``'last'`` applies the final LayerNorm to the last returned
            level only (DINOv2 / DETRIS convention), ``'all'`` to every level
            (``get_intermediate_layers(norm=True)``), ``'none'`` to none.
        adapter_indices: blocks after which an adapter runs on the patch
            tokens (slot kind ``post_block``).
        adapter_cfg: config of the adapter, built once per index with
            ``MODELS.build``; ``embed_dims`` defaults to the backbone width.
        adapters: adapters of any supported slot kind (``post_block``,
            ``parallel_mlp``), a list of ``dict(type=..., insert=(i, ...),
            slot=..., scale=..., **kwargs)``; see
            :class:`~mmseg_sera.models.backbones.slots.AdapterSlots`.
            A ``parallel_mlp`` adapter A of block i adds ``scale * A(h,
            hw=(h, w), text=text, num_prefix=P)`` to the MLP output, inside
            ``ls2`` (h = norm2(z), all tokens). May be combined with
            ``adapter_indices`` (different blocks for ``post_block``).
        trainable: ``'frozen'`` (no backbone parameter trains), ``'ln_bias'``
            (every LayerNorm weight/bias and every bias term trains) or
            ``'full'``. Adapters always train. Unless ``'full'``, the
            backbone's own modules stay in eval mode.
        with_cp: gradient checkpointing per block (training with grad only).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        layer_scale_init_value: initial LayerScale gamma.
        qkv_bias / proj_bias / ffn_bias: bias terms (all True in DINOv2).
        norm_eps: LayerNorm epsilon (1e-6 in DINOv2).
        pos_embed_init: start value of the (trained) position table:
            ``'trunc_normal'`` (official, std 0.02) or ``'sincos'`` (the
            fixed 2-D sine code ``sine_position_2d``, values in [-1, 1];
            class position 0) for models trained from scratch, where a
            random table leaves the network blind to position until it is
            learned. A loaded checkpoint overwrites either.
        init_cfg: mmengine init config; ``dict(type='Pretrained',
            checkpoint=PATH[, prefix=...])`` loads a checkpoint in this
            module's layout (convert official/timm files first with
            ``tools/model_converters/dinov2_to_sera.py``).
    """
    arch_settings: Dict[str, Dict] = {
        'small': dict(embed_dims=384, num_layers=12, num_heads=6,
                      mlp_ratio=4., ffn_type='mlp'),
        'base': dict(embed_dims=768, num_layers=12, num_heads=12,
                     mlp_ratio=4., ffn_type='mlp'),
        'large': dict(embed_dims=1024, num_layers=24, num_heads=16,
                      mlp_ratio=4., ffn_type='mlp'),
        'giant': dict(embed_dims=1536, num_layers=40, num_heads=24,
                      mlp_ratio=4., ffn_type='swiglu'),
    }
    arch_aliases: Dict[str, str] = {
        's': 'small', 'b': 'base', 'l': 'large', 'g': 'giant',
        'giant2': 'giant'
    }
    #: optional keys of an ``arch`` dict and their defaults
    arch_defaults: Dict[str, object] = dict(mlp_ratio=4., ffn_type='mlp')
    TRAINABLE = TRAINABLE_MODES
    OUT_NORM = ('last', 'all', 'none')
    #: the script that converts official / timm files into this layout
    converter = CONVERTER
    POS_EMBED_INIT = ('trunc_normal', 'sincos')
    SLOT_KINDS = ('post_block', 'parallel_mlp', 'bridge')

    def __init__(self,
                 *,
                 arch: Union[str, Dict] = 'base',
                 patch_size: int = 14,
                 img_size: int = 518,
                 in_channels: int = 3,
                 num_register_tokens: int = 0,
                 interpolate_offset: Optional[float] = None,
                 interpolate_antialias: Optional[bool] = None,
                 out_indices: Sequence[int] = (-1, ),
                 out_norm: str = 'last',
                 adapter_indices: Sequence[int] = (),
                 adapter_cfg: Optional[Dict] = None,
                 adapters: Sequence[Dict] = (),
                 trainable: str = 'frozen',
                 with_cp: bool = False,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-5,
                 qkv_bias: bool = True,
                 proj_bias: bool = True,
                 ffn_bias: bool = True,
                 norm_eps: float = 1e-6,
                 pos_embed_init: str = 'trunc_normal',
                 init_cfg: Optional[Union[Dict, List[Dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if img_size % patch_size:
            raise ValueError(f'img_size={img_size} is not a multiple of '
                             f'patch_size={patch_size}')
        if pos_embed_init not in self.POS_EMBED_INIT:
            raise ValueError('pos_embed_init must be one of '
                             f'{self.POS_EMBED_INIT}, got {pos_embed_init!r}')
        if interpolate_offset is not None and interpolate_offset < 0:
            raise ValueError('interpolate_offset must be >= 0, got '
                             f'{interpolate_offset}')
        settings = self._init_common(
            arch=arch, patch_size=patch_size,
            num_register_tokens=num_register_tokens, out_indices=out_indices,
            out_norm=out_norm, adapter_indices=adapter_indices,
            adapter_cfg=adapter_cfg, trainable=trainable, with_cp=with_cp)
        self.pos_embed_init = pos_embed_init
        self.pos_grid = img_size // patch_size
        has_reg = num_register_tokens > 0
        # Which resampling options the config set; the others follow the
        # checkpoint's record (see ``apply_recorded_resampling``).
        self._resampling_from_cfg = (interpolate_offset is not None,
                                     interpolate_antialias is not None)
        # The mode travels with the model's state (``pos_resampling``:
        # [round(offset * 1e4), antialias], integers, so that dtype casts
        # leave it alone), so that a model trained with a checkpoint's
        # recorded mode is tested with it too.
        self.register_buffer('pos_resampling', torch.zeros(2,
                                                           dtype=torch.long))
        self._set_resampling(
            (0.1 if not has_reg else 0.) if interpolate_offset is None else
            interpolate_offset,
            has_reg if interpolate_antialias is None else
            interpolate_antialias)

        self._build_stem(in_channels)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.pos_grid**2, self._embed_dims))
        self._build_blocks(
            settings, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value,
            qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
            norm_eps=norm_eps)
        self._random_init()
        self._build_adapters(adapter_cfg, adapters)
        self._apply_trainable()

    # ------------------------------------------------------------------
    # construction helpers (shared with DINOv3)
    # ------------------------------------------------------------------
    def _init_common(self, *, arch: Union[str, Dict], patch_size: int,
                     num_register_tokens: int, out_indices: Sequence[int],
                     out_norm: str, adapter_indices: Sequence[int],
                     adapter_cfg: Optional[Dict], trainable: str,
                     with_cp: bool) -> Dict:
        """Check and store the options every DINO tower has; returns the
        resolved arch settings."""
        settings = self._resolve_arch(arch)
        L = settings['num_layers']
        if num_register_tokens < 0:
            raise ValueError('num_register_tokens must be >= 0, got '
                             f'{num_register_tokens}')
        if trainable not in self.TRAINABLE:
            raise ValueError(f'trainable must be one of {self.TRAINABLE}, '
                             f'got {trainable!r}')
        if out_norm not in self.OUT_NORM:
            raise ValueError(f'out_norm must be one of {self.OUT_NORM}, '
                             f'got {out_norm!r}')
        self.arch = settings
        self._embed_dims = settings['embed_dims']
        self.num_layers = L
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.out_indices = resolve_block_indices(out_indices, L,
                                                 'out_indices')
        if not self.out_indices:
            raise ValueError('out_indices must name at least one block')
        self.out_norm = out_norm
        self.adapter_indices = resolve_block_indices(adapter_indices, L,
                                                     'adapter_indices')
        if self.adapter_indices and self.adapter_indices[-1] > max(
                self.out_indices):
            raise ValueError(
                f'adapter_indices {tuple(adapter_indices)} include blocks '
                f'after the last out index {max(self.out_indices)}: such an '
                'adapter would not change any output')
        if self.adapter_indices and adapter_cfg is None:
            raise ValueError('adapter_indices is set but adapter_cfg is None')
        self.trainable = trainable
        self.with_cp = with_cp
        return settings

    def _build_stem(self, in_channels: int) -> None:
        """Patch embedding, class token and register tokens."""
        C = self._embed_dims
        self.patch_embed = PatchEmbed(self.patch_size, in_channels, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        if self.num_register_tokens > 0:
            self.register_tokens = nn.Parameter(
                torch.zeros(1, self.num_register_tokens, C))
        else:
            self.register_tokens = None

    def _build_blocks(self, settings: Dict, *, drop_path_rate: float,
                      norm_eps: float, **block_kwargs) -> None:
        """The blocks (stochastic depth rising linearly to
        ``drop_path_rate``) and the final LayerNorm."""
        C, L = self._embed_dims, self.num_layers
        # on the host, also when building under torch.device('meta')
        dpr = torch.linspace(0, drop_path_rate, L, device='cpu').tolist()
        self.blocks = nn.ModuleList([
            DINOv2Block(
                C,
                settings['num_heads'],
                mlp_ratio=settings['mlp_ratio'],
                ffn_type=settings['ffn_type'],
                drop_path_rate=dpr[i],
                norm_eps=norm_eps,
                **block_kwargs) for i in range(L)
        ])
        self.norm = nn.LayerNorm(C, eps=norm_eps)

    def _build_adapters(self, adapter_cfg: Optional[Dict],
                        adapters: Sequence[Dict]) -> None:
        self.adapters = AdapterSlots(
            owner=type(self).__name__, kinds=self.SLOT_KINDS,
            num_layers=self.num_layers, embed_dims=self._embed_dims,
            last_index=max(self.out_indices))
        for i in self.adapter_indices:
            self.adapters.add('post_block', i, adapter_cfg,
                              what='adapter_cfg')
        self.adapters.build(adapters)

    # ------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------
    @classmethod
    def _resolve_arch(cls, arch: Union[str, Dict]) -> Dict:
        if isinstance(arch, str):
            name = cls.arch_aliases.get(arch.lower(), arch.lower())
            if name not in cls.arch_settings:
                raise ValueError(
                    f'Unknown {cls.__name__} arch {arch!r}; choose one of '
                    f'{sorted(cls.arch_settings)} (or '
                    f'{"/".join(sorted(cls.arch_aliases))}) or pass a '
                    'dict with embed_dims, num_layers, num_heads')
            return dict(cls.arch_settings[name])
        if isinstance(arch, dict):
            missing = {'embed_dims', 'num_layers', 'num_heads'} - set(arch)
            if missing:
                raise ValueError(f'arch dict lacks {sorted(missing)}')
            unknown = set(arch) - {'embed_dims', 'num_layers', 'num_heads'
                                   } - set(cls.arch_defaults)
            if unknown:
                raise ValueError(
                    f'arch dict has unknown keys {sorted(unknown)}')
            out = dict(cls.arch_defaults)
            out.update(arch)
            return out
        raise ValueError(f'arch must be a str or dict, got {type(arch)}')

    def _random_init(self) -> None:
        """Official DINOv2 init: trunc-normal(0.02) position table (or the
        sine-cosine code, see ``pos_embed_init``) and Linear weights, zero
        Linear biases, N(0, 1e-6) class/register tokens."""
        if self.pos_embed_init == 'sincos':
            with torch.no_grad():
                self.pos_embed.zero_()
                self.pos_embed[0, 1:] = sine_position_2d(
                    self.pos_grid, self.pos_grid, self._embed_dims)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def backbone_named_parameters(self):
        """The backbone's own parameters (adapters excluded)."""
        for name, p in self.named_parameters():
            if not name.startswith('adapters.'):
                yield name, p

    def _backbone_modules(self):
        for name, m in self.named_children():
            if name != 'adapters':
                yield m

    def _apply_trainable(self) -> None:
        set_trainable(self, self.trainable)
        if self.trainable == 'ln_bias':
            print_log(
                f'{type(self).__name__} trainable=ln_bias: '
                f'{100 * self.trainable_share():.3f}% of the backbone '
                'parameters train', logger='current')

    def trainable_share(self) -> float:
        """Share of the backbone's own parameters (adapters excluded) that
        have ``requires_grad`` (``ln_bias`` on ViT-B/14: about 0.14%)."""
        total = trainable = 0
        for _, p in self.backbone_named_parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable / total

    def train(self, mode: bool = True) -> 'DINOv2':
        """Set train/eval mode; unless ``trainable='full'`` the backbone's
        own modules stay in eval mode and only the adapters follow
        ``mode``."""
        super().train(mode)
        if self.trainable != 'full':
            for m in self._backbone_modules():
                m.eval()
        return self

    # ------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------
    @property
    def embed_dims(self) -> int:
        """Token width C."""
        return self._embed_dims

    @property
    def in_channels(self) -> int:
        """Image channels (bands) the patch embedding takes."""
        return self.patch_embed.proj.in_channels

    @property
    def num_prefix_tokens(self) -> int:
        """Class token + register tokens before the patch tokens."""
        return 1 + self.num_register_tokens

    # ------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------
    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=PATH)`` (our
        layout, strict keys and shapes) or run mmengine's initialisers.
        Adapters keep their own initialisation."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            path = cfg.get('checkpoint')
            if not path or not osp.isfile(path):
                raise FileNotFoundError(
                    f'{type(self).__name__} checkpoint not found: {path!r}. '
                    'Convert the official/timm weights into this layout '
                    f'with `python {self.converter} SRC {path}`.')
            self.init_cfg = None
            try:
                super().init_weights()  # the adapters' own init
            finally:
                self.init_cfg = cfg
            self.load_pretrained(path, prefix=cfg.get('prefix', ''))
        else:
            super().init_weights()

    def load_pretrained(self, path: str, prefix: str = '') -> None:
        """Load a checkpoint in this module's layout (adapters excluded).

        Accepts a raw state dict or one wrapped in ``'state_dict'`` /
        ``'model'``; ``prefix`` (e.g. ``'backbone.'``) selects and strips a
        key prefix. Missing, unexpected or mis-shaped keys raise
        ``ValueError``; the stored position table is loaded as is, never
        resized (it is resampled at run time).
        """
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
        for key in ('state_dict', 'model'):
            if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
        if prefix:
            ckpt = {
                k[len(prefix):]: v
                for k, v in ckpt.items() if k.startswith(prefix)
            }
        ckpt = {
            k: v
            for k, v in ckpt.items() if not k.startswith('adapters.')
        }
        apply_record = self._take_record(ckpt, meta, path)
        own = self._backbone_tensors()
        unexpected = sorted(set(ckpt) - set(own))
        missing = sorted(set(own) - set(ckpt))
        if unexpected or missing:
            raise ValueError(
                f'{path} is not a {type(self).__name__} checkpoint in '
                'mmseg_sera layout matching this model: unexpected keys '
                f'{unexpected[:8]}{"..." if len(unexpected) > 8 else ""}, '
                f'missing keys {missing[:8]}'
                f'{"..." if len(missing) > 8 else ""}. Convert official/'
                f'timm files with {self.converter} and check arch / '
                'num_register_tokens.')
        for k, v in ckpt.items():
            if (k == 'patch_embed.proj.weight' and v.ndim == 4
                    and v.shape[1] != own[k].shape[1]):
                # no silent inflation: which bands a pretrained RGB filter
                # should see is the config's choice (e.g. a band selection
                # in front of the backbone, DualStreamDINOv2's
                # backbone_bands / second_bands)
                raise ValueError(
                    f'{path}: the checkpoint\'s patch embedding takes '
                    f'{v.shape[1]} input bands, this backbone has '
                    f'in_channels={own[k].shape[1]}; give the backbone '
                    f'{v.shape[1]} bands (in_channels={v.shape[1]} and a '
                    'band selection such as DualStreamDINOv2.backbone_bands'
                    ') or train it without this checkpoint')
            if v.shape != own[k].shape:
                raise ValueError(
                    f'{path}: {k} has shape {tuple(v.shape)}, the model '
                    f'expects {tuple(own[k].shape)} (check arch, img_size, '
                    'patch_size, num_register_tokens)')
        with torch.no_grad():
            for k, v in ckpt.items():
                own[k].copy_(v)
        apply_record()

    #: buffers that record how the weights are used, not weights
    RECORD_BUFFERS = ('pos_resampling', )

    def _backbone_tensors(self) -> Dict[str, Tensor]:
        """Parameters and persistent buffers a checkpoint of this layout
        holds (adapters and :attr:`RECORD_BUFFERS` excluded)."""
        return {
            k: v
            for k, v in self.state_dict(keep_vars=True).items()
            if not k.startswith('adapters.') and k not in self.RECORD_BUFFERS
        }

    def _take_record(self, ckpt: Dict[str, Tensor], meta: Dict,
                     path: str) -> Callable[[], None]:
        """Pop what ``ckpt`` / ``meta`` record about using the weights (the
        resampling mode) and return the step that applies it once the
        weights are in."""
        recorded = (meta.get('interpolate_offset'),
                    meta.get('interpolate_antialias'))
        source = f'{path} ({meta.get("source_layout")} layout)'
        if 'pos_resampling' in ckpt:  # a model of this class saved whole
            recorded = _decode_resampling(ckpt.pop('pos_resampling'))
            source = path
        return partial(self.apply_recorded_resampling, *recorded,
                       source=source)

    def _set_resampling(self, offset: float, antialias: bool) -> None:
        self.interpolate_offset = float(offset)
        self.interpolate_antialias = bool(antialias)
        self.pos_resampling.copy_(
            torch.tensor([round(self.interpolate_offset * 1e4),
                          int(self.interpolate_antialias)]))

    def apply_recorded_resampling(self, offset: Optional[float],
                                  antialias: Optional[bool],
                                  source: str) -> None:
        """Take the position-table resampling mode recorded with weights.

        A converted checkpoint records the mode of the code it came from
        (``meta``; see ``tools/model_converters/dinov2_to_sera.py``), a
        trained model carries the mode it was trained with
        (``pos_resampling``). Each recorded value is applied unless the
        config set that option explicitly; a conflicting explicit option
        wins with a warning. The mode used is logged.
        """
        current = (self.interpolate_offset, self.interpolate_antialias)
        recorded = (None if offset is None else float(offset),
                    None if antialias is None else bool(antialias))
        mode, origin, conflicts = [], [], []
        for name, cur, rec, explicit in zip(
                ('interpolate_offset', 'interpolate_antialias'), current,
                recorded, self._resampling_from_cfg):
            if rec is None or explicit:
                mode.append(cur)
                origin.append('config' if explicit else 'default')
                if rec is not None and rec != cur:
                    conflicts.append(f'{name}={rec} recorded, {cur} set')
            else:
                mode.append(rec)
                origin.append(source)
        if recorded == (None, None):
            return
        self._set_resampling(*mode)
        if conflicts:
            print_log(
                f'{source} records another position-table resampling mode '
                f'than the config sets ({"; ".join(conflicts)}); the config '
                'wins. Remove interpolate_offset / interpolate_antialias '
                'from the config to use the recorded mode.',
                logger='current', level=30)
        print_log(
            f'DINOv2 position-table resampling: interpolate_offset='
            f'{mode[0]} ({origin[0]}), interpolate_antialias={mode[1]} '
            f'({origin[1]})', logger='current')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Loading a whole model's state (``load_state_dict``, MMEngine's
        ``load_checkpoint``) also takes the resampling mode it was trained
        with; a state without ``pos_resampling`` keeps the current mode."""
        key = prefix + 'pos_resampling'
        recorded = state_dict.get(key)
        if recorded is not None:
            state_dict = dict(state_dict)
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in missing_keys:
            missing_keys.remove(key)
        if recorded is not None:
            self.apply_recorded_resampling(*_decode_resampling(recorded),
                                           source='the loaded model state')

    # ------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------
    def interpolate_pos_embed(self, h: int, w: int,
                              dtype: torch.dtype) -> Tensor:
        """Position table for an h x w patch grid: 1 x (1 + h*w) x C.

        The stored M x M table is resampled at run time, in float32, the way
        the checkpoint's own code does (see ``interpolate_offset``). An
        M x M grid gets the stored table unchanged. Not cached: it is cheap
        and the table may be trained.
        """
        M = self.pos_grid
        if (h, w) == (M, M):
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        C = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)
        if self.interpolate_offset > 0:
            kwargs = dict(scale_factor=((h + self.interpolate_offset) / M,
                                        (w + self.interpolate_offset) / M))
        else:
            kwargs = dict(size=(h, w))
        grid = F.interpolate(grid, mode='bicubic',
                             antialias=self.interpolate_antialias, **kwargs)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(
                f'position table resampled to {tuple(grid.shape[-2:])}, '
                f'expected {(h, w)} (interpolate_offset='
                f'{self.interpolate_offset})')
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, C)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """B x 3 x H x W -> tokens B x (1 + R + h*w) x C, ordered
        [class, registers, patches], and the grid (h, w).

        H and W are zero-padded at the bottom/right to multiples of the
        patch size. The class and patch tokens get the position table;
        registers get none (as in DINOv2-reg and timm).
        """
        self._check_input(x)
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        h, w = x.shape[2] // p, x.shape[3] // p
        tokens = self.patch_embed(x)  # B x hw x C
        B = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_embed(h, w, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(B, -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens, (h, w)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f'{type(self).__name__} expects B x '
                f'{self.patch_embed.proj.in_channels} x H x W images, got '
                f'shape {tuple(x.shape)}')

    def block_rope(self, hw: Tuple[int, int]) -> Optional[RopeTables]:
        """RoPE tables for the next block on an h x w grid; None here (the
        position table is added in :meth:`prepare_tokens`). DINOv3 draws
        them per block call, as its official code does."""
        return None

    def _run_block(self, i: int, tokens: Tensor,
                   parallel: Sequence[ParallelBranch] = (),
                   hw: Optional[Tuple[int, int]] = None) -> Tensor:
        block = self.blocks[i]
        rope = None if hw is None else self.block_rope(hw)
        if self.with_cp and self.training and torch.is_grad_enabled():
            return cp.checkpoint(block, tokens, parallel, rope,
                                 use_reentrant=False)
        return block(tokens, parallel, rope)

    def _to_map(self, tokens: Tensor, hw: Tuple[int, int],
                normed: bool) -> Tuple[Tensor, Tensor]:
        """Tokens B x (P + N) x C -> the patch map B x C x h x w and the
        prefix tokens B x P x C (class, registers), both final-normed when
        ``normed``."""
        if normed:
            tokens = self.norm(tokens)
        P = self.num_prefix_tokens
        patches = tokens[:, P:]
        B, _, C = patches.shape
        return (patches.transpose(1, 2).reshape(B, C, *hw).contiguous(),
                tokens[:, :P])

    def _context_fn(
            self, block_context: Optional[BlockContext]
    ) -> Callable[[int], Optional[Tensor]]:
        """``block_context`` -> ``i -> second-modality tokens or None``."""
        if block_context is None:
            return lambda i: None
        if callable(block_context):
            return block_context
        if isinstance(block_context, Mapping):
            return block_context.get
        if isinstance(block_context, (list, tuple)):
            if len(block_context) != self.num_layers:
                raise ValueError(
                    f'block_context has {len(block_context)} entries, the '
                    f'backbone {self.num_layers} blocks (one entry per '
                    'block; None where a block gets none)')
            return block_context.__getitem__
        raise ValueError('block_context must be a sequence (one entry per '
                         'block), a {block: tensor} mapping or a callable, '
                         f'got {type(block_context).__name__}')

    def forward_features(
            self,
            x: Tensor,
            text: Optional[TextFeatures] = None,
            text_stream=None,
            block_context: Optional[BlockContext] = None) -> BackboneOutput:
        """Run the blocks with the adapter slots.

        Args:
            x: B x 3 x H x W images (padded to multiples of 14 if needed).
            text: the sentence features, handed to every adapter.
            text_stream: a text stream from the text encoder's ``begin()``
                (needed by a ``bridge``, e.g. ``ETRISBridger``); its blocks
                run beside these (``slots.LockstepRun``).
            block_context: a second modality's tokens per block, B x N2 x
                C2 each (N2, C2 may differ from this backbone's): a
                sequence with one entry per block (None for none), a
                ``{block: tensor}`` mapping or ``i -> tensor``. The
                ``post_block`` adapter of block i gets entry i as
                ``second=``; blocks without an entry (or without such an
                adapter) run as without it.

        Returns:
            ``BackboneOutput(feats, routing, aux_losses, text,
            prefix_tokens)``: the ``out_indices`` levels as B x C x h x w
            maps (h = ceil(H / 14)), block index -> adapter routing
            weights, summed adapter losses, with a text stream the final
            text features, and each level's
            class and register tokens (B x (1 + R) x C, normed as the map).
        """
        tokens, hw = self.prepare_tokens(x)
        P = self.num_prefix_tokens
        second_at = self._context_fn(block_context)
        run = self.adapters.start_lockstep(text_stream, num_prefix=P, hw=hw)
        last = self.out_indices[-1]
        feats: List[Tensor] = []
        prefix: List[Tensor] = []
        routing: Dict[int, Tensor] = {}
        losses: List[Dict[str, Tensor]] = []
        for i in range(last + 1):
            # 'parallel_mlp': s * A(norm2 z, ...) beside the MLP, inside ls2
            parallel = self.adapters.branches(
                'parallel_mlp', i, hw=hw, text=text, num_prefix=P)
            tokens = self._run_block(i, tokens, parallel, hw)
            # 'post_block': the patch tokens after block i
            tokens, out = self.adapters.run_post_block(
                i, tokens, num_prefix=P, hw=hw, text=text,
                second=second_at(i))
            if out is not None:
                if out.routing is not None:
                    routing[i] = out.routing
                losses.append(out.aux_losses)
            if run is not None:  # text blocks beside i, then the bridge
                tokens = run.after_block(i, tokens)
            if i in self.out_indices:
                normed = self.out_norm == 'all' or (self.out_norm == 'last'
                                                    and i == last)
                level, first = self._to_map(tokens, hw, normed)
                feats.append(level)
                prefix.append(first)
        return BackboneOutput(
            feats=tuple(feats), routing=routing,
            aux_losses=merge_losses(*losses),
            text=None if run is None else run.finish(),
            prefix_tokens=tuple(prefix))

    def block_tokens(self, x: Tensor, *, num_blocks: Optional[int] = None,
                     norm: bool = False) -> List[Tensor]:
        """Patch tokens after each block, without any adapter.

        For a frozen second backbone whose every block feeds the adapters
        of another (SpectralMoE's depth stream). Prefix tokens (class,
        registers) are dropped; ``norm`` applies the final LayerNorm to
        each entry. With ``trainable='frozen'`` it runs under
        ``torch.no_grad()`` (no graph is kept).

        Args:
            x: B x in_channels x H x W images.
            num_blocks: run only the first ``num_blocks`` blocks (default
                all).

        Returns:
            ``num_blocks`` tensors of B x (h*w) x C, entry i after block i.
        """
        L = self.num_layers if num_blocks is None else num_blocks
        if not 1 <= L <= self.num_layers:
            raise ValueError(f'num_blocks must be in 1..{self.num_layers}, '
                             f'got {num_blocks}')
        grad = torch.no_grad() if self.trainable == 'frozen' else \
            nullcontext()
        out: List[Tensor] = []
        with grad:
            tokens, hw = self.prepare_tokens(x)
            P = self.num_prefix_tokens
            for i in range(L):
                tokens = self._run_block(i, tokens, hw=hw)
                patches = tokens[:, P:]
                out.append(self.norm(patches) if norm else patches)
        return out

    def forward(self,
                x: Tensor,
                text: Optional[TextFeatures] = None) -> Tuple[Tensor, ...]:
        """B x 3 x H x W -> tuple of B x C x h x w maps (``out_indices``)."""
        return self.forward_features(x, text).feats
