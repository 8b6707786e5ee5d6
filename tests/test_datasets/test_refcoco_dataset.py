import json
import os
import os.path as osp
import pickle

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmseg_sera.datasets import RefCocoDataset
from mmseg_sera.datasets.transforms import (LoadReferImageFromFile,
                                            LoadReferringMask, SelectSentence)


def build(root, split, **kwargs):
    # serialize_data=False: MMEngine's serialisation runs gc.collect(), slow
    # in a process full of torch objects; one test below keeps it on.
    kwargs.setdefault('serialize_data', False)
    return RefCocoDataset(data_root=root, dataset='refcoco', split_by='unc',
                          split=split, **kwargs)


def test_item_counts_per_split(refer_root):
    root = refer_root['root']
    with pytest.warns(UserWarning, match=r'ref_id=1, sent_id=4'):
        train = build(root, 'train')
    assert train.sentence_sampling == 'random'
    assert len(train) == 3  # one item per referred object
    assert [d['ref_id'] for d in (train.get_data_info(i) for i in range(3))
            ] == [0, 1, 2]
    assert train.get_data_info(0)['sentences'] == [
        'the left triangle', 'triangle at top', 'big one']
    assert train.get_data_info(1)['sent_ids'] == [3]  # empty one dropped

    val = build(root, 'val', test_mode=True)
    assert val.sentence_sampling == 'all'
    assert len(val) == 4  # one item per sentence
    infos = [val.get_data_info(i) for i in range(len(val))]
    assert [(d['ref_id'], d['sent_ids']) for d in infos] == [
        (3, [6]), (3, [7]), (3, [8]), (4, [9])]
    assert len(build(root, 'testA', test_mode=True)) == 2
    with pytest.warns(UserWarning, match=r'ref_id \[7\]'):
        test_b = build(root, 'testB', test_mode=True)
    assert len(test_b) == 1
    assert len(build(root, 'train', sentence_sampling='all')) == 5
    first = build(root, 'train', sentence_sampling='first')
    assert len(first) == 3
    assert first.get_data_info(0)['sentences'] == ['the left triangle']


def test_data_info_fields_and_image_path(refer_root):
    ds = build(refer_root['root'], 'val', test_mode=True)
    info = ds.get_data_info(3)
    # the image comes from instances.json through image_id, not from the
    # ref's file_name (COCO_train2014_..._103.jpg names no file)
    assert info['img_path'] == osp.join(refer_root['img_dir'],
                                        'COCO_train2014_000000000012.png')
    assert osp.isfile(info['img_path'])
    assert (info['ref_id'], info['ann_id'], info['image_id']) == (4, 103, 12)
    assert (info['height'], info['width']) == (50, 50)
    assert info['sentences'] == ['round thing']
    assert ds.metainfo['classes'] == ('background', 'object')
    assert ds.metainfo['split'] == 'val'


def test_masks_equal_pycocotools(refer_root):
    coco = COCO(refer_root['ann_path'])
    load_img = LoadReferImageFromFile()
    load_mask = LoadReferringMask()
    checked = set()
    for split in ('train', 'val', 'testA', 'testB'):
        ds = build(refer_root['root'], split, test_mode=True)
        for i in range(len(ds)):
            results = load_mask(load_img(ds.get_data_info(i)))
            expected = coco.annToMask(coco.anns[results['ann_id']])
            mask = results['gt_seg_map']
            assert mask.dtype == np.uint8
            assert mask.shape == results['img'].shape[:2] == expected.shape
            np.testing.assert_array_equal(mask, expected)
            assert mask.sum() > 0
            assert results['seg_fields'] == ['gt_seg_map']
            checked.add(results['ann_id'])
    assert checked == {101, 102, 103, 104, 105}  # polygons, RLE, crowd RLE


def test_bad_split_names_are_listed(refer_root):
    with pytest.raises(ValueError, match=r"'testC'.*train.*val.*testA.*testB"):
        build(refer_root['root'], 'testC')
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'val'\]"):
        RefCocoDataset(data_root=refer_root['root'], dataset='refcocog',
                       split_by='google', split='test')
    with pytest.raises(ValueError, match=r"split_by 'umd'.*\['unc'\]"):
        RefCocoDataset(data_root=refer_root['root'], dataset='refcoco',
                       split_by='umd', split='val')
    with pytest.raises(ValueError, match=r"dataset 'refclef'"):
        RefCocoDataset(data_root=refer_root['root'], dataset='refclef')
    with pytest.raises(ValueError, match='sentence_sampling'):
        build(refer_root['root'], 'val', sentence_sampling='some')


def test_missing_files_are_named(refer_root):
    os.remove(refer_root['refs_path'])
    with pytest.raises(FileNotFoundError, match=r'refs\(unc\)\.p'):
        build(refer_root['root'], 'val')
    os.remove(refer_root['ann_path'])
    with pytest.raises(FileNotFoundError,
                       match=re_escape(refer_root['ann_path'])):
        build(refer_root['root'], 'val')


def re_escape(text):
    import re
    return re.escape(text)


def test_missing_and_corrupt_images(refer_root):
    ds = build(refer_root['root'], 'val', test_mode=True)
    info = ds.get_data_info(0)
    os.remove(info['img_path'])
    with pytest.raises(FileNotFoundError, match=re_escape(info['img_path'])):
        LoadReferImageFromFile()(ds.get_data_info(0))
    with pytest.raises(FileNotFoundError, match=re_escape(info['img_path'])):
        build(refer_root['root'], 'val', check_images=True)
    with open(info['img_path'], 'wb') as f:
        f.write(b'\x89PNG\r\n not really an image' * 3)
    with pytest.raises(ValueError, match=re_escape(info['img_path'])):
        LoadReferImageFromFile()(ds.get_data_info(0))
    # through the dataset's pipeline too
    ds = build(refer_root['root'], 'val', test_mode=True,
               pipeline=[dict(type='LoadReferImageFromFile')])
    with pytest.raises(ValueError, match='corrupt'):
        ds[0]


def test_refs_with_unknown_ids(tmp_path, make_refer_root):
    paths = make_refer_root(str(tmp_path))
    refs = paths['refs'] + [dict(ref_id=99, ann_id=999, image_id=11,
                                 split='val', sentences=[], sent_ids=[])]
    with open(paths['refs_path'], 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(ValueError, match=r'ref 99 .*ann_id 999'):
        build(paths['root'], 'val')
    refs[-1].update(ann_id=101, image_id=77)
    with open(paths['refs_path'], 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(ValueError, match=r'image_id 77'):
        build(paths['root'], 'val')


def test_image_size_disagreeing_with_instances(refer_root):
    with open(refer_root['ann_path']) as f:
        inst = json.load(f)
    inst['images'][0]['height'] = 41  # real file is 40 high
    with open(refer_root['ann_path'], 'w') as f:
        json.dump(inst, f)
    ds = build(refer_root['root'], 'testA', test_mode=True)
    results = LoadReferImageFromFile()(ds.get_data_info(0))
    with pytest.raises(ValueError, match='COCO_train2014_000000000011.png'):
        LoadReferringMask()(results)


def test_json_refs_give_the_same_index(tmp_path, make_refer_root):
    pick = make_refer_root(str(tmp_path / 'a'))
    js = make_refer_root(str(tmp_path / 'b'), refs_ext='.json')
    assert js['refs_path'].endswith('refs(unc).json')
    for split in ('train', 'val'):
        a = build(pick['root'], split)
        b = build(js['root'], split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            ia, ib = a.get_data_info(i), b.get_data_info(i)
            ia.pop('img_path'), ib.pop('img_path'), ia.pop('sample_idx')
            ib.pop('sample_idx')
            assert ia == ib


def test_random_sentence_per_draw_is_seeded(refer_root):
    ds = build(refer_root['root'], 'train',
               pipeline=[dict(type='SelectSentence')])
    np.random.seed(0)
    draws = [ds[0]['text'] for _ in range(60)]
    assert set(draws) == {'the left triangle', 'triangle at top', 'big one'}
    np.random.seed(0)
    assert [ds[0]['text'] for _ in range(60)] == draws
    # per-sentence items always give their own sentence
    val = build(refer_root['root'], 'val', test_mode=True)
    sel = SelectSentence()
    texts = [sel(val.get_data_info(i))['text'] for i in range(len(val))]
    assert texts == ['crowd blob', 'the two blobs', 'blobs', 'round thing']
    assert sel(val.get_data_info(1))['sent_id'] == 7


def test_long_sentence_passes_untouched(tmp_path, make_refer_root):
    paths = make_refer_root(str(tmp_path))
    long_text = ' '.join(f'word{i}' for i in range(300))
    refs = paths['refs']
    refs[4]['sentences'][0]['sent'] = long_text.upper()
    with open(paths['refs_path'], 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    ds = build(paths['root'], 'val', test_mode=True,
               pipeline=[dict(type='SelectSentence'),
                         dict(type='LoadReferImageFromFile'),
                         dict(type='PackReferSegInputs')])
    sample = ds[3]['data_samples']
    assert sample.text == long_text
    assert len(sample.text.split()) == 300


def test_raw_sentence_key(refer_root):
    ds = build(refer_root['root'], 'val', test_mode=True, sentence_key='raw')
    # raw is the upper-cased text in the fixture; cleaning lower-cases it
    assert ds.get_data_info(1)['sentences'] == ['the two blobs']
