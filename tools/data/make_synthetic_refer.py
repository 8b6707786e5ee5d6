"""Write the synthetic referring-segmentation set in the refer layout.

    python tools/data/make_synthetic_refer.py --out data/synthetic_refer \
        --num-images 1000 --img-size 112 --seed 0

Output (``--out`` is the ``data_root`` of
``configs/_base_/datasets/synthetic_refer.py``)::

    OUT/refcoco/instances.json
    OUT/refcoco/refs(unc).p            splits train / val / testA / testB
    OUT/images/mscoco/images/train2014/COCO_train2014_<id:012d>.jpg

The same arguments always give the same files.  See
``mmseg_sera/datasets/synthetic.py`` for the sentence grammar.
"""
import argparse
import json

from mmseg_sera.datasets.synthetic import SynthConfig, generate_refer_set


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Generate the synthetic refer set (RefCOCO layout)')
    p.add_argument('--out', default='data/synthetic_refer',
                   help='output folder (data_root)')
    p.add_argument('--num-images', type=int, default=1000)
    p.add_argument('--img-size', type=int, default=112,
                   help='side of the square images in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--min-objects', type=int, default=2)
    p.add_argument('--max-objects', type=int, default=5)
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 1 <= args.min_objects <= args.max_objects:
        raise ValueError('need 1 <= --min-objects <= --max-objects, got '
                         f'{args.min_objects}, {args.max_objects}')
    cfg = SynthConfig(min_objects=args.min_objects,
                      max_objects=args.max_objects)
    summary = generate_refer_set(
        args.out, num_images=args.num_images, img_size=args.img_size,
        seed=args.seed, progress=not args.quiet, cfg=cfg)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == '__main__':
    main()
