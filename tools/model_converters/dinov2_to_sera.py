"""Convert DINOv2 checkpoints (official facebookresearch or timm layout) into
the layout of ``mmseg_sera.models.backbones.DINOv2``.

Usage::

    python tools/model_converters/dinov2_to_sera.py SRC DST \
        [--layout auto|official|timm]

Layouts (source -> ours):

* official (``dinov2_vitb14_pretrain.pth``, ``..._reg4_pretrain.pth``, or a
  training checkpoint with a ``teacher`` entry): ``cls_token``,
  ``pos_embed`` 1 x (1 + 37*37) x C, ``register_tokens`` 1 x 4 x C,
  ``mask_token`` (dropped), ``blocks.i.*`` -- or ``blocks.c.i.*`` when saved
  with ``block_chunks > 0`` (flattened) -- with the SwiGLU FFN of ViT-g named
  ``mlp.w12`` / ``mlp.w3`` (renamed ``mlp.fc1`` / ``mlp.fc2``).
* timm (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``):
  ``reg_token`` (-> ``register_tokens``); the reg4 models are built with
  ``no_embed_class=True``: their ``pos_embed`` (1 x 37*37 x C) has no class
  entry and timm has folded the class position into ``cls_token``. We store
  a zero class entry, so ``cls_token + 0`` reproduces timm exactly.
  ``head.*`` is dropped.

Our layout keeps the class entry of the position table and never resizes
the stored 37 x 37 table: the backbone resamples it at run time. How depends
on the source code; the saved ``meta`` records it and the backbone applies it
unless the config sets the options explicitly:

* official, no registers: ``interpolate_offset=0.1``, no antialias;
* official reg4: ``interpolate_offset=0.0``, antialias;
* timm (all): bicubic to size with antialias = ``interpolate_offset=0.0,
  interpolate_antialias=True``.

The functions here are pure (state dict in, state dict out).
"""
import argparse
import math
import re
import sys
from typing import Dict, Optional

import torch
from torch import Tensor

from mmseg_sera.engine.checkpoint import CheckpointError, read_checkpoint
from mmseg_sera.models.dinov3_checkpoint import dinov3_markers
from mmseg_sera.models.vit_checkpoint import unwrap_checkpoint

LAYOUTS = ('auto', 'official', 'timm')

# Keys of our layout (after conversion).
_OUR_KEYS = [
    r'cls_token', r'register_tokens', r'pos_embed',
    r'patch_embed\.proj\.(weight|bias)',
    r'blocks\.\d+\.norm[12]\.(weight|bias)',
    r'blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)',
    r'blocks\.\d+\.ls[12]\.gamma', r'blocks\.\d+\.mlp\.fc[12]\.(weight|bias)',
    r'norm\.(weight|bias)'
]
_OUR_KEY_RE = re.compile('^(' + '|'.join(_OUR_KEYS) + ')$')
# Keys that carry nothing for dense features.
_DROP_RE = re.compile(r'^(mask_token|head\..*)$')
_CHUNK_RE = re.compile(r'^blocks\.(\d+)\.(\d+)\.(.*)$')


def detect_layout(state_dict: Dict[str, Tensor]) -> str:
    """``'official'`` or ``'timm'``.

    official: has ``mask_token`` or ``register_tokens`` or ``mlp.w12`` or
    chunked block keys; timm: has ``reg_token``, or none of these (timm
    files have no ``mask_token``; for a model without registers the two
    layouts then coincide apart from the resampling mode).
    """
    keys = set(state_dict)
    official = ('mask_token' in keys or 'register_tokens' in keys or any(
        '.mlp.w12.' in k or _CHUNK_RE.match(k) for k in keys))
    timm = 'reg_token' in keys
    if official and timm:
        raise ValueError('state dict mixes official (mask_token/'
                         'register_tokens/w12/chunked blocks) and timm '
                         '(reg_token) keys')
    markers = dinov3_markers(state_dict)
    if markers and 'pos_embed' not in keys:
        raise ValueError(
            'this is a DINOv3 checkpoint (RoPE, no pos_embed table; has '
            f'{markers[:3]}): convert it with '
            'tools/model_converters/dinov3_to_sera.py')
    if 'pos_embed' not in keys or 'cls_token' not in keys:
        raise ValueError('not a DINOv2 state dict: no pos_embed/cls_token '
                         f'(first keys: {sorted(keys)[:8]})')
    return 'official' if official else 'timm'


def _grid_side(n: int) -> Optional[int]:
    m = math.isqrt(n)
    return m if m * m == n else None


def _flatten_chunks(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``blocks.<chunk>.<i>.x`` -> ``blocks.<i>.x`` (official FSDP chunks pad
    each chunk with Identity, so ``i`` already is the global index)."""
    out = {}
    for k, v in sd.items():
        m = _CHUNK_RE.match(k)
        if m:
            k = f'blocks.{m.group(2)}.{m.group(3)}'
            if k in out:
                raise ValueError(f'block key {k} appears in two chunks')
        out[k] = v
    return out


def convert_dinov2(state_dict: Dict[str, Tensor],
                   src: str = 'auto',
                   prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """Convert an official or timm DINOv2 state dict into our layout.

    Args:
        state_dict: the source weights (wrapped checkpoints are unwrapped,
            see :func:`unwrap_checkpoint`).
        src: ``'official'``, ``'timm'`` or ``'auto'`` (:func:`detect_layout`).
        prefix: keep only the keys under this prefix (see
            :func:`unwrap_checkpoint`).

    Returns:
        A new state dict with the keys of ``DINOv2`` (adapters excluded);
        ``pos_embed`` is 1 x (1 + M*M) x C with the class entry first.

    Raises:
        ValueError: unknown ``src``, a layout that contradicts ``src``, or
            keys that have no place in our layout (listed).
    """
    if src not in LAYOUTS:
        raise ValueError(f'src must be one of {LAYOUTS}, got {src!r}')
    sd = unwrap_checkpoint(state_dict, prefix)
    found = detect_layout(sd)
    compatible = found == src or (found, src) == ('timm', 'official')
    if src != 'auto' and not compatible:
        # A timm-looking dict without registers/mask_token is also a valid
        # official dict; the reverse (reg_token / chunks / w12 claimed to be
        # timm) is a contradiction.
        raise ValueError(f'--layout {src} given, but the keys are those of '
                         f'the {found} layout')
    layout = found if src == 'auto' else src
    if layout == 'official':
        sd = _flatten_chunks(sd)
    out: Dict[str, Tensor] = {}
    dropped, unknown = [], []
    for k, v in sd.items():
        if _DROP_RE.match(k):
            dropped.append(k)
            continue
        k = re.sub(r'^(blocks\.\d+\.mlp)\.w12\.', r'\1.fc1.', k)
        k = re.sub(r'^(blocks\.\d+\.mlp)\.w3\.', r'\1.fc2.', k)
        if k == 'reg_token':
            k = 'register_tokens'
        if not _OUR_KEY_RE.match(k):
            unknown.append(k)
            continue
        out[k] = v.clone()
    if unknown:
        raise ValueError(
            f'{len(unknown)} key(s) of the {layout} checkpoint have no place '
            f'in the mmseg_sera DINOv2 layout: {sorted(unknown)[:12]}')

    # Position table: store the class entry first.
    pos, C = out['pos_embed'], out['cls_token'].shape[-1]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != C:
        raise ValueError(f'pos_embed has shape {tuple(pos.shape)}, expected '
                         f'1 x N x {C}')
    n = pos.shape[1]
    if _grid_side(n) is not None and n > 1:
        # timm no_embed_class (reg4 models): no class entry; timm adds no
        # position to the class token (its class position is folded into
        # cls_token), so a zero entry reproduces it.
        out['pos_embed'] = torch.cat([pos.new_zeros(1, 1, C), pos], dim=1)
    elif _grid_side(n - 1) is None:
        raise ValueError(f'pos_embed has {n} positions: neither M*M nor '
                         '1 + M*M (position entries for register tokens are '
                         'not supported)')
    return out


def describe(state_dict: Dict[str, Tensor], layout: str) -> Dict:
    """Model options implied by a converted state dict (stored as ``meta``
    and printed by the CLI)."""
    blocks = {int(m.group(1)) for k in state_dict
              for m in [re.match(r'blocks\.(\d+)\.', k)] if m}
    C = state_dict['cls_token'].shape[-1]
    R = state_dict['register_tokens'].shape[1] \
        if 'register_tokens' in state_dict else 0
    fc1 = state_dict.get('blocks.0.mlp.fc1.weight')
    fc2 = state_dict.get('blocks.0.mlp.fc2.weight')
    ffn = 'swiglu' if (fc1 is not None and fc2 is not None
                       and fc1.shape[0] == 2 * fc2.shape[1]) else 'mlp'
    if layout == 'official' and R == 0:
        offset, antialias = 0.1, False
    else:
        offset, antialias = 0.0, True
    return dict(
        source_layout=layout,
        embed_dims=C,
        num_layers=len(blocks),
        ffn_type=ffn,
        patch_size=state_dict['patch_embed.proj.weight'].shape[-1],
        pos_grid=_grid_side(state_dict['pos_embed'].shape[1] - 1),
        num_register_tokens=R,
        interpolate_offset=offset,
        interpolate_antialias=antialias)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='official or timm DINOv2 checkpoint')
    parser.add_argument('dst', help='output file (mmseg_sera layout)')
    parser.add_argument('--layout', choices=LAYOUTS, default='auto',
                        help='source layout (default: detect)')
    parser.add_argument('--prefix', default=None,
                        help="convert only the keys under this prefix, e.g. "
                        "'pretrained.' for the DINOv2 encoder of a "
                        'Depth-Anything style depth network')
    args = parser.parse_args(argv)
    try:
        sd = unwrap_checkpoint(read_checkpoint(args.src), args.prefix)
        layout = detect_layout(sd) if args.layout == 'auto' else args.layout
        out = convert_dinov2(sd, src=layout)
    except CheckpointError as err:  # names the file itself
        parser.error(str(err))
    except (OSError, ValueError) as err:
        parser.error(f'{args.src}: {err}')
    meta = describe(out, layout)
    torch.save(dict(state_dict=out, meta=meta), args.dst)
    dropped = sorted(k for k in sd if _DROP_RE.match(k))
    print(f'converted {len(sd)} -> {len(out)} tensors ({layout} layout) '
          f'into {args.dst}; dropped {dropped}')
    print('backbone options: ' + ', '.join(
        f'{k}={v!r}' for k, v in meta.items() if k != 'source_layout'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
