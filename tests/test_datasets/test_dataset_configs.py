"""The dataset configs load, point at the right files, and the synthetic
one runs end to end through MMEngine's dataloader and evaluator."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

from mmseg.registry import METRICS
from mmseg_sera.datasets.synthetic import generate_refer_set

CFG_DIR = Path(__file__).resolve().parents[2] / 'configs/_base_/datasets'


@pytest.mark.parametrize('name, dataset, split_by', [
    ('refcoco', 'refcoco', 'unc'),
    ('refcoco+', 'refcoco+', 'unc'),
    ('refcocog_umd', 'refcocog', 'umd'),
    ('refcocog_google', 'refcocog', 'google'),
    ('synthetic_refer', 'refcoco', 'unc'),
])
def test_configs_name_their_dataset(name, dataset, split_by):
    cfg = Config.fromfile(str(CFG_DIR / f'{name}.py'))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        ds = cfg[loader].dataset
        assert ds.type == 'RefCocoDataset'
        assert (ds.dataset, ds.split_by) == (dataset, split_by)
    assert cfg.train_dataloader.dataset.split == 'train'
    assert cfg.test_dataloader.dataset.sentence_sampling == 'all'
    assert cfg.val_evaluator.type == 'ReferSegMetric'
    # test pipelines load the mask after the resize (original-size GT)
    types = [t.type for t in cfg.test_dataloader.dataset.pipeline]
    assert types.index('LoadReferringMask') > types.index('ReferResizePad')
    types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert types.index('LoadReferringMask') < types.index('ReferResizePad')


def test_synthetic_config_end_to_end(tmp_path):
    generate_refer_set(str(tmp_path), num_images=12, img_size=112, seed=1,
                       progress=False)
    cfg = Config.fromfile(str(CFG_DIR / 'synthetic_refer.py'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        batches = {}
        for name in ('train_dataloader', 'val_dataloader'):
            loader_cfg = cfg[name].copy()
            loader_cfg.update(num_workers=0, persistent_workers=False,
                              batch_size=4)
            loader_cfg.dataset.data_root = str(tmp_path)
            loader = Runner.build_dataloader(loader_cfg, seed=0)
            batches[name] = next(iter(loader))
        train = batches['train_dataloader']
        assert len(train['inputs']) == 4
        assert train['inputs'][0].shape == (3, 112, 112)
        assert all(s.gt_sem_seg.data.shape == (1, 112, 112)
                   for s in train['data_samples'])
        assert all(isinstance(s.text, str) and s.text.startswith('the ')
                   for s in train['data_samples'])
        # the evaluator of the config on perfect predictions: 100 mIoU
        val = batches['val_dataloader']['data_samples']
        metric = METRICS.build(cfg.val_evaluator)
        outputs = []
        for s in val:
            s = s.clone()
            s.set_data(dict(pred_sem_seg=s.gt_sem_seg.clone()))
            outputs.append(s.to_dict())
        metric.process({}, outputs)
        scores = metric.evaluate(len(outputs))
    assert scores['mIoU'] == pytest.approx(100.0)
    assert scores['Pr@0.9'] == pytest.approx(100.0)
    kinds = {s.kind for s in val}
    assert {f'mIoU_{k}' for k in kinds} <= set(scores)
    assert isinstance(val[0].gt_sem_seg.data, torch.Tensor)


@pytest.mark.parametrize('name, data_root', [
    ('grefcoco', 'data'),
    ('synthetic_grefer', 'data/synthetic_grefer'),
])
def test_gres_configs_name_their_dataset(name, data_root):
    cfg = Config.fromfile(str(CFG_DIR / f'{name}.py'))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        ds = cfg[loader].dataset
        assert ds.type == 'GRefCocoDataset'
        assert (ds.dataset, ds.split_by) == ('grefcoco', 'unc')
        assert ds.data_root == data_root
        assert ds.data_prefix == dict(img_path='images/train2014')
        assert ds.sentence_sampling == 'all'
    assert cfg.train_dataloader.dataset.split == 'train'
    assert cfg.val_evaluator.type == cfg.test_evaluator.type == \
        'ReferSegMetric'
    assert cfg.val_evaluator.protocol == cfg.test_evaluator.protocol == \
        'gres'
    types = [t.type for t in cfg.test_dataloader.dataset.pipeline]
    assert types.index('LoadReferringMask') > types.index('ReferResizePad')


def test_synthetic_grefer_config_end_to_end(tmp_path):
    from mmseg_sera.datasets.synthetic_gres import generate_grefer_set
    generate_grefer_set(str(tmp_path), num_images=16, img_size=112, seed=1,
                        progress=False)
    cfg = Config.fromfile(str(CFG_DIR / 'synthetic_grefer.py'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        loader_cfg = cfg.val_dataloader.copy()
        loader_cfg.update(num_workers=0, persistent_workers=False,
                          batch_size=64)
        loader_cfg.dataset.data_root = str(tmp_path)
        loader_cfg.dataset.split = 'train'
        loader = Runner.build_dataloader(loader_cfg, seed=0)
        samples = next(iter(loader))['data_samples']
        # perfect masks; "no target" where the ground truth is empty
        metric = METRICS.build(cfg.val_evaluator)
        outputs = []
        for s in samples:
            s = s.clone()
            s.set_data(dict(pred_sem_seg=s.gt_sem_seg.clone()))
            outputs.append(s.to_dict())
        metric.process({}, outputs)
        scores = metric.evaluate(len(outputs))
    flags = [s.no_target for s in samples]
    assert any(flags) and not all(flags)
    assert scores['gIoU'] == pytest.approx(100.0)
    assert scores['cIoU'] == pytest.approx(100.0)
    assert scores['N-acc'] == scores['T-acc'] == 100.0
    kinds = {s.kind for s in samples}
    assert {'no_target', 'multi'} <= kinds
    assert {f'gIoU_{k}' for k in kinds} <= set(scores)


def test_grefcoco_config_reads_the_release_layout(tmp_path):
    from tests.test_datasets.grefcoco_fixture import write_grefcoco_root
    write_grefcoco_root(str(tmp_path))
    cfg = Config.fromfile(str(CFG_DIR / 'grefcoco.py'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        loader_cfg = cfg.val_dataloader.copy()
        loader_cfg.update(num_workers=0, persistent_workers=False,
                          batch_size=8)
        loader_cfg.dataset.data_root = str(tmp_path)
        batch = next(iter(Runner.build_dataloader(loader_cfg, seed=0)))
    samples = batch['data_samples']
    assert [s.no_target for s in samples] == [False, False, False, True]
    assert batch['inputs'][0].shape == (3, 448, 448)
    assert samples[3].gt_sem_seg.data.shape == (1, 30, 40)
