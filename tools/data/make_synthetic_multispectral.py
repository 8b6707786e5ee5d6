"""Write the synthetic multispectral land-cover set, one folder per sensor.

    python tools/data/make_synthetic_multispectral.py \
        --out data/synthetic_multispectral --num-train 320 --num-val 64 \
        --img-size 56 --bands 6 --domains 3 --seed 0

Output (``--out`` is the ``data_root`` of
``configs/_base_/datasets/synthetic_multispectral.py``)::

    OUT/meta.json                          classes, bands, domains, per-domain
                                           band mean / std of train (DN)
    OUT/{A,B,C}/img/{train,val}/NNNNN.npy  H x W x bands uint16 DN
    OUT/{A,B,C}/ann/{train,val}/NNNNN.png  class indices

Every domain renders the same scenes.  ``--random-domains N`` renders them
in N random sensors ``R00`` .. instead (the pretraining set of
``configs/spectralmoe/pretrain_*``; with another ``--seed``: other
scenes).  The same arguments always give the same files.  See
``mmseg_sera/datasets/multispectral.py`` for the scene and sensor models.
"""
import argparse
import json

from mmseg_sera.datasets.multispectral import generate_multispectral_set


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Generate the synthetic multispectral set')
    p.add_argument('--out', default='data/synthetic_multispectral',
                   help='output folder (data_root)')
    p.add_argument('--num-train', type=int, default=320)
    p.add_argument('--num-val', type=int, default=64)
    p.add_argument('--img-size', type=int, default=56,
                   help='side of the square images in pixels')
    p.add_argument('--bands', type=int, default=6,
                   help='spectral bands (6: blue, green, red, NIR, SWIR1, '
                   'SWIR2; other counts interpolate the class spectra)')
    p.add_argument('--domains', type=int, default=3,
                   help='sensor domains A (reference), B, C, ...')
    p.add_argument('--random-domains', type=int, default=0, metavar='N',
                   help='render in N random sensors R00, R01, ... instead '
                   'of A, B, C (a pretraining set for a stand-in foundation '
                   'model; use another --seed for other scenes)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    meta = generate_multispectral_set(
        args.out, num_train=args.num_train, num_val=args.num_val,
        img_size=args.img_size, num_bands=args.bands,
        num_domains=args.domains, seed=args.seed,
        random_domains=args.random_domains, progress=not args.quiet)
    summary = dict(out=args.out, domains=[d['name'] for d in meta['domains']],
                   splits=meta['splits'], band_stats=meta['band_stats'])
    print(json.dumps(summary, indent=1))
    return meta


if __name__ == '__main__':
    main()
