"""The SpectralMoE configs on the synthetic multispectral set
(configs/spectralmoe/, configs/_base_/datasets/synthetic_multispectral.py).

The tiny config runs through mmseg's stock EncoderDecoder: here with a
stand-in adapter (so the data, the dual-stream backbone, UPerHead and the
aux-loss head are checked without SpectralMoEAdapter), and, once
``SpectralMoEAdapter`` is registered, as written, through tools/train.py
and tools/test.py."""
import glob
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.runner import Runner

from mmseg.registry import MODELS
from mmseg_sera.datasets.multispectral import (generate_multispectral_set,
                                               make_domains, make_scene,
                                               render)
from mmseg_sera.models.structures import AdapterOutput
from .conftest import REPO, run_tool, tiny_cfg_options

TINY = osp.join(
    REPO, 'configs', 'spectralmoe',
    'spectralmoe_dinov2-tiny_1xb8-20e_synthetic-multispectral-56x56.py')
STAND_IN = '_TestStandInSpectralMoE'


@MODELS.register_module(name=STAND_IN, force=True)
class StandInSpectralMoE(nn.Module):
    """``x + W x + V mean(second)``; loss_moe_balance = mean(W^2). Takes
    (and ignores) the real adapter's other options."""
    slot_kind = 'post_block'

    def __init__(self, embed_dims: int, second_dims: int, **kwargs) -> None:
        super().__init__()
        self.lin = nn.Linear(embed_dims, embed_dims)
        self.from_second = nn.Linear(second_dims, embed_dims)

    def forward(self, x, *, hw, text=None, second=None) -> AdapterOutput:
        y = x + self.lin(x) + self.from_second(second.mean(1, keepdim=True))
        return AdapterOutput(
            y, aux_losses=dict(loss_moe_balance=self.lin.weight.pow(2).mean()))


@pytest.fixture(scope='module')
def ms_root(tmp_path_factory) -> str:
    """16 training and 8 validation scenes of 56 px in domains A and B."""
    root = str(tmp_path_factory.mktemp('synthetic_multispectral'))
    generate_multispectral_set(root, num_train=16, num_val=8, img_size=56,
                               num_domains=2, seed=0, progress=False)
    return root


def _scalars(work_dir: str) -> list:
    rows = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                   'scalars.json')):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    return rows


def _short(root: str, work_dir: str) -> dict:
    return {
        'train_dataloader.dataset.data_root': f'{root}/A',
        'val_dataloader.dataset.data_root': f'{root}/A',
        'test_dataloader.dataset.data_root': f'{root}/B',
        'train_cfg.max_epochs': 1,
        'train_cfg.val_interval': 1000,
        'default_hooks.logger.interval': 1,
    }


def test_tiny_config_model_and_protocol():
    cfg = Config.fromfile(TINY)
    m = cfg.model
    assert m.type == 'EncoderDecoder' and m.get('neck') is None
    assert m.backbone.type == 'DualStreamDINOv2'
    assert m.auxiliary_head.type == 'BackboneAuxLossHead'
    assert m.decode_head.type == 'UPerHead'
    bands = m.backbone.backbone.in_channels
    assert bands == 6 == len(m.data_preprocessor.mean) == len(
        m.data_preprocessor.std)
    assert m.backbone.second.trainable == 'frozen'
    assert m.backbone.second_bands == (2, 1, 0)  # RGB of the 6 bands
    adapter = m.backbone.backbone.adapters[0]
    assert adapter.type == 'SpectralMoEAdapter'
    assert adapter.insert == (0, 1, 2, 3)  # every block
    assert adapter.second_dims == m.backbone.second.arch.embed_dims
    # train on A, select on A, test on the shifted sensor B
    for loader, domain, split in (('train_dataloader', 'A', 'train'),
                                  ('val_dataloader', 'A', 'val'),
                                  ('test_dataloader', 'B', 'val')):
        ds = cfg[loader].dataset
        assert ds.type == 'SyntheticMultispectralDataset'
        assert ds.data_root == f'data/synthetic_multispectral/{domain}'
        assert ds.data_prefix.img_path == f'img/{split}'
        assert ds.pipeline[0] == dict(type='LoadMultiBandImageFromFile',
                                      num_bands=bands)


def test_normalisation_is_domain_a_train_statistics():
    """The config's mean / std are those the default generator writes to
    meta.json for domain A (320 training scenes, seed 0)."""
    cfg = Config.fromfile(TINY)
    A = make_domains(6, 3, seed=0)[0]
    s1 = np.zeros(6)
    s2 = np.zeros(6)
    n = 0
    for i in range(320):
        _, rho = make_scene(0, 'train', i, 56)
        rng = np.random.default_rng([0, 0, i, 1000])
        img = render(rho, A, rng).reshape(-1, 6).astype(np.float64)
        s1 += img.sum(0)
        s2 += (img**2).sum(0)
        n += len(img)
    mean = s1 / n
    std = np.sqrt(s2 / n - mean**2)
    np.testing.assert_allclose(cfg.model.data_preprocessor.mean, mean,
                               atol=0.01)
    np.testing.assert_allclose(cfg.model.data_preprocessor.std, std,
                               atol=0.01)


def test_tiny_config_trains_with_a_stand_in_adapter(ms_root, tmp_path):
    """Two training steps of the stock EncoderDecoder in-process, with the
    stand-in adapter; the balance loss is logged as aux.loss_moe_balance
    and the second backbone stays as it was."""
    cfg = Config.fromfile(TINY)
    cfg.merge_from_dict(_short(ms_root, str(tmp_path)))
    adapter = cfg.model.backbone.backbone.adapters[0]
    adapter.type = STAND_IN
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.work_dir = str(tmp_path / 'work')
    runner = Runner.from_cfg(cfg)
    second = {k: v.clone() for k, v in
              runner.model.backbone.second.state_dict().items()}
    runner.train()
    rows = [r for r in _scalars(cfg.work_dir) if 'loss' in r]
    assert len(rows) == 2  # 16 scenes, batch 8
    for row in rows:
        assert math.isfinite(row['decode.loss_ce'])
        assert row['aux.loss_moe_balance'] > 0
        assert row['loss'] == pytest.approx(
            row['decode.loss_ce'] + row['aux.loss_moe_balance'], rel=1e-4)
    for k, v in runner.model.backbone.second.state_dict().items():
        assert torch.equal(v, second[k]), k
    metrics = runner.test()
    assert 0 <= metrics['mIoU'] <= 100


def _spectral_moe_registered() -> bool:
    import mmseg_sera  # noqa: F401
    return MODELS.get('SpectralMoEAdapter') is not None


@pytest.mark.skipif(not _spectral_moe_registered(),
                    reason='SpectralMoEAdapter is not written yet')
def test_tiny_config_trains_and_tests_through_the_tools(ms_root, tmp_path):
    """The config as written: two steps through tools/train.py, then
    tools/test.py on domain B's validation scenes."""
    work_dir = str(tmp_path / 'train')
    opts = tiny_cfg_options(f'{ms_root}/A',
                            **_short(ms_root, work_dir))
    run_tool(['tools/train.py', TINY, '--work-dir', work_dir] + opts)
    rows = [r for r in _scalars(work_dir) if 'loss' in r]
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row['loss'])
        assert math.isfinite(row['aux.loss_moe_balance'])
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    eval_dir = tmp_path / 'eval'
    run_tool(['tools/test.py', TINY, ckpt, '--work-dir', str(eval_dir)] +
             opts)
    logs = glob.glob(str(eval_dir / '*' / '*.json'))
    assert logs, 'tools/test.py wrote no metrics'
    with open(logs[0]) as f:
        metrics = json.loads(f.readline())
    assert 0.0 <= metrics['mIoU'] <= 100.0
