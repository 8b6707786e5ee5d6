"""GRefCocoDataset on a gRefCOCO-format set written by the test
(:mod:`tests.test_datasets.grefcoco_fixture`): splits, one item per
sentence, single / multi / no-target masks by the release's rules, the
no-target flag packed into the SegDataSample, JSON and pickle refs (a
malicious pickle refused) and the errors."""
import os
import os.path as osp
import pickle
import re

import numpy as np
import pytest

from mmseg.registry import DATASETS
from mmseg_sera.datasets import GRefCocoDataset, RefCocoDataset
from mmseg_sera.datasets.grefcoco import (merge_target_masks,
                                          normalise_ann_ids, valid_polygons)
from mmseg_sera.datasets.safe_pickle import UnsafePickleError
from mmseg_sera.datasets.transforms import (LoadReferImageFromFile,
                                            LoadReferringMask)
from tests.test_datasets.grefcoco_fixture import (build_refs,
                                                  expected_masks,
                                                  write_grefcoco_root)


def build(root, split, **kwargs):
    kwargs.setdefault('serialize_data', False)
    return GRefCocoDataset(data_root=root, split=split, **kwargs)


@pytest.fixture
def groot(tmp_path):
    return write_grefcoco_root(str(tmp_path))


def test_registered_and_a_refcoco_dataset(groot):
    ds = DATASETS.build(dict(type='GRefCocoDataset', data_root=groot['root'],
                             split='val', serialize_data=False))
    assert isinstance(ds, GRefCocoDataset)
    assert isinstance(ds, RefCocoDataset)
    assert ds.metainfo['dataset'] == 'grefcoco'


def test_one_item_per_sentence_in_every_split(groot):
    per_split = {}
    for split in ('train', 'val', 'testA', 'testB'):
        ds = build(groot['root'], split)
        assert ds.sentence_sampling == 'all'
        infos = [ds.get_data_info(i) for i in range(len(ds))]
        per_split[split] = [(d['ref_id'], d['sent_ids'][0]) for d in infos]
        for d in infos:
            assert len(d['sentences']) == 1
            assert isinstance(d['ann_id'], list)
    assert per_split == {
        'train': [(0, 0), (1, 1), (1, 2)],
        'val': [(2, 3), (2, 4), (3, 5), (5, 7)],
        'testA': [(4, 6)],
        'testB': [(6, 8), (7, 9)],
    }
    # per-object items remain possible
    assert len(build(groot['root'], 'train',
                     sentence_sampling='random')) == 2


def test_ann_ids_and_no_target_flag(groot):
    ds = build(groot['root'], 'val')
    infos = {d['ref_id']: d for d in (ds.get_data_info(i)
                                      for i in range(len(ds)))}
    assert infos[2]['ann_id'] == [201, 202]
    assert infos[3]['ann_id'] == [202, 204, 203]
    assert infos[5]['ann_id'] == [-1]
    assert [infos[r]['no_target'] for r in (2, 3, 5)] == [False, False, True]
    assert infos[5]['segmentations'] == []
    assert infos[3]['category_id'] == [1, 2]
    train = build(groot['root'], 'train')
    assert train.get_data_info(0)['ann_id'] == [201]  # int -> list


def test_masks_follow_the_release_rules(groot):
    expected = expected_masks()
    load_img, load_mask = LoadReferImageFromFile(), LoadReferringMask()
    seen = set()
    for split in ('train', 'val', 'testA', 'testB'):
        ds = build(groot['root'], split)
        for i in range(len(ds)):
            results = load_mask(load_img(ds.get_data_info(i)))
            mask = results['gt_seg_map']
            ref_id = results['ref_id']
            assert mask.dtype == np.uint8
            assert mask.shape == results['img'].shape[:2]
            assert set(np.unique(mask)) <= {0, 1}
            np.testing.assert_array_equal(mask, expected[ref_id],
                                          err_msg=f'ref {ref_id}')
            assert results['no_target'] == (not mask.any())
            seen.add(ref_id)
    assert seen == set(range(8))
    # the two squares overlap: a sum of their masks would reach 2 there
    from tests.test_datasets.grefcoco_fixture import SQUARE_B
    b_only = merge_target_masks([[SQUARE_B]], 30, 40)
    assert ((expected[0].astype(int) + b_only) == 2).any()


def test_merge_target_masks_pure_function():
    sq = [[0, 0, 4, 0, 4, 4, 0, 4]]
    m = merge_target_masks([sq, sq, [[1, 2, 3]]], 6, 6)
    assert m.dtype == np.uint8 and m.max() == 1
    assert m.sum() == merge_target_masks([sq], 6, 6).sum() > 0
    assert merge_target_masks([], 3, 5).shape == (3, 5)
    assert not merge_target_masks([], 3, 5).any()
    assert valid_polygons([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7],
                           [1, 2, 3, 4]]) == [[1, 2, 3, 4, 5, 6]]
    assert normalise_ann_ids(5) == [5] and normalise_ann_ids(-1) == [-1]
    with pytest.raises(ValueError, match=r'ref 3 mixes'):
        normalise_ann_ids([-1, 4], ref_id=3)
    with pytest.raises(ValueError, match=r'ref 8 has an empty ann_id'):
        normalise_ann_ids([], ref_id=8)


def test_no_target_flag_is_packed_into_the_data_sample(groot):
    pipeline = [
        dict(type='LoadReferImageFromFile'),
        dict(type='ReferResizePad', size=(28, 28)),
        dict(type='LoadReferringMask'),
        dict(type='SelectSentence', mode='first'),
        dict(type='PackReferSegInputs'),
    ]
    ds = build(groot['root'], 'val', test_mode=True, pipeline=pipeline)
    samples = [ds[i]['data_samples'] for i in range(len(ds))]
    flags = [(s.ref_id, s.no_target) for s in samples]
    assert flags == [(2, False), (2, False), (3, False), (5, True)]
    empty = samples[3]
    assert empty.text == 'the purple dog'
    assert empty.gt_sem_seg.data.shape == (1, 30, 40)
    assert int(empty.gt_sem_seg.data.sum()) == 0
    assert ds[0]['inputs'].shape == (3, 28, 28)


def test_pickle_refs_only_through_the_restricted_unpickler(tmp_path):
    js = write_grefcoco_root(str(tmp_path / 'js'))
    pk = write_grefcoco_root(str(tmp_path / 'pk'), refs_ext='.p')
    for split in ('val', 'testB'):
        a, b = build(js['root'], split), build(pk['root'], split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            ia, ib = a.get_data_info(i), b.get_data_info(i)
            for info in (ia, ib):
                info.pop('img_path'), info.pop('sample_idx')
            assert ia == ib

    marker = tmp_path / 'executed'

    class Evil:
        def __reduce__(self):
            return exec, (f'open({str(marker)!r}, "w").write("x")',)

    with open(pk['refs_path'], 'wb') as f:
        pickle.dump([Evil()], f, protocol=2)
    with pytest.raises(UnsafePickleError,
                       match=r'global (__builtin__|builtins)\.exec'):
        build(pk['root'], 'val')
    assert not marker.exists()


def test_json_is_preferred_to_the_pickle(groot):
    with open(osp.join(groot['root'], 'grefcoco', 'grefs(unc).p'),
              'wb') as f:
        pickle.dump([], f, protocol=2)
    ds = build(groot['root'], 'val')
    assert ds.resolve_refs_file().endswith('grefs(unc).json')
    assert len(ds) == 4


def test_unknown_ann_id_names_ref_and_ann(tmp_path):
    refs = build_refs()
    refs.append(dict(ref_id=42, ann_id=[201, 999], image_id=21,
                     split='val', category_id=[1],
                     sentences=[dict(sent_id=50, sent='x', raw='x')]))
    paths = write_grefcoco_root(str(tmp_path), refs=refs)
    with pytest.raises(ValueError, match=r'ref 42 .*ann_id 999'):
        build(paths['root'], 'val')
    refs[-1].update(ann_id=[201, 205])  # 205 lies on image 22
    paths = write_grefcoco_root(str(tmp_path), refs=refs)
    with pytest.raises(ValueError, match=r'ref 42: ann 205 belongs to '
                                         r'image 22'):
        build(paths['root'], 'val')
    refs[-1].update(ann_id=[-1, 201])
    paths = write_grefcoco_root(str(tmp_path), refs=refs)
    with pytest.raises(ValueError, match=r'ref 42 mixes'):
        build(paths['root'], 'val')


def test_unknown_split_lists_the_valid_ones(groot):
    with pytest.raises(ValueError,
                       match=r"'test'.*\['train', 'val', 'testA', 'testB'\]"):
        build(groot['root'], 'test')
    with pytest.raises(ValueError, match=r"dataset 'refcoco'.*grefcoco"):
        GRefCocoDataset(data_root=groot['root'], dataset='refcoco')


def test_missing_files_say_what_to_put_where(groot):
    os.remove(groot['refs_path'])
    folder = osp.join(groot['root'], 'grefcoco')
    with pytest.raises(FileNotFoundError) as err:
        build(groot['root'], 'val')
    msg = str(err.value)
    assert osp.join(folder, 'grefs(unc).json') in msg
    assert 'grefs(unc).p' in msg
    assert 'gRefCOCO' in msg and f'in {folder}/' in msg
    assert 'train2014' in msg
    write_grefcoco_root(groot['root'])
    os.remove(groot['ann_path'])
    with pytest.raises(FileNotFoundError,
                       match=re.escape(groot['ann_path']) +
                       r'.*instances\.json of the gRefCOCO release'):
        build(groot['root'], 'val')


def test_corrupt_and_missing_images_are_named(groot):
    ds = build(groot['root'], 'testB', test_mode=True,
               pipeline=[dict(type='LoadReferImageFromFile')])
    path = ds.get_data_info(0)['img_path']
    with open(path, 'wb') as f:
        f.write(b'not an image at all' * 4)
    with pytest.raises(ValueError, match=re.escape(path) + '.*corrupt'):
        ds[0]
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        ds[0]
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        build(groot['root'], 'testB', check_images=True)


def test_multi_target_ref_of_crowd_only_warns(tmp_path):
    refs = build_refs()
    refs.append(dict(ref_id=43, ann_id=[204, 204], image_id=21,
                     split='testA', category_id=[1],
                     sentences=[dict(sent_id=51, sent='crowds', raw='x')]))
    paths = write_grefcoco_root(str(tmp_path), refs=refs)
    with pytest.warns(UserWarning, match=r'\[43\].*only crowd'):
        ds = build(paths['root'], 'testA')
    info = ds.get_data_info(1)
    assert info['ref_id'] == 43 and info['no_target'] is False
    assert not merge_target_masks(info['segmentations'], 30, 40).any()
