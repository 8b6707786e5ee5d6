"""Write the synthetic referring-segmentation set in the refer layout, or
with ``--generalized`` the generalized (GRES) set in the gRefCOCO layout.

    python tools/data/make_synthetic_refer.py --out data/synthetic_refer \
        --num-images 1000 --img-size 112 --seed 0
    python tools/data/make_synthetic_refer.py --generalized \
        --out data/synthetic_grefer --num-images 1000

Output (``--out`` is the ``data_root`` of
``configs/_base_/datasets/synthetic_refer.py`` /
``configs/_base_/datasets/synthetic_grefer.py``)::

    OUT/refcoco/instances.json
    OUT/refcoco/refs(unc).p            splits train / val / testA / testB
    OUT/images/mscoco/images/train2014/COCO_train2014_<id:012d>.jpg

    --generalized:
    OUT/grefcoco/instances.json
    OUT/grefcoco/grefs(unc).json       ann_id lists, [-1] = no target
    OUT/images/train2014/COCO_train2014_<id:012d>.jpg

The same arguments always give the same files.  See
``mmseg_sera/datasets/synthetic.py`` and ``synthetic_gres.py`` for the
sentence grammars.
"""
import argparse
import json

from mmseg_sera.datasets.synthetic import SynthConfig, generate_refer_set
from mmseg_sera.datasets.synthetic_gres import (GresSynthConfig,
                                                generate_grefer_set)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Generate the synthetic refer set (RefCOCO layout) or, '
        'with --generalized, the generalized set (gRefCOCO layout)')
    p.add_argument('--out', default=None,
                   help='output folder (data_root); default '
                   'data/synthetic_refer, or data/synthetic_grefer with '
                   '--generalized')
    p.add_argument('--generalized', action='store_true',
                   help='multi-target, no-target, ordinal and negation '
                   'sentences in the gRefCOCO layout')
    p.add_argument('--num-images', type=int, default=1000)
    p.add_argument('--img-size', type=int, default=112,
                   help='side of the square images in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--min-objects', type=int, default=None,
                   help='default 2, or 4 with --generalized')
    p.add_argument('--max-objects', type=int, default=None,
                   help='default 5, or 8 with --generalized')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = GresSynthConfig() if args.generalized else SynthConfig()
    if args.min_objects is not None:
        cfg.min_objects = args.min_objects
    if args.max_objects is not None:
        cfg.max_objects = args.max_objects
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError('need 1 <= --min-objects <= --max-objects, got '
                         f'{cfg.min_objects}, {cfg.max_objects}')
    generate = generate_grefer_set if args.generalized else \
        generate_refer_set
    out = args.out or ('data/synthetic_grefer' if args.generalized else
                       'data/synthetic_refer')
    summary = generate(
        out, num_images=args.num_images, img_size=args.img_size,
        seed=args.seed, progress=not args.quiet, cfg=cfg)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == '__main__':
    main()
