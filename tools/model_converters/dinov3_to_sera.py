"""Convert DINOv3 checkpoints (official facebookresearch or timm layout) into
the layout of ``mmseg_sera.models.backbones.DINOv3``.

Usage::

    python tools/model_converters/dinov3_to_sera.py SRC DST \
        [--layout auto|official|timm] [--num-heads N] [--arch NAME] \
        [--prefix P]

SRC: an official hub file (``dinov3_vitl16_pretrain_lvd1689m-*.pth``, a
state dict) or a timm state dict (``torch.save(model.state_dict())`` or
``.safetensors``). DST holds ``dict(state_dict=..., meta=...)``; ``meta``
records what the backbone needs to reproduce the source (``rope_periods``:
``'stored'`` for official files, ``'fp32'`` for timm; applied unless the
config sets ``rope_periods``). ``--arch`` checks the size against a
``DINOv3`` arch name. The key map and the differences between the two
sources are in :mod:`mmseg_sera.models.dinov3_checkpoint`, which does the
conversion (pure functions).
"""
import argparse
import sys

import torch

from mmseg_sera.engine.checkpoint import CheckpointError, read_checkpoint
from mmseg_sera.models.dinov3_checkpoint import (LAYOUTS, check_arch,
                                                 convert_dinov3, describe,
                                                 detect_layout)
from mmseg_sera.models.vit_checkpoint import unwrap_checkpoint


def _read(path: str):
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path, device='cpu')
    return read_checkpoint(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='official or timm DINOv3 checkpoint')
    parser.add_argument('dst', help='output file (mmseg_sera layout)')
    parser.add_argument('--layout', choices=LAYOUTS, default='auto',
                        help='source layout (default: detect)')
    parser.add_argument('--num-heads', type=int, default=None,
                        help='attention heads (a timm file of a size that '
                        'is not a released one needs it)')
    parser.add_argument('--arch', default=None,
                        help='check that the checkpoint has the size of '
                        'this DINOv3 arch (e.g. large)')
    parser.add_argument('--prefix', default=None,
                        help='convert only the keys under this prefix')
    args = parser.parse_args(argv)
    try:
        sd = unwrap_checkpoint(_read(args.src), args.prefix)
        layout = detect_layout(sd) if args.layout == 'auto' else args.layout
        out = convert_dinov3(sd, src=layout, num_heads=args.num_heads)
        meta = describe(out, layout)
        if args.arch is not None:
            check_arch(meta, args.arch)
    except CheckpointError as err:  # names the file itself
        parser.error(str(err))
    except (OSError, ValueError) as err:
        parser.error(f'{args.src}: {err}')
    torch.save(dict(state_dict=out, meta=meta), args.dst)
    print(f'converted {len(sd)} -> {len(out)} tensors ({layout} layout) '
          f'into {args.dst}')
    print('backbone options: ' + ', '.join(
        f'{k}={v!r}' for k, v in meta.items() if k != 'source_layout'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
