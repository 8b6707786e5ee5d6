"""A small refer-format dataset written by the tests themselves.

Layout (refer toolkit)::

    root/refcoco/instances.json
    root/refcoco/refs(unc).p        protocol 2
    root/images/mscoco/images/train2014/COCO_train2014_<id:012d>.png

Three images of different sizes; annotations as single and multi-part
polygons, a compressed RLE (str counts) and an uncompressed crowd RLE;
refs in all four unc splits, with messy case/whitespace, one empty
sentence and one ref whose only sentence is blank.
"""
import json
import os
import os.path as osp
import pickle

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

IMAGES = [  # id, height, width
    (11, 40, 60),
    (12, 50, 50),
    (13, 30, 45),
]


def _rle_str(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle['size']],
                counts=rle['counts'].decode('ascii'))


def _rle_uncompressed(mask: np.ndarray) -> dict:
    flat = mask.astype(np.uint8).flatten(order='F')
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return dict(size=list(mask.shape), counts=counts)


def build_instances() -> dict:
    images = [dict(id=i, file_name=f'COCO_train2014_{i:012d}.png', height=h,
                   width=w) for i, h, w in IMAGES]
    disc = np.zeros((50, 50), np.uint8)
    yy, xx = np.mgrid[:50, :50]
    disc[(yy - 20)**2 + (xx - 30)**2 < 120] = 1
    blob = np.zeros((30, 45), np.uint8)
    blob[3:20, 5:12] = 1
    blob[10:28, 30:44] = 1
    anns = [
        # single polygon (triangle) on image 11
        dict(id=101, image_id=11, category_id=1, iscrowd=0,
             segmentation=[[5.0, 5.0, 40.5, 8.0, 20.0, 33.7]]),
        # two-part polygon on image 11
        dict(id=102, image_id=11, category_id=2, iscrowd=0,
             segmentation=[[45, 2, 58, 2, 58, 15, 45, 15],
                           [44.2, 25.1, 57.9, 38.3, 44.0, 38.6]]),
        # compressed RLE (string counts) on image 12
        dict(id=103, image_id=12, category_id=1, iscrowd=0,
             segmentation=_rle_str(disc)),
        # uncompressed RLE, crowd, on image 13
        dict(id=104, image_id=13, category_id=3, iscrowd=1,
             segmentation=_rle_uncompressed(blob)),
        # polygon on image 13, referred in testB
        dict(id=105, image_id=13, category_id=1, iscrowd=0,
             segmentation=[[1, 1, 20, 1, 20, 12, 1, 12]]),
        # not referred by any ref
        dict(id=106, image_id=12, category_id=1, iscrowd=0,
             segmentation=[[1, 1, 5, 1, 5, 5]]),
    ]
    for a in anns:
        a.setdefault('area', 1.0)
        a.setdefault('bbox', [0.0, 0.0, 1.0, 1.0])
    cats = [dict(id=c, name=f'c{c}', supercategory='x') for c in (1, 2, 3)]
    return dict(images=images, annotations=anns, categories=cats)


def _sent(sent_id: int, text: str) -> dict:
    return dict(sent_id=sent_id, sent=text, raw=text.upper(),
                tokens=text.split())


def build_refs() -> list:
    def ref(ref_id, ann_id, image_id, split, sents):
        return dict(ref_id=ref_id, ann_id=ann_id, image_id=image_id,
                    split=split, category_id=1,
                    file_name=f'COCO_train2014_{image_id:012d}_{ann_id}.jpg',
                    sent_ids=[s['sent_id'] for s in sents], sentences=sents)

    return [
        ref(0, 101, 11, 'train', [_sent(0, '  The LEFT   triangle '),
                                  _sent(1, 'triangle\tat top'),
                                  _sent(2, 'big one')]),
        ref(1, 102, 11, 'train', [_sent(3, 'two parts'), _sent(4, '   ')]),
        ref(2, 103, 12, 'train', [_sent(5, 'the disc')]),
        ref(3, 104, 13, 'val', [_sent(6, 'crowd blob'),
                                _sent(7, 'the two blobs'),
                                _sent(8, 'blobs')]),
        ref(4, 103, 12, 'val', [_sent(9, 'round thing')]),
        ref(5, 101, 11, 'testA', [_sent(10, 'a'), _sent(11, 'b')]),
        ref(6, 105, 13, 'testB', [_sent(12, 'the rectangle')]),
        ref(7, 102, 11, 'testB', [_sent(13, ' ')]),  # nothing left
    ]


def write_refer_root(root: str, refs_ext: str = '.p') -> dict:
    """Write the set under ``root``; returns paths and the source data."""
    ann_dir = osp.join(root, 'refcoco')
    img_dir = osp.join(root, 'images', 'mscoco', 'images', 'train2014')
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    instances = build_instances()
    refs = build_refs()
    rng = np.random.default_rng(0)
    for img in instances['images']:
        pixels = rng.integers(0, 256, size=(img['height'], img['width'], 3),
                              dtype=np.uint8)
        Image.fromarray(pixels).save(osp.join(img_dir, img['file_name']))
    ann_path = osp.join(ann_dir, 'instances.json')
    with open(ann_path, 'w') as f:
        json.dump(instances, f)
    refs_path = osp.join(ann_dir, 'refs(unc)' + refs_ext)
    if refs_ext == '.p':
        with open(refs_path, 'wb') as f:
            pickle.dump(refs, f, protocol=2)
    else:
        with open(refs_path, 'w') as f:
            json.dump(refs, f)
    return dict(root=root, ann_path=ann_path, refs_path=refs_path,
                img_dir=img_dir, instances=instances, refs=refs)


@pytest.fixture
def refer_root(tmp_path):
    return write_refer_root(str(tmp_path))


@pytest.fixture
def make_refer_root():
    """The writer itself, for tests that need variants of the set."""
    return write_refer_root
