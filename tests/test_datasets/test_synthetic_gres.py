"""The generalized synthetic set: every sentence names exactly its ref's
targets (recomputed here, by rules written in this file, from the masks and
attributes in instances.json), every kind occurs, the files are
reproducible, and GRefCocoDataset loads the set end to end."""
import filecmp
import json
import os
import os.path as osp
import re
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmseg_sera.datasets import GRefCocoDataset
from mmseg_sera.datasets.synthetic_gres import (GRES_KINDS,
                                                generate_grefer_set)

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 30

_COL = 'red|green|blue|yellow|purple'
_NP = rf'(?:(small|big) )?(?:({_COL}) )?(square|circle|triangle|shape)'
_NPS = rf'(?:(small|big) )?(?:({_COL}) )?(squares|circles|triangles|shapes)'
_SIDE = {'on the left': 'left', 'on the right': 'right',
         'at the top': 'top', 'at the bottom': 'bottom'}
_SIDES = '|'.join(_SIDE)


@pytest.fixture(scope='module')
def gres_root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('gsynth'))
    summary = generate_grefer_set(out, num_images=NUM_IMAGES, img_size=112,
                                  seed=3, progress=False)
    return out, summary


def _scene(coco, image_id):
    """ann_id -> dict(shape, colour, size, cx, cy), centroids from the
    decoded masks."""
    objs = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        ys, xs = np.nonzero(coco.annToMask(ann))
        objs[ann['id']] = dict(ann['attributes'], cx=xs.mean(),
                               cy=ys.mean())
    return objs


def _fits(o, size, colour, shape):
    shape = None if shape == 'shape' else shape
    return ((size is None or o['size'] == size)
            and (colour is None or o['colour'] == colour)
            and (shape is None or o['shape'] == shape))


def _key(o, side):
    """Larger = further towards ``side``."""
    return {'left': -o['cx'], 'right': o['cx'], 'top': -o['cy'],
            'bottom': o['cy']}[side]


def _targets(text, objs, margin):
    """The set of ann ids a sentence names, by the documented rules."""
    def group(size, colour, shape):
        return [a for a, o in objs.items() if _fits(o, size, colour, shape)]

    def sing(plural):
        return plural[:-1]

    m = re.fullmatch(rf'all {_NPS}', text)
    if m:
        return set(group(m[1], m[2], sing(m[3])))
    m = re.fullmatch(rf'the two {_NPS} ({_SIDES})', text)
    if m:
        side = _SIDE[m[4]]
        g = sorted(group(m[1], m[2], sing(m[3])),
                   key=lambda a: -_key(objs[a], side))
        assert len(g) >= 3
        assert _key(objs[g[1]], side) - _key(objs[g[2]], side) > margin
        return set(g[:2])
    m = re.fullmatch(rf'the {_NP} and the {_NP}', text)
    if m:
        a, b = group(*m.group(1, 2, 3)), group(*m.group(4, 5, 6))
        assert len(a) == len(b) == 1
        return set(a) | set(b)
    m = re.fullmatch(rf'the (second|third) {_NP} from the '
                     r'(left|right|top|bottom)', text)
    if m:
        k = {'second': 2, 'third': 3}[m[1]]
        g = sorted(group(*m.group(2, 3, 4)),
                   key=lambda a: -_key(objs[a], m[5]))
        keys = [_key(objs[a], m[5]) for a in g]
        assert keys[k - 2] - keys[k - 1] > margin
        assert k == len(g) or keys[k - 1] - keys[k] > margin
        return {g[k - 1]}
    m = re.fullmatch(rf'the (square|circle|triangle) that is not ({_COL})',
                     text)
    if m:
        assert group(None, m[2], m[1])  # the negation is needed
        return {a for a, o in objs.items()
                if o['shape'] == m[1] and o['colour'] != m[2]}
    m = re.fullmatch(rf'the ({_COL}) shape that is not a '
                     r'(square|circle|triangle)', text)
    if m:
        assert group(None, m[1], m[2])
        return {a for a, o in objs.items()
                if o['colour'] == m[1] and o['shape'] != m[2]}
    m = re.fullmatch(rf'the {_NP} (left of|right of|above|below) the {_NP}',
                     text)
    if m:
        anchors = group(*m.group(5, 6, 7))
        if len(anchors) != 1:
            return set()
        side = {'left of': 'left', 'right of': 'right', 'above': 'top',
                'below': 'bottom'}[m[4]]
        anc = objs[anchors[0]]
        return {a for a in group(*m.group(1, 2, 3)) if a != anchors[0]
                and _key(objs[a], side) - _key(anc, side) >= -margin}
    m = re.fullmatch(rf'the {_NP} ({_SIDES})', text) or re.fullmatch(
        rf'the (leftmost|rightmost|topmost|bottommost) {_NP}', text)
    if m:
        if m[1] in ('leftmost', 'rightmost', 'topmost', 'bottommost'):
            side, g = m[1][:-4], group(*m.group(2, 3, 4))
        else:
            side, g = _SIDE[m[4]], group(*m.group(1, 2, 3))
        if len(g) <= 1:
            return set(g)
        best = max(_key(objs[a], side) for a in g)
        return {a for a in g if _key(objs[a], side) >= best - margin}
    m = re.fullmatch(rf'the {_NP}', text)
    assert m, f'sentence outside the grammar: {text!r}'
    return set(group(*m.group(1, 2, 3)))


def test_every_sentence_names_exactly_its_targets(gres_root):
    out, summary = gres_root
    coco = COCO(osp.join(out, 'grefcoco', 'instances.json'))
    margin = coco.dataset['info']['margin']
    with open(osp.join(out, 'grefcoco', 'grefs(unc).json')) as f:
        refs = json.load(f)
    kinds = Counter()
    n_targets = Counter()
    for ref in refs:
        objs = _scene(coco, ref['image_id'])
        for ann_id, o in objs.items():  # stored centroids = mask centroids
            ann = coco.anns[ann_id]['attributes']
            assert (ann['cx'], ann['cy']) == pytest.approx((o['cx'],
                                                            o['cy']))
        want = set() if ref['ann_id'] == [-1] else set(ref['ann_id'])
        assert all(a in objs for a in want)
        for sent in ref['sentences']:
            got = _targets(sent['sent'], objs, margin)
            assert got == want, (ref['ref_id'], sent['sent'])
            kinds[sent['kind']] += 1
            n = len(want)
            assert (sent['kind'] == 'no_target') == (n == 0)
            assert (sent['kind'] == 'multi') == (n >= 2)
            n_targets[min(n, 2)] += 1
    assert set(kinds) == set(GRES_KINDS)
    assert all(summary[f'sentences_{k}'] == kinds[k] for k in GRES_KINDS)
    assert sum(kinds.values()) == summary['sentences']
    # a real mix: no-target and multi-target sentences are not rare
    assert n_targets[0] >= 0.08 * summary['sentences']
    assert n_targets[2] >= 0.08 * summary['sentences']
    # harder scenes: >= 4 objects on average, with distractors
    per_image = Counter(a['image_id'] for a in coco.dataset['annotations'])
    assert np.mean(list(per_image.values())) >= 4.5


def test_layout_and_reproducible_through_the_tool(gres_root, tmp_path):
    out, summary = gres_root
    files = sorted(osp.relpath(osp.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs)
    assert files[:2] == ['grefcoco/grefs(unc).json',
                         'grefcoco/instances.json']
    assert len(files) == NUM_IMAGES + 2
    assert all(f.startswith('images/train2014/COCO_train2014_')
               for f in files[2:])
    tool = runpy.run_path(str(ROOT / 'tools/data/make_synthetic_refer.py'))
    again = str(tmp_path / 'again')
    summary2 = tool['main']([
        '--generalized', '--out', again, '--num-images', str(NUM_IMAGES),
        '--img-size', '112', '--seed', '3', '--quiet'])
    assert summary2 == summary
    _, mismatch, errors = filecmp.cmpfiles(out, again, files, shallow=False)
    assert mismatch == [] and errors == []


def test_loaded_end_to_end_by_grefcoco_dataset(gres_root):
    out, summary = gres_root
    coco = COCO(osp.join(out, 'grefcoco', 'instances.json'))
    pipeline = [
        dict(type='LoadReferImageFromFile'),
        dict(type='ReferResizePad', size=(112, 112)),
        dict(type='LoadReferringMask'),
        dict(type='SelectSentence', mode='first'),
        dict(type='PackReferSegInputs'),
    ]
    total = 0
    for split in ('train', 'val', 'testA', 'testB'):
        ds = GRefCocoDataset(data_root=out, split=split, test_mode=True,
                             pipeline=pipeline, serialize_data=False)
        assert len(ds) == summary[f'sentences_{split}'] > 0
        total += len(ds)
        for i in range(0, len(ds), 3):
            item = ds[i]
            sample = item['data_samples']
            ann_ids = sample.ann_id
            want = np.zeros((112, 112), np.uint8)
            if ann_ids != [-1]:
                for a in ann_ids:
                    want |= coco.annToMask(coco.anns[a])
            np.testing.assert_array_equal(
                sample.gt_sem_seg.data[0].numpy(), want)
            assert sample.no_target == (ann_ids == [-1])
            assert sample.kind in GRES_KINDS
            assert item['inputs'].shape == (3, 112, 112)
    assert total == summary['sentences']
