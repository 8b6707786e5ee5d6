"""DINOv3 ViT-S/S+/B/L/L+/H+/7B-16 backbone (RoPE) with adapter slots.

A :class:`~.dinov2.DINOv2` tower whose position encoding is the axial RoPE
of :mod:`.rope` instead of an added table: the blocks are the same
:class:`~.dinov2.DINOv2Block` (the RoPE tables reach their attention as an
argument), and so are the adapter slots, the outputs, the freezing
policies, gradient checkpointing and checkpoint loading. State-dict keys
(after ``tools/model_converters/dinov3_to_sera.py``)::

    cls_token                1 x 1 x C
    register_tokens          1 x R x C        (official storage_tokens)
    rope_embed.periods       d/4              (d = C / heads; as stored)
    patch_embed.proj         Conv2d(3, C, 16, stride 16)
    blocks.N.norm1 / attn.qkv (+ .bias_mask) / attn.proj / ls1.gamma
    blocks.N.norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma
    norm                     final LayerNorm

Input sizes: the patch embedding floors, as the official code does: an
H x W image gives a floor(H / 16) x floor(W / 16) grid and the last
``H mod 16`` rows / ``W mod 16`` columns are not seen (timm raises instead;
zero padding, as :class:`DINOv2` does, would feed the RoPE grid patches the
official model never sees). See ``docs/backbone.md``.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from .dinov2 import DINOv2
from .rope import PERIOD_MODES, AxialRoPE, RopeTables

CONVERTER = 'tools/model_converters/dinov3_to_sera.py'


@MODELS.register_module()
class DINOv3(DINOv2):
    """DINOv3 vision transformer (patch 16, RoPE) with adapter slots.

    Args:
        arch: ``'small' | 'small_plus' | 'base' | 'large' | 'large_plus' |
            'huge_plus' | '7b'`` (or ``'s'/'s+'/'b'/'l'/'l+'/'h+'``) or a
            dict with ``embed_dims, num_layers, num_heads`` and optional
            ``mlp_ratio`` (4.0), ``ffn_type`` (``'mlp'`` | ``'swiglu'`` |
            ``'swiglu64'``), ``qkv_bias`` (True). The sizes are those of
            the official hub models (S+/L+/H+: SwiGLU x 6; 7B: 4096 wide, 40
            blocks, SwiGLU x 3 aligned to 64, no qkv bias).
        patch_size: patch side in pixels.
        in_channels: image channels.
        num_register_tokens: storage tokens (4 in every release).
        out_indices, out_norm, adapter_indices, adapter_cfg, adapters,
            trainable, with_cp, drop_path_rate: as :class:`DINOv2`.
            Unless ``trainable='full'`` the backbone's own modules stay in
            eval mode, so the RoPE coordinate rescaling never fires.
        layer_scale_init_value: initial LayerScale gamma.
        qkv_bias: qkv bias term; None: the arch's (False for ``'7b'``).
        qkv_bias_mask: multiply the qkv bias by the stored ``bias_mask``
            buffer (all releases; needs a qkv bias). The mask comes with
            the weights: 1 / 0 / 1 (no key bias) or all zeros.
        proj_bias / ffn_bias: bias terms (True in every release).
        norm_eps: LayerNorm epsilon (1e-5 in every release).
        rope_base: RoPE period base (100); periods ``base ** (4 j / d)``.
        rope_periods: ``'stored'`` uses the ``rope_embed.periods`` buffer
            as loaded (the official code: its checkpoints store the periods
            rounded to bfloat16), ``'fp32'`` recomputes them from
            ``rope_base`` in float32 on every call (timm). None follows the
            mode a converted checkpoint records (``meta['rope_periods']``),
            else ``'stored'``; an explicit value wins over the record (with
            a warning when they differ). Without a checkpoint the buffer
            holds the float32 values, so both modes agree.
        rope_rescale_coords: in training mode, each block call scales the
            RoPE coordinates by one factor drawn log-uniformly in
            ``[1/s, s]`` (the pre-training augmentation, s = 2). Only a
            backbone with ``trainable='full'`` is ever in training mode;
            default None: fine-tuning sees the positions of evaluation.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH[, prefix=...])``
            loads a checkpoint in this module's layout (convert official /
            timm files with ``tools/model_converters/dinov3_to_sera.py``).
    """
    arch_settings: Dict[str, Dict] = {
        'small': dict(embed_dims=384, num_layers=12, num_heads=6,
                      mlp_ratio=4., ffn_type='mlp', qkv_bias=True),
        'small_plus': dict(embed_dims=384, num_layers=12, num_heads=6,
                           mlp_ratio=6., ffn_type='swiglu', qkv_bias=True),
        'base': dict(embed_dims=768, num_layers=12, num_heads=12,
                     mlp_ratio=4., ffn_type='mlp', qkv_bias=True),
        'large': dict(embed_dims=1024, num_layers=24, num_heads=16,
                      mlp_ratio=4., ffn_type='mlp', qkv_bias=True),
        'large_plus': dict(embed_dims=1024, num_layers=24, num_heads=16,
                           mlp_ratio=6., ffn_type='swiglu', qkv_bias=True),
        'huge_plus': dict(embed_dims=1280, num_layers=32, num_heads=20,
                          mlp_ratio=6., ffn_type='swiglu', qkv_bias=True),
        '7b': dict(embed_dims=4096, num_layers=40, num_heads=32,
                   mlp_ratio=3., ffn_type='swiglu64', qkv_bias=False),
    }
    arch_aliases: Dict[str, str] = {
        's': 'small', 's+': 'small_plus', 'b': 'base', 'l': 'large',
        'l+': 'large_plus', 'h+': 'huge_plus'
    }
    arch_defaults: Dict[str, object] = dict(mlp_ratio=4., ffn_type='mlp',
                                            qkv_bias=True)
    converter = CONVERTER
    RECORD_BUFFERS = ()

    def __init__(self,
                 *,
                 arch: Union[str, Dict] = 'base',
                 patch_size: int = 16,
                 in_channels: int = 3,
                 num_register_tokens: int = 4,
                 out_indices: Sequence[int] = (-1, ),
                 out_norm: str = 'last',
                 adapter_indices: Sequence[int] = (),
                 adapter_cfg: Optional[Dict] = None,
                 adapters: Sequence[Dict] = (),
                 trainable: str = 'frozen',
                 with_cp: bool = False,
                 drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-5,
                 qkv_bias: Optional[bool] = None,
                 qkv_bias_mask: bool = True,
                 proj_bias: bool = True,
                 ffn_bias: bool = True,
                 norm_eps: float = 1e-5,
                 rope_base: float = 100.,
                 rope_periods: Optional[str] = None,
                 rope_rescale_coords: Optional[float] = None,
                 init_cfg: Optional[Union[Dict, List[Dict]]] = None) -> None:
        # DINOv2.__init__ builds a position table; the shared steps are its
        # helpers (_init_common, _build_stem, _build_blocks, ...)
        BaseModule.__init__(self, init_cfg=init_cfg)
        if rope_periods is not None and rope_periods not in PERIOD_MODES:
            raise ValueError(f'rope_periods must be one of {PERIOD_MODES} '
                             f'or None, got {rope_periods!r}')
        settings = self._init_common(
            arch=arch, patch_size=patch_size,
            num_register_tokens=num_register_tokens, out_indices=out_indices,
            out_norm=out_norm, adapter_indices=adapter_indices,
            adapter_cfg=adapter_cfg, trainable=trainable, with_cp=with_cp)
        C, heads = settings['embed_dims'], settings['num_heads']
        if C % heads or (C // heads) % 4:
            raise ValueError(
                f'DINOv3 RoPE needs a head width (embed_dims / num_heads = '
                f'{C} / {heads}) that is an integer divisible by 4')
        qkv_bias = settings['qkv_bias'] if qkv_bias is None else qkv_bias
        self._build_stem(in_channels)
        self.rope_embed = AxialRoPE(head_dims=C // heads, base=rope_base,
                                    rescale_coords=rope_rescale_coords,
                                    mode=rope_periods or 'stored')
        self._rope_from_cfg = rope_periods is not None
        self._build_blocks(
            settings, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value,
            qkv_bias=qkv_bias, qkv_bias_mask=qkv_bias and qkv_bias_mask,
            proj_bias=proj_bias, ffn_bias=ffn_bias, norm_eps=norm_eps)
        self._random_init()
        self._build_adapters(adapter_cfg, adapters)
        self._apply_trainable()

    # ------------------------------------------------------------------
    # construction and weights
    # ------------------------------------------------------------------
    def _random_init(self) -> None:
        """Official DINOv3 init: N(0, 0.02) class/register tokens,
        trunc-normal(0.02) Linear weights, zero biases (qkv bias mask
        1 / 0 / 1, RoPE periods in float32, set when built)."""
        nn.init.normal_(self.cls_token, std=.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def rope_periods(self) -> str:
        """``'stored'`` or ``'fp32'``: which RoPE periods the forward uses
        (see the class docstring)."""
        return self.rope_embed.mode

    def _take_record(self, ckpt: Dict[str, Tensor], meta: Dict,
                     path: str) -> Callable[[], None]:
        """The RoPE period mode a converted checkpoint records
        (``meta['rope_periods']``), applied once the weights are in."""
        recorded = meta.get('rope_periods')
        source = f'{path} ({meta.get("source_layout")} layout)'
        return lambda: self.apply_recorded_rope(recorded, source)

    def apply_recorded_rope(self, recorded: Optional[str],
                            source: str) -> None:
        """Use the RoPE period mode recorded with weights unless the config
        set ``rope_periods`` (a conflicting config wins with a warning).
        The mode used is logged."""
        if recorded is None:
            return
        if recorded not in PERIOD_MODES:
            raise ValueError(f'{source} records rope_periods={recorded!r}, '
                             f'expected one of {PERIOD_MODES}')
        if self._rope_from_cfg:
            if recorded != self.rope_embed.mode:
                print_log(
                    f'{source} records rope_periods={recorded!r}, the config '
                    f'sets {self.rope_embed.mode!r}; the config wins. Remove '
                    'rope_periods from the config to reproduce the source.',
                    logger='current', level=30)
            origin = 'config'
        else:
            self.rope_embed.mode = recorded
            origin = source
        print_log(f'DINOv3 RoPE periods: {self.rope_embed.mode} ({origin})',
                  logger='current')

    # ------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------
    def prepare_tokens(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """B x 3 x H x W -> tokens B x (1 + R + h*w) x C, ordered
        [class, registers, patches], and the grid (h, w) =
        (floor(H / p), floor(W / p)) (the official patch embedding drops
        the last ``H mod p`` rows and ``W mod p`` columns). No position is
        added: the blocks rotate q and k (:meth:`block_rope`)."""
        self._check_input(x)
        p = self.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        if not h or not w:
            raise ValueError(f'DINOv3 needs images of at least {p} x {p} '
                             f'pixels, got {tuple(x.shape[2:])}')
        tokens = self.patch_embed(x)  # B x hw x C
        B = tokens.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        return torch.cat(prefix + [tokens], dim=1), (h, w)

    def block_rope(self, hw: Tuple[int, int]) -> RopeTables:
        """RoPE tables of an h x w grid for the next block (drawn per block
        call: in training mode with ``rope_rescale_coords`` each block
        gets its own scale, as in the official code)."""
        return self.rope_embed(*hw)
