import filecmp
import json
import os
import os.path as osp
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmseg_sera.datasets import RefCocoDataset, load_refs
from mmseg_sera.datasets.synthetic import (SynthObject, generate_refer_set,
                                           parse_sentence, resolve)

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 20


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('synth'))
    summary = generate_refer_set(out, num_images=NUM_IMAGES, img_size=112,
                                 seed=7, progress=False)
    return out, summary


def _files(folder):
    return sorted(
        osp.relpath(osp.join(d, f), folder)
        for d, _, files in os.walk(folder) for f in files)


def test_same_seed_same_files(synth_root, tmp_path):
    out, summary = synth_root
    tool = runpy.run_path(str(ROOT / 'tools/data/make_synthetic_refer.py'))
    again = str(tmp_path / 'again')
    summary2 = tool['main']([
        '--out', again, '--num-images', str(NUM_IMAGES), '--img-size', '112',
        '--seed', '7', '--quiet'
    ])
    assert summary2 == summary
    files = _files(out)
    assert files == _files(again)
    assert len(files) == NUM_IMAGES + 2
    _, mismatch, errors = filecmp.cmpfiles(out, again, files, shallow=False)
    assert mismatch == [] and errors == []
    other = str(tmp_path / 'other')
    generate_refer_set(other, num_images=NUM_IMAGES, img_size=112, seed=8,
                       progress=False)
    _, mismatch, _ = filecmp.cmpfiles(out, other, files, shallow=False)
    assert 'refcoco/instances.json' in mismatch


def test_layout_and_formats(synth_root):
    out, summary = synth_root
    with open(osp.join(out, 'refcoco', 'instances.json')) as f:
        inst = json.load(f)
    refs = load_refs(osp.join(out, 'refcoco', 'refs(unc).p'))
    assert len(inst['images']) == NUM_IMAGES == summary['images']
    assert len(refs) == summary['refs'] > NUM_IMAGES
    assert {r['split'] for r in refs} == {'train', 'val', 'testA', 'testB'}
    forms = Counter(
        'polygon' if isinstance(a['segmentation'], list) else
        'rle_list' if isinstance(a['segmentation']['counts'], list) else
        'rle_str' for a in inst['annotations'])
    assert set(forms) == {'polygon', 'rle_list', 'rle_str'}
    kinds = Counter(s['kind'] for r in refs for s in r['sentences'])
    assert set(kinds) == {'attribute', 'position', 'relation'}
    assert all(2 <= len(r['sentences']) <= 3 for r in refs)
    for r in refs:  # refs' own file names mirror the real (absent) files
        assert r['file_name'].endswith(f'_{r["ann_id"]}.jpg')
        assert not osp.exists(osp.join(out, 'images', 'mscoco', 'images',
                                       'train2014', r['file_name']))
    # the real loader reads it, every split, one item per sentence in test
    for split in ('train', 'val', 'testA', 'testB'):
        ds = RefCocoDataset(data_root=out, split=split,
                            test_mode=split != 'train', serialize_data=False)
        n = summary[('refs_' if split == 'train' else 'sentences_') + split]
        assert len(ds) == n > 0
        info = ds.get_data_info(0)
        assert osp.isfile(info['img_path'])
        assert len(info['sentence_kinds']) == len(info['sentences'])


def test_every_sentence_names_exactly_its_target(synth_root):
    """Independent check from the written files: masks decoded by
    pycocotools give the centroids, the sentence text is parsed back, and
    it must resolve to exactly the referred annotation."""
    out, _ = synth_root
    coco = COCO(osp.join(out, 'refcoco', 'instances.json'))
    margin = coco.dataset['info']['margin']
    refs = load_refs(osp.join(out, 'refcoco', 'refs(unc).p'))
    with_distractor = 0
    needs_words = Counter()
    for ref in refs:
        anns = coco.imgToAnns[ref['image_id']]
        objects = []
        for a in anns:
            ys, xs = np.nonzero(coco.annToMask(a))
            attrs = a['attributes']
            assert coco.cats[a['category_id']]['name'] == attrs['shape']
            objects.append(SynthObject(shape=attrs['shape'],
                                       colour=attrs['colour'],
                                       size=attrs['size'], cx=xs.mean(),
                                       cy=ys.mean()))
        target = [a['id'] for a in anns].index(ref['ann_id'])
        for sent in ref['sentences']:
            spec = parse_sentence(sent['sent'])
            assert spec['kind'] == sent['kind']
            assert resolve(spec, objects, margin) == [target], sent['sent']
            if spec['kind'] != 'attribute':
                # the noun phrase alone is ambiguous: position words matter
                group = resolve(dict(kind='attribute', target=spec['target']),
                                objects, margin)
                assert len(group) >= 2
                needs_words[spec['kind']] += 1
        t = objects[target]
        if any(o is not t and (o.colour == t.colour or o.shape == t.shape)
               for o in objects):
            with_distractor += 1
    assert with_distractor >= 0.7 * len(refs)
    assert needs_words['position'] > 0 and needs_words['relation'] > 0


def test_parser_and_resolver_semantics():
    objs = [
        SynthObject('square', 'red', 'big', cx=20, cy=50),
        SynthObject('square', 'red', 'small', cx=80, cy=50),
        SynthObject('circle', 'blue', 'big', cx=50, cy=20),
    ]
    assert parse_sentence('the red square left of the blue circle') == dict(
        kind='relation', target=(None, 'red', 'square'),
        relation='left of', anchor=(None, 'blue', 'circle'))
    assert resolve(parse_sentence('the red square'), objs, 5) == [0, 1]
    assert resolve(parse_sentence('the small shape'), objs, 5) == [1]
    assert resolve(parse_sentence('the square on the left'), objs, 5) == [0]
    assert resolve(parse_sentence('the topmost shape'), objs, 5) == [2]
    assert resolve(parse_sentence('the square right of the circle'), objs,
                   5) == [1]
    assert resolve(parse_sentence('the shape below the circle'), objs,
                   5) == [0, 1]
    # too close to call -> both count
    objs[1].cx = 22
    assert resolve(parse_sentence('the leftmost square'), objs, 5) == [0, 1]
    # an ambiguous anchor names nothing
    assert resolve(parse_sentence('the circle left of the red square'), objs,
                   5) == []
    with pytest.raises(ValueError, match='grammar'):
        parse_sentence('the man in red')
