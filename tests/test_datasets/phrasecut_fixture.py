"""A small PhraseCut-format set written by the tests themselves.

Layout (``data/VGPhraseCut_v0`` of github.com/ChenyunWu/PhraseCutDataset)::

    root/image_data_split.json
    root/refer_{train,val,test,miniv}.json   refer_input_val.json
    root/images/<image_id>.jpg

Tasks (``task_id`` = ``'<image_id>__<ann_id>_...'``):

- val ``101__11_12``: two instances; the second has two overlapping
  rectangular parts, one with fractional corners (truncated to integers
  by PhraseCut).
- val ``101__13``: one part drawn as a keyhole ring (outer square, bridge,
  inner square): the even-odd fill leaves a hole.
- val ``102__21_22``: two overlapping triangles (fractional vertices).
- train ``104__31`` (square), ``104__32`` (blank phrase: skipped),
  ``102__23`` (a 2-point part, drawn as a line, a 1-point part, skipped,
  and a small square).
- test ``103__41``: its image file is missing; ``104__33``.
- miniv ``104__34``.
"""
import json
import os
import os.path as osp
from typing import Dict, List

import numpy as np
from PIL import Image

IMAGES = [  # image_id, height, width, split in image_data_split.json
    (101, 40, 60, 'val'),
    (102, 30, 30, 'val'),
    (103, 20, 24, 'test'),  # listed, but its file is not written
    (104, 16, 16, 'train'),
]
MISSING_IMAGE_ID = 103


def _rect(x0, y0, x1, y1) -> List[List[float]]:
    """Corners of a rectangle as a PhraseCut polygon part."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# outer square (40, 2)-(58, 20), then a bridge to the inner square
# (45, 7)-(53, 15), traversed, and back (PIL closes the ring)
KEYHOLE = (_rect(40, 2, 58, 20) + [[40, 2], [45, 7]] +
           [[45, 15], [53, 15], [53, 7], [45, 7]])
TRIANGLE_A = [[3.5, 4.2], [20.8, 6.1], [8.3, 25.7]]
TRIANGLE_B = [[12.2, 3.3], [27.9, 14.6], [15.1, 26.4]]


def _task(task_id: str, phrase: str, polygons: list, kind: str = 'name',
          name: str = 'thing') -> dict:
    image_id, anns = task_id.split('__')
    boxes = []
    for instance in polygons:
        pts = np.array([p for part in instance for p in part], dtype=float)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        boxes.append([float(lo[0]), float(lo[1]), float(hi[0] - lo[0] + 1),
                      float(hi[1] - lo[1] + 1)])
    return dict(
        task_id=task_id,
        image_id=int(image_id),
        ann_ids=[int(a) for a in anns.split('_')],
        instance_boxes=boxes,
        Polygons=polygons,
        phrase=phrase,
        phrase_structure=dict(name=name, attributes=[], relation_ids=[],
                              relation_descriptions=[], type=kind))


def build_tasks() -> Dict[str, List[dict]]:
    """The tasks of each split."""
    return {
        'val': [
            _task('101__11_12', '  Two   RED boxes ', [
                [_rect(2, 3, 10, 12)],
                [_rect(20, 5, 28, 15), _rect(25.9, 10.2, 33.7, 20.9)],
            ], kind='attribute', name='box'),
            _task('101__13', 'the frame', [[KEYHOLE]], name='frame'),
            _task('102__21_22', 'The Triangles',
                  [[TRIANGLE_A], [TRIANGLE_B]], kind='verbose',
                  name='triangle'),
        ],
        'train': [
            _task('104__31', 'small square', [[_rect(2, 2, 9, 9)]]),
            _task('104__32', '   ', [[_rect(0, 0, 3, 3)]]),
            _task('102__23', 'a line and a dot',
                  [[[[1, 1], [1, 8]], [[20, 20]], _rect(10, 10, 12, 12)]],
                  kind='relation'),
        ],
        'test': [
            _task('103__41', 'the missing picture', [[_rect(1, 1, 5, 5)]]),
            _task('104__33', 'left half', [[_rect(0, 0, 7, 15)]]),
        ],
        'miniv': [
            _task('104__34', 'top strip', [[_rect(0, 0, 15, 3)]]),
        ],
    }


def write_phrasecut_root(root: str) -> dict:
    """Write the set under ``root``; returns paths and the source tasks."""
    img_dir = osp.join(root, 'images')
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    info = []
    for image_id, h, w, split in IMAGES:
        info.append(dict(image_id=image_id, coco_id=None, flickr_id=None,
                         width=w, height=h, split=split,
                         url=f'https://example.invalid/{image_id}.jpg'))
        if image_id == MISSING_IMAGE_ID:
            continue
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(osp.join(img_dir, f'{image_id}.jpg'),
                                     quality=95)
    info_path = osp.join(root, 'image_data_split.json')
    with open(info_path, 'w') as f:
        json.dump(info, f)
    tasks = build_tasks()
    refer_paths = {}
    for split, split_tasks in tasks.items():
        refer_paths[split] = osp.join(root, f'refer_{split}.json')
        with open(refer_paths[split], 'w') as f:
            json.dump(split_tasks, f)
    # the inputs-only file of the release: no ground truth, not a split
    inputs = [{k: t[k] for k in ('task_id', 'image_id', 'phrase',
                                 'phrase_structure')} for t in tasks['val']]
    with open(osp.join(root, 'refer_input_val.json'), 'w') as f:
        json.dump(inputs, f)
    return dict(root=root, img_dir=img_dir, info_path=info_path,
                refer_paths=refer_paths, tasks=tasks,
                sizes={i: (h, w) for i, h, w, _ in IMAGES})
