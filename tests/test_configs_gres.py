"""The generalized referring segmentation configs (configs/gres/): each is
its method's config with the head's no-target scorer and the gRefCOCO /
generalized synthetic data and GRES metric; the data parts of
configs/_base_/gres.py equal the dataset configs; the tiny SERA config
trains 2 iterations through tools/train.py and evaluates through
tools/test.py, the other tiny ones take a training step and a test step
scored by the metric."""
import glob
import json
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.runner import Runner

from mmseg.registry import MODELS
from mmseg_sera.evaluation import ReferSegMetric
from .conftest import REPO, run_test_tool, run_tool, tiny_cfg_options

GRES = osp.join(REPO, 'configs', 'gres')
TINY = 'dinov2-tiny_clip-tiny_1xb16-50e_synthetic'
# GRES config -> (the method's own config, head type)
METHODS = {
    f'sera_{TINY}-grefer-112x112.py':
    (f'sera/sera_{TINY}-112x112.py', 'ReferHead'),
    f'etris_{TINY}-grefer-112x112.py':
    (f'etris/etris_{TINY}-112x112.py', 'CRISHead'),
    f'detris_{TINY}-grefer-112x112.py':
    (f'detris/detris_{TINY}-112x112.py', 'CRISHead'),
    f'segvlm_{TINY}-grefer-112x112.py':
    (f'segvlm/segvlm_{TINY}-112x112.py', 'ReferHead'),
    f'spectralmoe-ris_{TINY}-grefer-112x112.py':
    (f'spectralmoe/spectralmoe-ris_{TINY}-112x112.py', 'ReferHead'),
    # the control: one fixed sentence for every sample
    f'sera-text-blind_{TINY}-grefer-112x112.py':
    (f'sera/ablation/sera-text-blind_{TINY}-112x112.py', 'ReferHead'),
    'sera_dinov2-b14-reg4_clip-b16_1xb16-50e_grefcoco-448x448.py':
    ('sera/sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py',
     'ReferHead'),
    'detris_dinov2-b14-reg4_clip-b16_1xb32-65e_grefcoco-448x448.py':
    ('detris/detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py',
     'CRISHead'),
    'etris_clip-vit-b16_1xb32-50e_grefcoco-416x416.py':
    ('etris/etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py', 'CRISHead'),
}
TINY_GRES = sorted(k for k in METHODS if 'synthetic' in k)
SERA_TINY = f'sera_{TINY}-grefer-112x112.py'
PAPER_GRES = sorted(k for k in METHODS if 'grefcoco' in k)
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
DATASET_KEYS = ('type', 'data_root', 'dataset', 'split_by', 'data_prefix',
                'sentence_sampling')


def _cfg(name: str) -> Config:
    return Config.fromfile(osp.join(GRES, name))


def _method(name: str) -> Config:
    return Config.fromfile(osp.join(REPO, 'configs', METHODS[name][0]))


def test_the_configs_are_there():
    assert sorted(osp.basename(p) for p in glob.glob(
        osp.join(GRES, '*.py'))) == sorted(METHODS)


@pytest.mark.parametrize('name', sorted(METHODS))
def test_method_config_plus_no_target_and_gres_data(name):
    """Model, recipe and pipelines of the method's own config; the head
    adds ``no_target_cfg``; the datasets become GRefCocoDataset (one item
    per sentence) and the metric the GRES protocol."""
    cfg, ref = _cfg(name), _method(name)
    model, ref_model = cfg.model.to_dict(), ref.model.to_dict()
    no_target = model['decode_head'].pop('no_target_cfg')
    assert no_target == (dict(hidden_channels=64) if 'synthetic' in name
                         else dict())
    assert 'no_target_cfg' not in ref_model['decode_head']
    assert model == ref_model
    assert model['decode_head']['type'] == METHODS[name][1]
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'randomness'):
        assert cfg.get(key) == ref.get(key), key
    # the best checkpoint is the one with the best gIoU
    hooks, ref_hooks = cfg.default_hooks.to_dict(), \
        ref.default_hooks.to_dict()
    assert hooks['checkpoint'].pop('save_best') == 'gIoU'
    assert ref_hooks['checkpoint'].pop('save_best') == 'mIoU'
    assert hooks == ref_hooks
    for loader in LOADERS:
        got, want = cfg[loader].to_dict(), ref[loader].to_dict()
        ds, ref_ds = got.pop('dataset'), want.pop('dataset')
        assert got == want, loader  # batch size, workers, sampler
        assert ds['pipeline'] == ref_ds['pipeline'], loader
        assert ds['split'] == ref_ds['split'], loader
        assert ds['type'] == 'GRefCocoDataset'
        assert ds['sentence_sampling'] == 'all'
    for key in ('val_evaluator', 'test_evaluator'):
        assert cfg[key].type == 'ReferSegMetric'
        assert cfg[key].protocol == 'gres'


@pytest.mark.parametrize('name,dataset_cfg', [
    (SERA_TINY, 'synthetic_grefer.py'),
    ('sera_dinov2-b14-reg4_clip-b16_1xb16-50e_grefcoco-448x448.py',
     'grefcoco.py'),
    ('etris_clip-vit-b16_1xb32-50e_grefcoco-416x416.py', 'grefcoco.py'),
])
def test_data_parts_equal_the_dataset_configs(name, dataset_cfg):
    """configs/_base_/gres.py restates the dataset configs' GRES fields
    (two bases may not both define the loaders): they must agree."""
    cfg = _cfg(name)
    ref = Config.fromfile(
        osp.join(REPO, 'configs', '_base_', 'datasets', dataset_cfg))
    for loader in LOADERS:
        got, want = cfg[loader].dataset, ref[loader].dataset
        for key in DATASET_KEYS:
            assert got[key] == want[key], (loader, key)
    assert cfg.val_evaluator == ref.val_evaluator
    assert cfg.test_evaluator == ref.test_evaluator


def test_text_blind_control_sees_one_sentence():
    """The control's pipelines give every sample 'the shape'; all else is
    the tiny SERA GRES config."""
    blind, full = _cfg(f'sera-text-blind_{TINY}-grefer-112x112.py'), \
        _cfg(SERA_TINY)
    for loader in LOADERS:
        select, = [t for t in blind[loader].dataset.pipeline
                   if t['type'] == 'SelectSentence']
        assert select['fixed_text'] == 'the shape'
        want = full[loader].to_dict()
        got = blind[loader].to_dict()
        got['dataset'].pop('pipeline'), want['dataset'].pop('pipeline')
        assert got == want
    assert blind.model == full.model
    assert blind.test_evaluator == full.test_evaluator


@pytest.mark.parametrize('name', PAPER_GRES)
def test_paper_heads_have_the_scorer(name):
    """The paper-scale heads (built alone: the towers are tested with the
    RefCOCO configs) carry a scorer of hidden width 256 on their input
    width and the pooled sentence width."""
    init_default_scope('mmseg')
    head = MODELS.build(_cfg(name).model.decode_head)
    assert type(head).__name__ == METHODS[name][1]
    assert head.predicts_no_target and head.no_target_threshold == 0.5
    first = head.no_target.mlp[0]
    assert first.out_features == 256
    assert first.in_features == 2 * head.in_channels + head.pooled_dims


@pytest.fixture(scope='module')
def grefer_root(tmp_path_factory) -> str:
    from mmseg_sera.datasets.synthetic_gres import generate_grefer_set
    root = str(tmp_path_factory.mktemp('synthetic_grefer'))
    generate_grefer_set(root, num_images=16, seed=0, progress=False)
    return root


def _short(**extra) -> dict:
    return dict({'train_cfg.max_epochs': 1,
                 'train_dataloader.dataset.indices': 16,
                 'test_dataloader.dataset.indices': 8,
                 'test_dataloader.batch_size': 8}, **extra)


def test_tiny_sera_trains_and_tests_through_the_tools(grefer_root, tmp_path):
    """2 iterations (16 sentences, batch 8) through tools/train.py with
    ``loss_no_target`` logged, then tools/test.py: GRES scores and the
    per-expression flags in --out."""
    path = osp.join(GRES, SERA_TINY)
    work_dir = str(tmp_path / 'train')
    run_tool(['tools/train.py', path, '--work-dir', work_dir] +
             tiny_cfg_options(grefer_root, **_short()))
    rows = []
    for log in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                  'scalars.json')):
        with open(log) as f:
            rows += [json.loads(line) for line in f]
    losses = [r for r in rows if 'loss' in r]
    assert len(losses) == 2
    for row in losses:
        assert math.isfinite(row['loss_no_target'])
        assert row['loss_no_target'] > 0
        assert 0 <= row['acc_no_target'] <= 100
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    out = tmp_path / 'out'
    metrics = run_test_tool(
        path, ckpt, tmp_path / 'eval',
        tiny_cfg_options(grefer_root, **_short()) + ['--out', str(out)],
        keys=('gIoU', 'cIoU', 'N-acc', 'T-acc', 'Pr@0.7'))
    with open(out / 'per_expression.json') as f:
        records = json.load(f)
    assert len(records) == 8
    assert all(isinstance(r['pred_no_target'], bool) for r in records)
    assert all(isinstance(r['no_target'], bool) for r in records)
    # the logged N-acc is what the records say
    nt = [r for r in records if r['no_target']]
    if nt:
        n_acc = 100.0 * sum(r['pred_no_target'] for r in nt) / len(nt)
        assert metrics['N-acc'] == pytest.approx(n_acc)


@pytest.mark.parametrize('name', [n for n in TINY_GRES
                                  if not n.startswith('sera')])
def test_tiny_model_steps_and_is_scored(grefer_root, name):
    """One training step (``loss_no_target`` among the losses, finite, a
    gradient on the scorer) and one test step whose outputs carry
    ``pred_no_target``, scored by the config's metric."""
    cfg = _cfg(name)
    with DefaultScope.overwrite_default_scope('mmseg'):
        loader = cfg.train_dataloader.copy()
        loader.update(num_workers=0, persistent_workers=False, batch_size=4)
        loader.dataset.update(data_root=grefer_root)
        batch = next(iter(Runner.build_dataloader(loader, seed=0)))
        test_loader = cfg.test_dataloader.copy()
        test_loader.update(num_workers=0, persistent_workers=False,
                           batch_size=6)
        test_loader.dataset.update(data_root=grefer_root)
        test_batch = next(iter(Runner.build_dataloader(test_loader, seed=0)))
        init_default_scope('mmseg')
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    assert type(model.decode_head).__name__ == METHODS[name][1]
    assert model.decode_head.predicts_no_target
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    assert math.isfinite(losses['loss_no_target'].item())
    sum(v for k, v in losses.items() if k.startswith('loss')).backward()
    assert all(p.grad is not None
               for p in model.decode_head.no_target.parameters())
    model.eval()
    with torch.no_grad():
        outputs = model.test_step(test_batch)
    assert all(isinstance(o.pred_no_target, bool) for o in outputs)
    metric = ReferSegMetric(**{k: v for k, v in cfg.test_evaluator.items()
                               if k != 'type'})
    metric.process({}, [o.to_dict() for o in outputs])
    scores = metric.compute_metrics(metric.results)
    for key in ('gIoU', 'cIoU', 'N-acc', 'T-acc'):
        assert 0.0 <= scores[key] <= 100.0, key
