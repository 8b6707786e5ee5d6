"""The SpectralMoE configs on the synthetic multispectral set
(configs/spectralmoe/, configs/_base_/datasets/synthetic_multispectral.py).

The tiny config runs through mmseg's stock EncoderDecoder: here with a
stand-in adapter (so the data, the dual-stream backbone, UPerHead and the
aux-loss head are checked without SpectralMoEAdapter), and, once
``SpectralMoEAdapter`` is registered, as written, through tools/train.py
and tools/test.py.

The SpectralMoE-RIS configs (``spectralmoe-ris_*``) are SERA's RefCOCO and
tiny synthetic models with a SpectralMoEAdapter after every block in place
of the SERA-Adapters, the sentence as second modality: they build, count
the adapter parameters their comments state, put the adapters' balance
loss into the loss dict, and the tiny one trains and tests through the
tools."""
import glob
import json
import math
import os.path as osp
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from mmseg.registry import MODELS
from mmseg_sera.datasets.multispectral import (generate_multispectral_set,
                                               make_domains, make_scene,
                                               render)
from mmseg_sera.models.structures import AdapterOutput
from .conftest import REPO, run_test_tool, run_tool, tiny_cfg_options
from .test_configs import _batch as refer_batch

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
    run_test_tool(TINY, ckpt, tmp_path / 'eval', opts, keys=('mIoU',))


# --------------------------------------------------------------------------
# SpectralMoE in SERA (referring segmentation, the sentence as second
# modality; PEERS.md 5.4)
# --------------------------------------------------------------------------
RIS_B = osp.join(
    REPO, 'configs', 'spectralmoe',
    'spectralmoe-ris_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py')
RIS_TINY = osp.join(
    REPO, 'configs', 'spectralmoe',
    'spectralmoe-ris_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
SERA_B = osp.join(
    REPO, 'configs', 'sera',
    'sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py')
SERA_TINY = osp.join(
    REPO, 'configs', 'sera',
    'sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
# (config, SERA config it changes, blocks, D, Ct, adapter parameters)
RIS = {
    'refcoco': (RIS_B, SERA_B, 12, 768, 512, 2_796_289),
    'tiny': (RIS_TINY, SERA_TINY, 4, 96, 64, 45_345),
}
ADAPTER_KEYS = ('adapter_indices', 'adapter_cfg', 'adapters')


@pytest.fixture(scope='module')
def ris_models() -> dict:
    """Both models with random weights (init_weights not run, so no
    pretrained file is read)."""
    init_default_scope('mmseg')
    return {k: MODELS.build(Config.fromfile(v[0]).model)
            for k, v in RIS.items()}


def _stated_count(path: str) -> int:
    with open(path) as f:
        text = f.read()
    counts = re.findall(r'Trainable adapter parameters: ([\d,]+)', text)
    assert len(counts) == 1, path
    return int(counts[0].replace(',', ''))


@pytest.mark.parametrize('name', sorted(RIS))
def test_ris_config_is_sera_with_spectralmoe_adapters(name):
    """Everything but the backbone's adapters is the SERA config's."""
    path, sera_path, blocks, _, ct, _ = RIS[name]
    cfg, sera = Config.fromfile(path), Config.fromfile(sera_path)
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'default_hooks', 'custom_hooks'):
        assert cfg.get(key) == sera.get(key), key
    for key in set(cfg.model) | set(sera.model):
        if key != 'backbone':
            assert cfg.model.get(key) == sera.model.get(key), key
    bb, sera_bb = cfg.model.backbone, sera.model.backbone
    assert {k: v for k, v in bb.items() if k not in ADAPTER_KEYS} == \
        {k: v for k, v in sera_bb.items() if k not in ADAPTER_KEYS}
    assert sera_bb.adapter_indices and sera_bb.adapter_cfg
    assert bb.adapter_indices == () and bb.adapter_cfg is None
    adapter, = bb.adapters
    assert adapter.type == 'SpectralMoEAdapter'
    assert adapter.insert == tuple(range(blocks))
    assert adapter.num_layers == blocks
    assert adapter.text_dims == ct == cfg.model.neck.text_dims
    assert not adapter.get('released_compat', False)


@pytest.mark.parametrize('name', sorted(RIS))
def test_ris_model_adapters_and_count(ris_models, name):
    """A SpectralMoEAdapter after every block, no SERA-Adapter, and as
    many adapter parameters as the config's comment says."""
    from mmseg_sera.models.adapters.spectral_moe import SpectralMoEAdapter
    path, _, blocks, d, ct, count = RIS[name]
    model = ris_models[name]
    bb = model.backbone
    assert bb.adapter_indices == ()
    assert bb.adapters.indices('post_block') == tuple(range(blocks))
    assert not any(
        type(m).__name__ == 'SERAAdapter' for m in model.modules())
    adapters = [bb.adapters[str(i)] for i in range(blocks)]
    assert all(isinstance(a, SpectralMoEAdapter) for a in adapters)
    a = adapters[0]
    assert (a.embed_dims, a.text_dims, a.num_layers) == (d, ct, blocks)
    assert (a.fusion, a.combine, a.second_source) == ('xattn', 'gated_sum',
                                                      'text')
    assert a.loss_weight == 1e-2 and not a.released_compat
    # W_tf, W_df, s and the word projection: once, in block 0
    assert [x.owns_shared for x in adapters] == [True] + [False] * (
        blocks - 1)
    assert all(x.shared_parts is a.shared_parts for x in adapters)
    params = [p for n, p in model.named_parameters()
              if n.startswith('backbone.adapters.')]
    assert all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == count == _stated_count(path)


@pytest.mark.parametrize('name', sorted(RIS))
def test_ris_balance_loss_reaches_the_loss_dict(ris_models, name):
    """One training forward on two 112 px samples (8 x 8 patches): every
    block routes its patches, the backbone reports loss_moe_balance, the
    loss dict's loss_moe_balance is the backbone's plus SERA-Fusion's, and
    the word path gets a gradient."""
    _, _, blocks, _, _, _ = RIS[name]
    model = ris_models[name].train()
    data = refer_batch(model)
    texts = model.texts_of(data['data_samples'])
    torch.manual_seed(1)
    with torch.no_grad():
        _, bb, neck = model.extract_feat(data['inputs'], texts)
    assert sorted(bb.routing) == list(range(blocks))
    E = model.backbone.adapters['0'].router.num_experts
    assert all(r.shape == (2, 64, E) for r in bb.routing.values())
    backbone_loss = bb.aux_losses['loss_moe_balance']
    assert torch.isfinite(backbone_loss) and backbone_loss > 0
    torch.manual_seed(1)  # the same router noise
    losses = model(**data, mode='loss')
    torch.testing.assert_close(
        losses['loss_moe_balance'],
        backbone_loss + neck.aux_losses['loss_moe_balance'])
    model.zero_grad()
    sum(v for k, v in losses.items() if k.startswith('loss_')).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    for key in ('experts.tokens_b', 'shared.second_proj.weight',
                'second_router.noise_proj.weight'):
        assert f'backbone.adapters.0.{key}' in grads, key
    assert f'backbone.adapters.{blocks - 1}.experts.tokens_b' in grads


def test_ris_tiny_trains_and_tests_through_the_tools(synthetic_root,
                                                     tmp_path):
    """Two steps through tools/train.py (16 training items, batch 8), the
    adapters' parameters in the checkpoint and trained, then
    tools/test.py on 8 validation sentences."""
    work_dir = str(tmp_path / 'train')
    short = {'train_cfg.max_epochs': 1,
             'train_dataloader.dataset.indices': 16,
             'test_dataloader.dataset.indices': 8,
             'test_dataloader.batch_size': 8}
    opts = tiny_cfg_options(synthetic_root, **short)
    run_tool(['tools/train.py', RIS_TINY, '--work-dir', work_dir] + opts)
    rows = [r for r in _scalars(work_dir) if 'loss' in r]
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row['loss'])
        assert math.isfinite(row['loss_moe_balance'])
        assert row['loss_moe_balance'] > 0
        # the expert utilisation hook sees every adapter
        for i in range(4):
            assert f'util_adapter{i}_expert0' in row, (i, sorted(row))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    state = torch.load(ckpt, map_location='cpu',
                       weights_only=False)['state_dict']
    adapter_keys = {k for k in state if k.startswith('backbone.adapters.')}
    assert {k.split('.')[2] for k in adapter_keys} == {'0', '1', '2', '3'}
    assert {k for k in adapter_keys if '.shared.' in k} == {
        f'backbone.adapters.0.shared.{k}'
        for k in ('token_proj.weight', 'token_proj.bias', 'out_proj.weight',
                  'out_proj.bias', 'scale', 'second_proj.weight',
                  'second_proj.bias')
    }
    for i in range(4):  # B starts at zero; two steps moved it
        assert state[f'backbone.adapters.{i}.experts.tokens_b'].abs().sum(
        ) > 0, i
    run_test_tool(RIS_TINY, ckpt, tmp_path / 'eval', opts)
