"""Time RefCocoDataset's index build on a RefCOCO-sized annotation.

    python tools/analysis_tools/benchmark_refer_index.py

Writes, under a temporary folder, an ``instances.json`` and a protocol-2
``refs(unc).p`` with RefCOCO's sizes (19,994 images, 196,771 polygon
annotations, 50,000 referred objects, 142,210 sentences; split sizes of
refcoco/unc), then builds the dataset for every split (train: one item per
object; val/testA/testB: one item per sentence) and prints the seconds for
each, with the share of reading instances.json and the refs pickle (the
rest is the index itself and MMEngine's serialisation).  No image is read.
"""
import argparse
import json
import os
import os.path as osp
import pickle
import shutil
import tempfile
import time

import numpy as np

# refcoco (unc): refs and sentences per split
REFCOCO_SPLITS = dict(train=(42404, 120624), val=(3811, 10834),
                      testA=(1975, 5657), testB=(1810, 5095))


def synthesise(folder: str, num_images: int, num_anns: int,
               poly_points: int, scale: int = 1, seed: int = 0) -> dict:
    """Write folder/refcoco/{instances.json, refs(unc).p} with the split
    sizes of RefCOCO divided by ``scale``; return the sizes."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(folder, 'refcoco'), exist_ok=True)
    images = [dict(id=i + 1, file_name=f'COCO_train2014_{i + 1:012d}.jpg',
                   height=480, width=640) for i in range(num_images)]
    img_of_ann = rng.integers(1, num_images + 1, size=num_anns)
    coords = np.round(rng.uniform(0, 479, size=(num_anns, 2 * poly_points)),
                      2)
    anns = [dict(id=a + 1, image_id=int(img_of_ann[a]),
                 category_id=int(1 + a % 80),
                 segmentation=[coords[a].tolist()], area=1000.0,
                 bbox=[10.0, 10.0, 50.0, 50.0], iscrowd=0)
            for a in range(num_anns)]
    with open(osp.join(folder, 'refcoco', 'instances.json'), 'w') as f:
        json.dump(dict(images=images, annotations=anns,
                       categories=[dict(id=c, name=str(c))
                                   for c in range(1, 81)]), f)
    refs, ref_id, sent_id = [], 0, 0
    ann_perm = rng.permutation(num_anns)
    words = ['man', 'left', 'red', 'shirt', 'the', 'on', 'woman', 'blue']
    for split, (n_refs, n_sents) in REFCOCO_SPLITS.items():
        n_refs, n_sents = n_refs // scale, n_sents // scale
        per_ref = np.full(n_refs, n_sents // n_refs)
        per_ref[:n_sents - per_ref.sum()] += 1
        for k in range(n_refs):
            ann = anns[int(ann_perm[ref_id])]
            sents = []
            for _ in range(int(per_ref[k])):
                text = ' '.join(rng.choice(words, size=5))
                sents.append(dict(tokens=text.split(), raw=text, sent=text,
                                  sent_id=sent_id))
                sent_id += 1
            refs.append(dict(ref_id=ref_id, ann_id=ann['id'],
                             image_id=ann['image_id'], split=split,
                             category_id=ann['category_id'],
                             file_name='x.jpg',
                             sent_ids=[s['sent_id'] for s in sents],
                             sentences=sents))
            ref_id += 1
    with open(osp.join(folder, 'refcoco', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    return dict(images=num_images, annotations=num_anns, refs=len(refs),
                sentences=sent_id)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--num-images', type=int, default=19994)
    p.add_argument('--num-anns', type=int, default=196771)
    p.add_argument('--poly-points', type=int, default=24,
                   help='vertices per polygon')
    p.add_argument('--scale', type=int, default=1,
                   help='divide every size by this (for quick checks)')
    p.add_argument('--splits', nargs='+', default=list(REFCOCO_SPLITS))
    p.add_argument('--workdir', default=None,
                   help='keep the synthesised files here (default: temp)')
    args = p.parse_args(argv)

    from mmseg_sera.datasets.refcoco import (RefCocoDataset, _gc_paused,
                                             load_refs)

    folder = args.workdir or tempfile.mkdtemp(prefix='refer_bench_')
    try:
        t0 = time.perf_counter()
        sizes = synthesise(folder, args.num_images // args.scale,
                           args.num_anns // args.scale, args.poly_points,
                           args.scale)
        ann_mb = osp.getsize(osp.join(folder, 'refcoco',
                                      'instances.json')) / 2**20
        print(f'synthesised {sizes} ({ann_mb:.0f} MiB instances.json) in '
              f'{time.perf_counter() - t0:.1f} s')
        # as the dataset reads them (garbage collector paused)
        with _gc_paused():
            t0 = time.perf_counter()
            with open(osp.join(folder, 'refcoco', 'instances.json')) as f:
                json.load(f)
            t_json = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_refs(osp.join(folder, 'refcoco', 'refs(unc).p'))
            t_refs = time.perf_counter() - t0
        print(f'reading instances.json: {t_json:.2f} s, refs(unc).p '
              f'(restricted unpickler): {t_refs:.2f} s')
        results = {}
        for split in args.splits:
            t0 = time.perf_counter()
            ds = RefCocoDataset(data_root=folder, dataset='refcoco',
                                split_by='unc', split=split,
                                test_mode=split != 'train')
            seconds = time.perf_counter() - t0
            results[split] = dict(items=len(ds), seconds=round(seconds, 2))
            print(f'{split:6s} {ds.sentence_sampling:6s} items={len(ds):7d} '
                  f'total={seconds:.2f} s  (index+serialise '
                  f'~{seconds - t_json - t_refs:.2f} s)')
        return results
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
