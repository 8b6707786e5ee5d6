"""Scores of reference predictors on a gRefCOCO-layout split: the floors
and the ceiling a method should be read against.

    python tools/analysis_tools/gres_reference_scores.py DATA_ROOT \
        [--split val] [--protocol gres] [--json FILE]

Predictors (no model involved; masks from the dataset's own loader):

- ``always-empty``: answers "no target" to every sentence;
- ``all-objects``: the union of every annotated object of the image, for
  every sentence (what a model that ignores the sentence and segments all
  objects would give);
- ``oracle-no-nt``: the ground-truth mask where the sentence names
  something and the union of all objects where it names nothing: perfect
  masks from a model that can never say "no target", the best score a
  head without a no-target output can reach.

Every predictor is scored by ``ReferSegMetric(protocol, group_by='kind')``
(the kinds of the generalized synthetic set, ``'none'`` for gRefCOCO);
the prediction's no-target flag is "its mask is empty".
"""
import argparse
import json
from typing import Callable, Dict, List

import numpy as np
import torch
from mmengine.structures import PixelData

from mmseg.structures import SegDataSample
from mmseg_sera.datasets import GRefCocoDataset
from mmseg_sera.datasets.grefcoco import merge_target_masks
from mmseg_sera.evaluation import ReferSegMetric

PREDICTORS = ('always-empty', 'all-objects', 'oracle-no-nt')


def _all_objects(items: List[dict], instances: dict) -> List[np.ndarray]:
    """Per item, the union of every annotation of its image."""
    by_image: Dict[int, list] = {}
    for ann in instances['annotations']:
        if not ann.get('iscrowd', 0):
            by_image.setdefault(ann['image_id'], []).append(
                ann['segmentation'])
    cache: Dict[int, np.ndarray] = {}
    out = []
    for it in items:
        if it['image_id'] not in cache:
            cache[it['image_id']] = merge_target_masks(
                by_image.get(it['image_id'], []), it['height'], it['width'])
        out.append(cache[it['image_id']])
    return out


def reference_scores(data_root: str, split: str = 'val',
                     protocol: str = 'gres') -> Dict[str, Dict[str, float]]:
    """``{predictor: metrics}`` on ``split`` of the set under
    ``data_root``."""
    ds = GRefCocoDataset(
        data_root=data_root, split=split, test_mode=True,
        serialize_data=False,
        pipeline=[dict(type='LoadReferringMask'),
                  dict(type='SelectSentence', mode='first')])
    items = [ds[i] for i in range(len(ds))]
    with open(ds.ann_file, 'r', encoding='utf-8') as f:
        everything = _all_objects(items, json.load(f))
    rules: Dict[str, Callable[[int], np.ndarray]] = {
        'always-empty': lambda k: np.zeros_like(items[k]['gt_seg_map']),
        'all-objects': lambda k: everything[k],
        'oracle-no-nt': lambda k: everything[k] if items[k]['no_target']
        else items[k]['gt_seg_map'],
    }
    out = {}
    for name in PREDICTORS:
        metric = ReferSegMetric(protocol=protocol, group_by='kind')
        samples = []
        for k, it in enumerate(items):
            s = SegDataSample()
            s.gt_sem_seg = PixelData(
                data=torch.from_numpy(it['gt_seg_map'][None].astype(
                    np.int64)))
            s.pred_sem_seg = PixelData(
                data=torch.from_numpy(rules[name](k)[None].astype(np.int64)))
            s.set_metainfo(dict(no_target=it['no_target'],
                                kind=it.get('kind'), ref_id=it['ref_id'],
                                sent_id=it['sent_id']))
            samples.append(s.to_dict())
        metric.process({}, samples)
        out[name] = metric.evaluate(len(samples))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('data_root', help='folder holding grefcoco/ and images/')
    p.add_argument('--split', default='val')
    p.add_argument('--protocol', default='gres',
                   choices=('gres', 'gres-rela', 'gres-rela-fixed'))
    p.add_argument('--json', default=None, help='also write the scores here')
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    scores = reference_scores(args.data_root, args.split, args.protocol)
    nacc, tacc = (('N-acc', 'T-acc') if args.protocol == 'gres' else
                  ('N_acc', 'T_acc'))
    for name, m in scores.items():
        kinds = sorted(k[len('gIoU_'):] for k in m if k.startswith('gIoU_'))
        print(f'{name:13s} gIoU {m["gIoU"]:6.2f}  cIoU {m["cIoU"]:6.2f}  '
              f'{nacc} {m[nacc]:6.2f}  {tacc} {m[tacc]:6.2f}  | gIoU ' +
              ', '.join(f'{k} {m["gIoU_" + k]:.1f}' for k in kinds))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(scores, f, indent=1)
    return scores


if __name__ == '__main__':
    main()
