"""DINOv3 checkpoints (official facebookresearch or timm layout) into the
layout of :class:`~mmseg_sera.models.backbones.DINOv3`; pure functions
(state dict in, state dict out) behind
``tools/model_converters/dinov3_to_sera.py``.

Key maps, source -> ours (``blocks.i.`` omitted inside blocks):

=============================  ========================  ====================
official                       timm (``eva.py``)         ours
=============================  ========================  ====================
``storage_tokens``             ``reg_token``             ``register_tokens``
``rope_embed.periods``         (none: recomputed fp32)   ``rope_embed.periods``
``attn.qkv.bias``,             ``attn.q_bias``,          ``attn.qkv.bias`` =
``attn.qkv.bias_mask``         ``attn.v_bias``           [q, 0, v],
                                                         ``bias_mask`` 1/0/1
``ls1.gamma`` / ``ls2.gamma``  ``gamma_1`` / ``gamma_2``  ``ls1/ls2.gamma``
``mlp.w1`` / ``w2`` / ``w3``   ``mlp.fc1_g`` / ``fc1_x``  ``mlp.fc1`` =
(SwiGLU)                       / ``fc2``                 [gate; value],
                                                         ``mlp.fc2``
``mask_token``,                ``head.*``                dropped
``local_cls_norm.*``
=============================  ========================  ====================

``mlp.fc1/fc2`` (plain MLP), ``norm1/2``, ``attn.qkv.weight``,
``attn.proj``, ``patch_embed.proj``, ``cls_token`` and ``norm`` keep their
names. A timm model without ``q_bias`` / ``v_bias`` (timm's plain DINOv3
models; the official release whose ``bias_mask`` is all zeros) gets a zero
qkv bias and a zero mask, so that it loads into the hub-size configs
(``qkv_bias_mask=True``) with the same features; for the 7B (no qkv bias in
any layout) nothing is added.

What the model needs to reproduce the source is recorded in ``meta``
(:func:`describe`): ``rope_periods='stored'`` for official files (the
forward uses the stored, bfloat16-rounded periods, as the official code
does) and ``'fp32'`` for timm (recomputed from base 100 in float32, as timm
does; the converter also writes these values into the buffer). The two
differ by about 2e-3 on patch features of std ~1; see ``docs/backbone.md``.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .backbones.dinov3 import DINOv3
from .backbones.rope import rope_periods
from .vit_checkpoint import unwrap_checkpoint

LAYOUTS = ('auto', 'official', 'timm')

_OFFICIAL_RE = re.compile(r'^(storage_tokens|mask_token|rope_embed\.periods|'
                          r'local_cls_norm\..*|blocks\.\d+\.(ls[12]\.gamma|'
                          r'attn\.qkv\.bias_mask|mlp\.w[123]\..*))$')
_TIMM_RE = re.compile(r'^(reg_token|blocks\.\d+\.(gamma_[12]|attn\.[qv]_bias|'
                      r'mlp\.fc1_[gx]\..*))$')
# keys that only DINOv3 files hold (a DINOv2 file has ls1.gamma and
# mask_token too, and pos_embed, which no DINOv3 file has)
_DINOV3_ONLY_RE = re.compile(r'^(storage_tokens|rope_embed\.periods|'
                             r'blocks\.\d+\.(attn\.qkv\.bias_mask|gamma_[12]|'
                             r'attn\.[qv]_bias|mlp\.(w[12]|fc1_[gx])\..*))$')
_OUR_RE = re.compile(
    r'^(cls_token|register_tokens|rope_embed\.periods|'
    r'patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|'
    r'blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.qkv\.(weight|bias|'
    r'bias_mask)|attn\.proj\.(weight|bias)|ls[12]\.gamma|'
    r'mlp\.fc[12]\.(weight|bias)))$')
_DROP_RE = re.compile(r'^(mask_token|local_cls_norm\..*|head\..*)$')
_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.(.*)$')


def dinov3_markers(state_dict: Dict[str, Tensor]) -> List[str]:
    """The keys of ``state_dict`` that only DINOv3 checkpoints (official or
    timm) hold, sorted (empty for a DINOv2 or plain ViT state dict)."""
    return sorted(k for k in state_dict if _DINOV3_ONLY_RE.match(k))


def detect_layout(state_dict: Dict[str, Tensor]) -> str:
    """``'official'`` or ``'timm'`` for a DINOv3 state dict.

    Raises:
        ValueError: a state dict with a learned position table
            (``pos_embed``: DINOv2 or another ViT; the message names
            ``dinov2_to_sera.py``), one that mixes both layouts, or one
            without the keys of either.
    """
    keys = set(state_dict)
    if 'pos_embed' in keys:
        raise ValueError(
            'this state dict has a learned position table (pos_embed): a '
            'DINOv2 (or other ViT) checkpoint, not DINOv3 (RoPE). Convert '
            'DINOv2 files with tools/model_converters/dinov2_to_sera.py')
    official = sorted(k for k in keys if _OFFICIAL_RE.match(k))
    timm = sorted(k for k in keys if _TIMM_RE.match(k))
    if official and timm:
        raise ValueError(f'state dict mixes official ({official[:3]}) and '
                         f'timm ({timm[:3]}) DINOv3 keys')
    if 'cls_token' not in keys or not (official or timm):
        raise ValueError(
            'not a DINOv3 state dict: no cls_token, or none of '
            'storage_tokens / rope_embed.periods / ls1.gamma (official) or '
            f'reg_token / gamma_1 (timm); first keys: {sorted(keys)[:8]}')
    return 'official' if official else 'timm'


def _block_keys(sd: Dict[str, Tensor]) -> Dict[int, Dict[str, Tensor]]:
    blocks: Dict[int, Dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = _BLOCK_RE.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return blocks


def _convert_block(b: Dict[str, Tensor], layout: str,
                   add_zero_bias: bool) -> Dict[str, Tensor]:
    """One block's keys (without ``blocks.i.``) into ours."""
    b = dict(b)
    out: Dict[str, Tensor] = {}
    if layout == 'official':
        # SwiGLU: w1 gates, w2 is the value: fc1 = [w1; w2], fc2 = w3
        if 'mlp.w1.weight' in b:
            for p in ('weight', 'bias'):
                if f'mlp.w1.{p}' in b:
                    out[f'mlp.fc1.{p}'] = torch.cat(
                        [b.pop(f'mlp.w1.{p}'), b.pop(f'mlp.w2.{p}')])
                if f'mlp.w3.{p}' in b:
                    out[f'mlp.fc2.{p}'] = b.pop(f'mlp.w3.{p}')
        mask = b.get('attn.qkv.bias_mask')
        if mask is not None and torch.isnan(mask).any():
            raise ValueError(
                'attn.qkv.bias_mask holds NaN (the official buffer before '
                'init_weights): not a trained checkpoint')
        if 'attn.qkv.bias' in b and mask is None:
            raise ValueError('an official DINOv3 block with a qkv bias but '
                             'no attn.qkv.bias_mask')
    else:
        for i in (1, 2):
            if f'gamma_{i}' in b:
                out[f'ls{i}.gamma'] = b.pop(f'gamma_{i}')
        if 'mlp.fc1_g.weight' in b:
            for p in ('weight', 'bias'):
                if f'mlp.fc1_g.{p}' in b:
                    out[f'mlp.fc1.{p}'] = torch.cat(
                        [b.pop(f'mlp.fc1_g.{p}'), b.pop(f'mlp.fc1_x.{p}')])
        if 'attn.q_bias' in b:
            q, v = b.pop('attn.q_bias'), b.pop('attn.v_bias')
            out['attn.qkv.bias'] = torch.cat([q, torch.zeros_like(q), v])
            out['attn.qkv.bias_mask'] = torch.cat(
                [torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)])
    if add_zero_bias and 'attn.qkv.bias' not in b \
            and 'attn.qkv.bias' not in out:
        w = b['attn.qkv.weight']
        out['attn.qkv.bias'] = w.new_zeros(w.shape[0])
        out['attn.qkv.bias_mask'] = w.new_zeros(w.shape[0])
    out.update(b)
    return out


def match_arch(embed_dims: int, num_layers: int,
               ffn_rows: int) -> Optional[str]:
    """The :attr:`DINOv3.arch_settings` name of this width, depth and FFN
    input projection (``mlp.fc1`` rows: H, or 2H for SwiGLU), or None."""
    for name, a in DINOv3.arch_settings.items():
        if (a['embed_dims'], a['num_layers']) != (embed_dims, num_layers):
            continue
        hidden = int(embed_dims * a['mlp_ratio'])
        if a['ffn_type'] != 'mlp':
            align = 64 if a['ffn_type'] == 'swiglu64' else 8
            d = int(hidden * 2 / 3)
            hidden = 2 * (d + (-d) % align)
        if ffn_rows == hidden:
            return name
    return None


def _ffn_rows(block: Dict[str, Tensor]) -> int:
    """Rows of the (packed) FFN input projection of one block, any
    layout."""
    for keys in (('mlp.fc1.weight', ), ('mlp.w1.weight', 'mlp.w2.weight'),
                 ('mlp.fc1_g.weight', 'mlp.fc1_x.weight')):
        if all(k in block for k in keys):
            return sum(block[k].shape[0] for k in keys)
    raise ValueError('block 0 has no FFN input projection (mlp.fc1 / '
                     f'w1, w2 / fc1_g, fc1_x); its keys: {sorted(block)}')


def convert_dinov3(state_dict: Dict[str, Tensor],
                   src: str = 'auto',
                   *,
                   num_heads: Optional[int] = None,
                   rope_base: float = 100.,
                   prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """Convert an official or timm DINOv3 state dict into our layout.

    Args:
        state_dict: the source weights (wrapped checkpoints are unwrapped,
            see :func:`~mmseg_sera.models.vit_checkpoint.unwrap_checkpoint`).
        src: ``'official'``, ``'timm'`` or ``'auto'`` (:func:`detect_layout`).
        num_heads: attention heads; needed for a timm file (its RoPE
            periods are written here, d = C / heads) unless its size is
            one of :attr:`DINOv3.arch_settings`. An official file's periods
            give d; a contradicting ``num_heads`` raises.
        rope_base: period base for the timm periods (100 in every release).
        prefix: keep only the keys under this prefix.

    Returns:
        A new state dict with the keys of ``DINOv3`` (adapters excluded).

    Raises:
        ValueError: a DINOv2 checkpoint, an unknown ``src`` or one the keys
            contradict, keys with no place in our layout (listed), a
            missing head count.
    """
    if src not in LAYOUTS:
        raise ValueError(f'src must be one of {LAYOUTS}, got {src!r}')
    sd = unwrap_checkpoint(state_dict, prefix)
    found = detect_layout(sd)
    if src != 'auto' and src != found:
        raise ValueError(f'--layout {src} given, but the keys are those of '
                         f'the {found} layout')
    layout = found
    blocks = _block_keys(sd)
    if 0 not in blocks:
        raise ValueError('the state dict has no blocks.0.*')
    C = sd['cls_token'].shape[-1]
    arch = match_arch(C, len(blocks), _ffn_rows(blocks[0]))
    out: Dict[str, Tensor] = {}
    # the 7B has no qkv bias anywhere; every other size has a masked one
    add_zero_bias = layout == 'timm' and (
        arch is None or DINOv3.arch_settings[arch]['qkv_bias'])
    for i, block in sorted(blocks.items()):
        for k, v in _convert_block(block, layout, add_zero_bias).items():
            out[f'blocks.{i}.{k}'] = v
    for k, v in sd.items():
        if _BLOCK_RE.match(k) or _DROP_RE.match(k):
            continue
        if k in ('storage_tokens', 'reg_token'):
            k = 'register_tokens'
        out[k] = v
    unknown = sorted(k for k in out if not _OUR_RE.match(k))
    if unknown:
        raise ValueError(
            f'{len(unknown)} key(s) of the {layout} checkpoint have no place '
            f'in the mmseg_sera DINOv3 layout: {unknown[:12]}')

    if 'rope_embed.periods' in out:
        d = 4 * out['rope_embed.periods'].numel()
        if num_heads is not None and C != num_heads * d:
            raise ValueError(
                f'num_heads={num_heads} contradicts the stored RoPE periods '
                f'({d // 4} of them: head width {d}, {C // d} heads)')
    else:
        if num_heads is None:
            if arch is None:
                raise ValueError(
                    f'a {C}-wide timm DINOv3 of {len(blocks)} '
                    'blocks is none of the released sizes: give num_heads '
                    '(--num-heads) to compute its RoPE periods')
            num_heads = DINOv3.arch_settings[arch]['num_heads']
        if C % num_heads or (C // num_heads) % 4:
            raise ValueError(f'num_heads={num_heads} does not split width '
                             f'{C} into heads of a multiple of 4')
        out['rope_embed.periods'] = rope_periods(C // num_heads, rope_base)
    return {k: v.clone() for k, v in out.items()}


def _mask_kind(mask: Optional[Tensor]) -> str:
    if mask is None:
        return 'none'
    n = mask.numel() // 3
    if not mask.any():
        return 'zeros'
    if (mask[:n].all() and not mask[n:2 * n].any()
            and mask[2 * n:].all()):
        return 'q_v'
    return 'other'


def describe(state_dict: Dict[str, Tensor], layout: str) -> Dict:
    """Model options implied by a converted state dict (stored as ``meta``
    and printed by the CLI); ``rope_periods`` is what reproduces the
    source (see the module docstring)."""
    C = state_dict['cls_token'].shape[-1]
    periods = state_dict['rope_embed.periods']
    d = 4 * periods.numel()
    fc1 = state_dict['blocks.0.mlp.fc1.weight']
    fc2 = state_dict['blocks.0.mlp.fc2.weight']
    R = state_dict['register_tokens'].shape[1] \
        if 'register_tokens' in state_dict else 0
    L = len(_block_keys(state_dict))
    return dict(
        source_layout=layout,
        arch=match_arch(C, L, fc1.shape[0]),
        embed_dims=C,
        num_layers=L,
        num_heads=C // d,
        ffn_type='swiglu' if fc1.shape[0] == 2 * fc2.shape[1] else 'mlp',
        patch_size=state_dict['patch_embed.proj.weight'].shape[-1],
        num_register_tokens=R,
        qkv_bias='blocks.0.attn.qkv.bias' in state_dict,
        qkv_bias_mask=_mask_kind(
            state_dict.get('blocks.0.attn.qkv.bias_mask')),
        rope_periods='stored' if layout == 'official' else 'fp32',
        rope_periods_bf16=periods_rounded_to_bf16(periods))


def check_arch(meta: Dict, arch: str) -> None:
    """Raise ``ValueError`` unless a converted checkpoint (its
    :func:`describe` ``meta``) has the size of :class:`DINOv3` ``arch``."""
    want = DINOv3._resolve_arch(arch)
    got: Tuple = (meta['embed_dims'], meta['num_layers'], meta['num_heads'])
    exp: Tuple = (want['embed_dims'], want['num_layers'], want['num_heads'])
    if got != exp or (meta.get('arch') is not None
                      and DINOv3.arch_aliases.get(arch, arch) != meta['arch']):
        raise ValueError(
            f'the checkpoint is a DINOv3 of width {got[0]}, {got[1]} blocks, '
            f'{got[2]} heads (arch {meta.get("arch")!r}); arch {arch!r} has '
            f'{exp[0]} / {exp[1]} / {exp[2]}')


def periods_rounded_to_bf16(periods: Tensor) -> bool:
    """Whether every period is a bfloat16 value (the official releases'
    stored periods are; float32 recomputations are not)."""
    return bool(torch.equal(periods.float(),
                            periods.to(torch.bfloat16).float()))


__all__ = [
    'LAYOUTS', 'dinov3_markers', 'detect_layout', 'convert_dinov3',
    'describe', 'check_arch', 'match_arch', 'periods_rounded_to_bf16'
]
