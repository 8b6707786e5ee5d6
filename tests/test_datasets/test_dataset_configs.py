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
