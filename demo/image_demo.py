"""Segment what a sentence names in an image and save a picture of it.

    python demo/image_demo.py IMAGE "SENTENCE" CONFIG CHECKPOINT \
        --out FILE [--sentence "ANOTHER"]... [--device cpu] [--opacity 0.5]

Writes FILE (PNG or JPEG by extension): one panel per sentence, side by
side, each the image with the predicted mask as a translucent overlay and
its outline, the sentence in a white band above it.  Prints the share of
the image each mask covers, or "no target" where a model with a no-target
scorer (generalized referring segmentation, docs/gres.md) says that the
sentence names nothing in the image (its band then says "no target" too).
"""
import argparse
import sys

from mmseg_sera.apis import inference_model, init_model, show_refer_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Referring segmentation of one image',
        epilog='example: python demo/image_demo.py demo.jpg "the man on the '
        'left" CONFIG CHECKPOINT --out result.png --sentence "the red car"')
    p.add_argument('img', help='image file')
    p.add_argument('sentence', help='referring expression (quote it)')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--sentence', dest='extra', action='append', default=[],
                   metavar='SENTENCE',
                   help='another sentence for the same image (repeatable; '
                   'one panel each, all run in one batch)')
    p.add_argument('--out', '--out-file', dest='out', required=True,
                   help='output picture (.png, .jpg)')
    p.add_argument('--device', default='cpu',
                   help="device, e.g. 'cpu' or 'cuda:0' (default: cpu)")
    p.add_argument('--opacity', type=float, default=0.5,
                   help='weight of the mask colour, in [0, 1] (default 0.5)')
    p.add_argument('--show', action='store_true',
                   help='also open a window (needs a display)')
    args = p.parse_args(argv)
    if not 0.0 <= args.opacity <= 1.0:
        p.error(f'--opacity must be in [0, 1], got {args.opacity}')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    model = init_model(args.config, args.checkpoint, device=args.device)
    sentences = [args.sentence] + list(args.extra)
    results = inference_model(model, args.img, sentences)
    show_refer_result(args.img, results, opacity=args.opacity,
                      out_file=args.out, show=args.show)
    for sample in results:
        if sample.metainfo.get('pred_no_target', False):
            print(f'"{sample.text}": no target (score '
                  f'{sample.no_target_score:.2f})')
            continue
        mask = sample.pred_sem_seg.data[0]
        share = float(mask.float().mean()) * 100
        print(f'"{sample.text}": {int(mask.sum())} pixels ({share:.1f}% of '
              'the image)')
    print(f'saved {args.out}')


if __name__ == '__main__':
    sys.exit(main())
