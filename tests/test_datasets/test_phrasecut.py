"""PhraseCutDataset on a small set in the PhraseCut layout
(:mod:`tests.test_datasets.phrasecut_fixture`): splits, merged masks (union
of instances and parts, holes), the real pipelines and ReferSegMetric, and
the errors for wrong splits and missing files."""
import json
import os
import os.path as osp
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmengine.structures import PixelData
from PIL import Image, ImageDraw

from mmseg.registry import DATASETS, METRICS
from mmseg_sera.datasets import PhraseCutDataset, RefCocoDataset
from mmseg_sera.datasets.transforms import (LoadReferImageFromFile,
                                            LoadReferringMask)
from tests.test_datasets.phrasecut_fixture import (TRIANGLE_A, TRIANGLE_B,
                                                   write_phrasecut_root)

CFG = (Path(__file__).resolve().parents[2] /
       'configs/_base_/datasets/phrasecut.py')


@pytest.fixture
def pc_root(tmp_path):
    return write_phrasecut_root(str(tmp_path / 'phrasecut'))


def build(root, split, **kwargs):
    # serialize_data=False: MMEngine's serialisation runs gc.collect(), slow
    # in a process full of torch objects; the config tests keep it on.
    kwargs.setdefault('serialize_data', False)
    return PhraseCutDataset(data_root=root, split=split, **kwargs)


def items_by_task(ds):
    return {ds.get_data_info(i)['task_id']: ds.get_data_info(i)
            for i in range(len(ds))}


def loaded_mask(info):
    """The mask as the pipelines load it (image first: size check)."""
    results = LoadReferringMask()(LoadReferImageFromFile()(info))
    assert results['gt_seg_map'].shape == results['img'].shape[:2]
    return results['gt_seg_map']


def reference_mask(polygons, h, w):
    """PhraseCut's rule written independently: one fresh PIL canvas per
    part (integer-truncated points, filled and outlined), summed, > 0."""
    total = np.zeros((h, w), np.int64)
    for instance in polygons:
        for part in instance:
            if len(part) < 2:
                continue
            img = Image.new('L', (w, h), 0)
            ImageDraw.Draw(img).polygon(
                [(int(x), int(y)) for x, y in part], outline=1, fill=1)
            total += np.array(img)
    return (total > 0).astype(np.uint8)


def box(h, w, *rects):
    """Union of inclusive pixel rectangles (x0, y0, x1, y1)."""
    m = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in rects:
        m[y0:y1 + 1, x0:x1 + 1] = 1
    return m


# hand-computed masks of the val tasks on image 101 (40 x 60): a polygon
# with integer corners covers its corner pixels inclusively (PIL outline)
V1_A = (2, 3, 10, 12)                      # 9 x 10 = 90 pixels
V1_B = [(20, 5, 28, 15), (25, 10, 33, 20)]  # 99 + 99 - 24 (overlap) = 174
V2_OUTER, V2_HOLE = (40, 2, 58, 20), (46, 8, 52, 14)  # 361 - 49 = 312


def test_items_per_split_and_fields(pc_root):
    root = pc_root['root']
    val = build(root, 'val', test_mode=True)
    assert len(val) == 3
    with pytest.warns(UserWarning, match=r'empty phrase: task_id 104__32'):
        train = build(root, 'train')
    assert len(train) == 2
    assert len(build(root, 'test', test_mode=True)) == 2
    assert len(build(root, 'miniv', test_mode=True)) == 1
    assert len(build(root, 'val_miniv', test_mode=True)) == 4

    info = items_by_task(val)['101__11_12']
    assert info['img_path'] == osp.join(pc_root['img_dir'], '101.jpg')
    assert (info['height'], info['width']) == (40, 60)
    assert info['sentences'] == ['two red boxes']
    assert info['sent_ids'] == ['101__11_12']
    assert info['ref_id'] == info['task_id'] == '101__11_12'
    assert info['ann_id'] == [11, 12]
    assert info['sentence_kinds'] == ['attribute']
    assert info['category_name'] == 'box'
    assert info['split'] == 'val' and info['iscrowd'] == 0
    assert len(info['instance_boxes']) == len(info['polygons']) == 2
    assert info['segmentation']['size'] == [40, 60]
    assert isinstance(info['segmentation']['counts'], str)
    assert val.metainfo['classes'] == ('background', 'object')
    assert (val.metainfo['dataset'], val.metainfo['split']) == (
        'phrasecut', 'val')
    # the combined split keeps each item's own split
    both = build(root, 'val_miniv', test_mode=True)
    assert [both.get_data_info(i)['split'] for i in range(4)] == [
        'val', 'val', 'val', 'miniv']


def test_items_have_the_keys_of_refcoco_items(pc_root, refer_root):
    ref = RefCocoDataset(data_root=refer_root['root'], split='val',
                         test_mode=True, serialize_data=False)
    ref_keys = set(ref.get_data_info(0))
    ds = build(pc_root['root'], 'val', test_mode=True)
    for i in range(len(ds)):
        assert ref_keys <= set(ds.get_data_info(i))


def test_instances_and_parts_merge_by_union(pc_root):
    ds = build(pc_root['root'], 'val', test_mode=True)
    mask = loaded_mask(items_by_task(ds)['101__11_12'])
    expected = box(40, 60, V1_A, *V1_B)
    assert expected.sum() == 90 + 174
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    # the overlap of the two parts stays filled (union, not XOR), and the
    # fractional corner (25.9, 10.2)-(33.7, 20.9) was truncated
    assert mask[10:16, 25:29].all()
    assert mask[20, 33] == 1 and mask[21, 33] == 0 and mask[20, 34] == 0


def test_hole_is_empty(pc_root):
    ds = build(pc_root['root'], 'val', test_mode=True)
    mask = loaded_mask(items_by_task(ds)['101__13'])
    x0, y0, x1, y1 = V2_HOLE
    assert mask[y0:y1 + 1, x0:x1 + 1].sum() == 0
    # the inner boundary itself is drawn
    assert mask[y0 - 1, x0:x1 + 1].all() and mask[y1 + 1, x0:x1 + 1].all()
    expected = box(40, 60, V2_OUTER)
    expected[y0:y1 + 1, x0:x1 + 1] = 0
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 312


def test_masks_equal_the_reference_rasteriser(pc_root):
    checked = 0
    for split in ('train', 'val', 'test', 'miniv'):
        with warnings.catch_warnings():  # train: the blank phrase
            warnings.simplefilter('ignore', UserWarning)
            ds = build(pc_root['root'], split, test_mode=True)
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            expected = reference_mask(info['polygons'], info['height'],
                                      info['width'])
            if info['image_id'] == 103:  # no image file: decode only
                mask = LoadReferringMask()(dict(info))['gt_seg_map']
            else:
                mask = loaded_mask(info)
            np.testing.assert_array_equal(mask, expected)
            assert mask.sum() > 0
            checked += 1
    assert checked == 8
    # two overlapping triangles: the mask is their union
    tri = items_by_task(build(pc_root['root'], 'val'))['102__21_22']
    a = reference_mask([[TRIANGLE_A]], 30, 30)
    b = reference_mask([[TRIANGLE_B]], 30, 30)
    assert (a & b).sum() > 0
    np.testing.assert_array_equal(loaded_mask(tri), a | b)


def test_degenerate_parts(pc_root):
    with pytest.warns(UserWarning, match='104__32'):
        ds = build(pc_root['root'], 'train')
    mask = loaded_mask(items_by_task(ds)['102__23'])
    # a 2-point part is drawn as a line, a 1-point part is skipped
    expected = box(30, 30, (1, 1, 1, 8), (10, 10, 12, 12))
    np.testing.assert_array_equal(mask, expected)
    assert mask[20, 20] == 0


def _loader(cfg, name, root, batch_size):
    loader_cfg = cfg[name].copy()
    loader_cfg.update(num_workers=0, persistent_workers=False,
                      batch_size=batch_size)
    loader_cfg.dataset.data_root = root
    return Runner.build_dataloader(loader_cfg, seed=0)


def _scores(cfg, samples, preds):
    metric = METRICS.build(cfg.val_evaluator)
    outputs = []
    for s in samples:
        s = s.clone()
        s.pred_sem_seg = PixelData(data=preds[s.ref_id])
        outputs.append(s.to_dict())
    metric.process({}, outputs)
    return metric.evaluate(len(outputs))


def test_config_pipelines_and_refer_metric(pc_root):
    import torch
    cfg = Config.fromfile(str(CFG))
    with DefaultScope.overwrite_default_scope('mmseg'):
        batch = next(iter(_loader(cfg, 'val_dataloader', pc_root['root'],
                                  8)))
        samples = batch['data_samples']
        assert len(samples) == 3
        assert all(x.shape == (3, 448, 448) for x in batch['inputs'])
        by_id = {s.ref_id: s for s in samples}
        assert set(by_id) == {'101__11_12', '101__13', '102__21_22'}
        assert by_id['101__11_12'].text == 'two red boxes'
        assert by_id['101__11_12'].kind == 'attribute'
        assert by_id['101__13'].sent_id == '101__13'
        # ground truth at the original size, equal to the merged masks
        gt = {k: s.gt_sem_seg.data[0].numpy() for k, s in by_id.items()}
        assert tuple(by_id['101__13'].ori_shape) == (40, 60)
        np.testing.assert_array_equal(gt['101__11_12'],
                                      box(40, 60, V1_A, *V1_B))
        assert gt['101__13'].sum() == 312
        tri = reference_mask([[TRIANGLE_A], [TRIANGLE_B]], 30, 30)
        np.testing.assert_array_equal(gt['102__21_22'], tri)

        perfect = {k: torch.from_numpy(m[None].astype(np.int64))
                   for k, m in gt.items()}
        scores = _scores(cfg, samples, perfect)
        assert scores['mIoU'] == pytest.approx(100.0)
        assert scores['oIoU'] == pytest.approx(100.0)
        assert scores['Pr@0.9'] == pytest.approx(100.0)
        for kind in ('attribute', 'name', 'verbose'):
            assert scores[f'mIoU_{kind}'] == pytest.approx(100.0)

        # hand-made imperfect predictions: only the first instance of the
        # boxes (I 90, U 264), the frame without its hole (I 312, U 361),
        # the triangles exactly (I = U = n)
        n = int(tri.sum())
        imperfect = dict(perfect)
        imperfect['101__11_12'] = torch.from_numpy(
            box(40, 60, V1_A)[None].astype(np.int64))
        imperfect['101__13'] = torch.from_numpy(
            box(40, 60, V2_OUTER)[None].astype(np.int64))
        scores = _scores(cfg, samples, imperfect)
    ious = [90 / 264, 312 / 361, 1.0]
    assert scores['mIoU'] == pytest.approx(100 * np.mean(ious))
    assert scores['oIoU'] == pytest.approx(
        100 * (90 + 312 + n) / (264 + 361 + n))
    assert scores['Pr@0.5'] == pytest.approx(200 / 3)
    assert scores['Pr@0.9'] == pytest.approx(100 / 3)
    assert scores['mIoU_attribute'] == pytest.approx(100 * 90 / 264)
    assert scores['mIoU_name'] == pytest.approx(100 * 312 / 361)


def test_config_train_pipeline(pc_root):
    cfg = Config.fromfile(str(CFG))
    with DefaultScope.overwrite_default_scope('mmseg'):
        with pytest.warns(UserWarning, match='104__32'):
            loader = _loader(cfg, 'train_dataloader', pc_root['root'], 2)
        batch = next(iter(loader))
    assert [tuple(x.shape) for x in batch['inputs']] == [(3, 448, 448)] * 2
    for s in batch['data_samples']:
        seg = s.gt_sem_seg.data
        assert tuple(seg.shape) == (1, 448, 448)
        assert set(seg.unique().tolist()) == {0, 1}
        assert s.text in ('small square', 'a line and a dot')


def test_config_names_the_dataset():
    cfg = Config.fromfile(str(CFG))
    ref = Config.fromfile(str(CFG.parent / 'refcoco.py'))
    for loader, split in (('train_dataloader', 'train'),
                          ('val_dataloader', 'val'),
                          ('test_dataloader', 'test')):
        ds = cfg[loader].dataset
        assert ds.type == 'PhraseCutDataset'
        assert ds.data_root == 'data/phrasecut'
        assert ds.split == split
        # nothing of RefCocoDataset's arguments is left over
        assert not {'dataset', 'split_by', 'sentence_sampling'} & set(ds)
        assert ds.pipeline == ref[loader].dataset.pipeline
    assert cfg.val_evaluator.type == 'ReferSegMetric'
    assert DATASETS.get('PhraseCutDataset') is PhraseCutDataset


def test_wrong_split_lists_the_valid_ones(pc_root):
    root = pc_root['root']
    with pytest.raises(ValueError, match=re.escape(
            "'trian'; valid splits: ['train', 'val', 'test', 'miniv']")):
        build(root, 'trian')
    # the inputs-only file is no split; nor is a combination with a bad part
    with pytest.raises(ValueError, match="'input_val'"):
        build(root, 'input_val')
    with pytest.raises(ValueError, match="'val_bogus'"):
        build(root, 'val_bogus')
    # another refer_<name>.json is a split of its own
    shutil.copy(pc_root['refer_paths']['miniv'],
                osp.join(root, 'refer_extra.json'))
    assert len(build(root, 'extra')) == 1
    with pytest.raises(ValueError, match=r"'miniv', 'extra'\]"):
        build(root, 'nope')


def test_missing_files_are_named(pc_root):
    root = pc_root['root']
    val_json = pc_root['refer_paths']['val']
    os.remove(val_json)
    with pytest.raises(FileNotFoundError,
                       match=re.escape(val_json) + '.*download_dataset.py'):
        build(root, 'val')
    with pytest.raises(FileNotFoundError, match=re.escape(val_json)):
        build(root, 'val_miniv')
    with pytest.raises(FileNotFoundError, match='refer_val.json'):
        build(str(Path(root) / 'nowhere'), 'val')

    shutil.rmtree(pc_root['img_dir'])
    with pytest.raises(FileNotFoundError,
                       match=re.escape(pc_root['img_dir']) + '.*image_id'):
        build(root, 'miniv')
    os.makedirs(pc_root['img_dir'])

    os.remove(pc_root['info_path'])
    with pytest.raises(FileNotFoundError,
                       match=re.escape(pc_root['info_path'])):
        build(root, 'miniv')
    with pytest.raises(FileNotFoundError, match='other.json'):
        build(root, 'miniv', img_info_file='other.json')


def test_missing_image_is_named(pc_root):
    root = pc_root['root']
    missing = osp.join(pc_root['img_dir'], '103.jpg')
    ds = build(root, 'test', test_mode=True)
    info = items_by_task(ds)['103__41']
    assert info['img_path'] == missing and not osp.exists(missing)
    with pytest.raises(FileNotFoundError,
                       match=re.escape(missing) + r'.*ref_id=103__41'):
        LoadReferImageFromFile()(info)
    ds = build(root, 'test', test_mode=True,
               pipeline=[dict(type='LoadReferImageFromFile'),
                         dict(type='LoadReferringMask')])
    assert ds[1]['gt_seg_map'].shape == (16, 16)  # the other task loads
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        ds[0]
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        build(root, 'test', check_images=True)
    assert len(build(root, 'val', check_images=True)) == 3


def test_bad_tasks_are_named(pc_root):
    root = pc_root['root']
    # the inputs-only file under a split name: no ground truth
    shutil.copy(osp.join(root, 'refer_input_val.json'),
                osp.join(root, 'refer_nogt.json'))
    with pytest.raises(ValueError, match=r"101__11_12 .*'Polygons'.*input"):
        build(root, 'nogt')
    # a task on an image absent from image_data_split.json
    with open(pc_root['refer_paths']['miniv']) as f:
        tasks = json.load(f)
    tasks[0]['image_id'] = 999
    with open(pc_root['refer_paths']['miniv'], 'w') as f:
        json.dump(tasks, f)
    with pytest.raises(ValueError,
                       match=r'104__34 .*image_id 999.*image_data_split'):
        build(root, 'miniv')
    # polygons in a form other than lists of [x, y] points
    tasks[0]['image_id'] = 104
    tasks[0]['Polygons'] = [[[0, 0, 5, 0, 5, 5]]]
    with open(pc_root['refer_paths']['miniv'], 'w') as f:
        json.dump(tasks, f)
    ds = build(root, 'miniv')
    with pytest.raises(ValueError, match=r'104__34.*\[x, y\] points'):
        ds.get_data_info(0)
