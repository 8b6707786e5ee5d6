"""A small gRefCOCO-format set written by the tests themselves.

Layout (gRefCOCO release / ReLA)::

    root/grefcoco/instances.json
    root/grefcoco/grefs(unc).json     (or grefs(unc).p, protocol 2)
    root/images/train2014/COCO_train2014_<id:012d>.png

Annotations (image 21 is 30 x 40, image 22 is 24 x 24):

- 201 polygon square, 202 polygon square overlapping 201 (the union must
  stay {0, 1}), 203 a valid triangle plus an odd-count and a 4-coordinate
  polygon (both dropped), 204 crowd (uncompressed RLE), all on image 21;
- 205 compressed RLE, 206 polygon, on image 22;
- 207 only invalid polygons (adds nothing), on image 22.

Refs: single target as an int (0) and as a one-element list (1), two
overlapping targets (2), a multi-target ref with a crowd member (3, crowd
skipped), a ref whose only annotation is crowd (4, kept), no target (5,
``[-1]``), an RLE + polygon pair (6), a target with only invalid polygons
besides a valid one (7), split over train / val / testA / testB.
"""
import json
import os
import os.path as osp
import pickle

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

IMAGES = [(21, 30, 40), (22, 24, 24)]  # id, height, width

SQUARE_A = [2, 2, 14, 2, 14, 14, 2, 14]
SQUARE_B = [10, 8, 22, 8, 22, 20, 10, 20]
TRIANGLE = [25, 3, 38, 3, 30, 15]
ODD = [1, 1, 5, 1, 5, 5, 1]
SHORT = [1, 1, 5, 5]
POLY_22 = [3, 14, 10, 14, 10, 21, 3, 21]


def _disc(h, w, cy, cx, r2):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy)**2 + (xx - cx)**2 < r2).astype(np.uint8)


CROWD_MASK = np.zeros((30, 40), np.uint8)
CROWD_MASK[20:28, 2:35] = 1
RLE_MASK_22 = _disc(24, 24, 8, 14, 30)


def _rle_str(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return dict(size=[int(v) for v in rle['size']],
                counts=rle['counts'].decode('ascii'))


def _rle_uncompressed(mask):
    flat = mask.flatten(order='F')
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return dict(size=list(mask.shape), counts=counts)


def build_instances():
    images = [dict(id=i, file_name=f'COCO_train2014_{i:012d}.png',
                   height=h, width=w) for i, h, w in IMAGES]
    anns = [
        dict(id=201, image_id=21, category_id=1, iscrowd=0,
             segmentation=[SQUARE_A]),
        dict(id=202, image_id=21, category_id=1, iscrowd=0,
             segmentation=[SQUARE_B]),
        dict(id=203, image_id=21, category_id=2, iscrowd=0,
             segmentation=[TRIANGLE, ODD, SHORT]),
        dict(id=204, image_id=21, category_id=1, iscrowd=1,
             segmentation=_rle_uncompressed(CROWD_MASK)),
        dict(id=205, image_id=22, category_id=2, iscrowd=0,
             segmentation=_rle_str(RLE_MASK_22)),
        dict(id=206, image_id=22, category_id=1, iscrowd=0,
             segmentation=[POLY_22]),
        dict(id=207, image_id=22, category_id=1, iscrowd=0,
             segmentation=[ODD, SHORT]),
    ]
    for a in anns:
        a.update(area=1.0, bbox=[0.0, 0.0, 1.0, 1.0])
    cats = [dict(id=c, name=f'c{c}', supercategory='x') for c in (1, 2)]
    return dict(images=images, annotations=anns, categories=cats)


def _sents(first_id, *texts):
    return [dict(sent_id=first_id + i, sent=t, raw=t.upper(),
                 tokens=t.split()) for i, t in enumerate(texts)]


def build_refs():
    def ref(ref_id, ann_id, image_id, split, cat, sents):
        return dict(ref_id=ref_id, ann_id=ann_id, image_id=image_id,
                    split=split, category_id=cat,
                    sent_ids=[s['sent_id'] for s in sents], sentences=sents)

    return [
        ref(0, 201, 21, 'train', 1, _sents(0, 'the top left square')),
        ref(1, [203], 21, 'train', [2], _sents(1, 'the triangle',
                                               'pointy thing')),
        ref(2, [201, 202], 21, 'val', [1], _sents(3, 'both squares',
                                                  'the two squares')),
        ref(3, [202, 204, 203], 21, 'val', [1, 2], _sents(5, 'all of them')),
        ref(4, [204], 21, 'testA', [1], _sents(6, 'the crowd')),
        ref(5, [-1], 21, 'val', [], _sents(7, 'the purple dog')),
        ref(6, [205, 206], 22, 'testB', [2, 1], _sents(8, 'disc and box')),
        ref(7, [206, 207], 22, 'testB', [1], _sents(9, 'the box')),
    ]


def expected_masks():
    """ref_id -> target mask, made here from the shapes themselves with
    pycocotools on each valid polygon and the known RLE masks."""
    def poly(p, h, w):
        return mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects([p], h, w)))

    a, b = poly(SQUARE_A, 30, 40), poly(SQUARE_B, 30, 40)
    tri = poly(TRIANGLE, 30, 40)
    box22 = poly(POLY_22, 24, 24)
    return {
        0: a, 1: tri, 2: ((a + b) > 0).astype(np.uint8),
        3: ((b + tri) > 0).astype(np.uint8),   # crowd 204 skipped
        4: CROWD_MASK, 5: np.zeros((30, 40), np.uint8),
        6: ((RLE_MASK_22 + box22) > 0).astype(np.uint8),
        7: box22,
    }


def write_grefcoco_root(root, refs_ext='.json', refs=None):
    """Write the set under ``root``; returns paths and the source data."""
    ann_dir = osp.join(root, 'grefcoco')
    img_dir = osp.join(root, 'images', 'train2014')
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    instances = build_instances()
    refs = build_refs() if refs is None else refs
    rng = np.random.default_rng(0)
    for img in instances['images']:
        pixels = rng.integers(0, 256, (img['height'], img['width'], 3),
                              dtype=np.uint8)
        Image.fromarray(pixels).save(osp.join(img_dir, img['file_name']))
    ann_path = osp.join(ann_dir, 'instances.json')
    with open(ann_path, 'w') as f:
        json.dump(instances, f)
    refs_path = osp.join(ann_dir, 'grefs(unc)' + refs_ext)
    if refs_ext == '.p':
        with open(refs_path, 'wb') as f:
            pickle.dump(refs, f, protocol=2)
    else:
        with open(refs_path, 'w') as f:
            json.dump(refs, f)
    return dict(root=root, ann_path=ann_path, refs_path=refs_path,
                img_dir=img_dir, refs=refs)
