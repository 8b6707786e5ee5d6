"""Convert SpectralMoE's released ``DepthMoE`` adapter weights into our
``SpectralMoEAdapter`` slots.

Usage::

    python tools/model_converters/spectralmoe_to_sera.py SRC DST \
        [--prefix adapters.] [--blocks 0 1 ... 23]

SRC: the released checkpoint (its ``backbone.depthmoe.*`` keys are taken,
the Mask2Former head's are left out) or the module's own state dict. DST
holds ``dict(state_dict=..., meta=dict(adapter_cfg=...))``: the adapters'
weights under ``--prefix`` (default ``adapters.``: load them into the
adapted tower, e.g. the ``backbone`` of a ``DualStreamDINOv2`` on a
DINOv3-L, with ``load_state_dict(..., strict=False)`` next to its converted
backbone checkpoint) and the ``SpectralMoEAdapter`` config that matches
them (``released_compat=True``). The key map is in
:mod:`mmseg_sera.models.spectral_moe_checkpoint`.
"""
import argparse
import sys

import torch

from mmseg_sera.engine.checkpoint import CheckpointError, read_checkpoint
from mmseg_sera.models.spectral_moe_checkpoint import (convert_depthmoe,
                                                       released_adapter_cfg,
                                                       unwrap_depthmoe)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='released SpectralMoE checkpoint')
    parser.add_argument('dst', help='output file (our adapter keys)')
    parser.add_argument('--prefix', default='adapters.',
                        help='key prefix of the adapters (default: '
                        'adapters., the adapted tower)')
    parser.add_argument('--blocks', type=int, nargs='+', default=None,
                        help='our block of each released layer (default: '
                        'layer l on block l)')
    args = parser.parse_args(argv)
    try:
        sd = unwrap_depthmoe(read_checkpoint(args.src))
        out = convert_depthmoe(sd, blocks=args.blocks, prefix=args.prefix)
        cfg = released_adapter_cfg(sd)
    except CheckpointError as err:  # names the file itself
        parser.error(str(err))
    except (OSError, KeyError, ValueError) as err:
        parser.error(f'{args.src}: {err}')
    torch.save(dict(state_dict=out, meta=dict(adapter_cfg=cfg)), args.dst)
    print(f'converted {len(sd)} -> {len(out)} tensors into {args.dst}')
    print(f'adapter config: {cfg}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
