"""Every shipped config loads; the paper configs build (random weights) and
train one step on a small input."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_sera  # noqa: F401

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# the referring-segmentation configs (configs/spectralmoe/ holds semantic
# segmentation models: tests/test_configs_spectralmoe.py)
CONFIGS = sorted(
    f for f in glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                         recursive=True)
    if '/_base_/' not in f and '/spectralmoe/' not in f)
PAPER = osp.join(REPO, 'configs', 'sera',
                 'sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py')
ABLATION = osp.join(REPO, 'configs', 'sera', 'ablation')


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_loads(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmseg'
    assert 'mmseg_sera' in cfg.custom_imports['imports']
    assert cfg.model.type == 'ReferringEncoderDecoder'
    assert cfg.train_dataloader.dataset.type in ('RefCocoDataset',
                                                 'PhraseCutDataset',
                                                 'GRefCocoDataset')
    assert cfg.val_evaluator.type == 'ReferSegMetric'


def _build(path):
    init_default_scope('mmseg')
    cfg = Config.fromfile(path)
    # Pretrained files are not needed to build; init_weights is not run.
    return MODELS.build(cfg.model)


def _batch(model, size=112):
    torch.manual_seed(0)
    samples = []
    for text in ('the man on the left', 'a red umbrella'):
        s = SegDataSample(metainfo=dict(text=text, ori_shape=(size, size),
                                        img_shape=(size, size),
                                        pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 2, (1, size, size), dtype=torch.uint8))
        samples.append(s)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
              for _ in samples]
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples),
                                   training=True)


def test_paper_model_trains_under_one_percent_of_the_backbone():
    model = _build(PAPER).train()
    backbone = model.backbone
    own = [(n, p) for n, p in backbone.named_parameters()
           if not n.startswith('adapters.')]
    share = sum(p.numel() for _, p in own if p.requires_grad) / sum(
        p.numel() for _, p in own)
    print(f'paper config: backbone trainable share {100 * share:.3f}%')
    assert 0 < share < 0.01
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    # the frozen parts stay in eval mode in training
    assert not backbone.blocks[0].training
    assert not model.text_encoder.training

    data = _batch(model)
    losses = model(**data, mode='loss')
    assert {'loss_mask', 'loss_dice', 'loss_moe_z', 'loss_moe_balance',
            'loss_moe_token'} <= set(losses)
    total = sum(v for k, v in losses.items() if k.startswith('loss_'))
    assert torch.isfinite(total)
    total.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith('backbone.adapters.') for n in grads)
    assert any(n.startswith('neck.experts.') for n in grads)
    assert not any(n.startswith('text_encoder.') for n in grads)


@pytest.mark.parametrize('name,adapters,experts,top_k', [
    ('sera-baseline_dinov2-b14', 0, 0, None),
    ('sera-adapter_dinov2-b14', 4, 0, None),
    ('sera-top1_dinov2-b14', 4, 4, 1),
    ('sera-baseline_dinov2-tiny', 0, 0, None),
    ('sera-adapter_dinov2-tiny', 2, 0, None),
    ('sera-text-blind_dinov2-tiny', 2, 4, 4),
    ('sera-laplace_dinov2-tiny', 2, 4, 4),
    ('sera-routed_dinov2-tiny', 2, 4, 4),
])
def test_ablation_models(name, adapters, experts, top_k):
    path, = glob.glob(osp.join(ABLATION, name + '*.py'))
    model = _build(path)
    assert len(model.backbone.adapters) == adapters
    assert len(model.neck.experts) == experts
    if top_k is not None:
        assert model.neck.top_k == top_k
    losses = model(**_batch(model), mode='loss')
    has_moe = any(k.startswith('loss_moe') for k in losses)
    assert has_moe == bool(experts)
    assert ('loss_adapter_balance' in losses) == ('routed' in name)


def test_text_blind_control_gives_every_sample_one_sentence():
    path, = glob.glob(osp.join(ABLATION, 'sera-text-blind_*.py'))
    cfg = Config.fromfile(path)
    full = Config.fromfile(osp.join(
        REPO, 'configs', 'sera',
        'sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py'))
    for split in ('train', 'val', 'test'):
        steps = cfg[f'{split}_dataloader'].dataset.pipeline
        select = [t for t in steps if t['type'] == 'SelectSentence']
        assert len(select) == 1 and select[0]['fixed_text'] == 'the shape'
        # otherwise the pipeline is the full model's
        ref = full[f'{split}_dataloader'].dataset.pipeline
        assert [t['type'] for t in steps] == [t['type'] for t in ref]
    assert cfg.model == full.model
    assert cfg.train_cfg == full.train_cfg


def test_laplace_router_ablation_changes_only_the_router_logits():
    path, = glob.glob(osp.join(ABLATION, 'sera-laplace_*.py'))
    cfg = Config.fromfile(path)
    full = Config.fromfile(osp.join(
        REPO, 'configs', 'sera',
        'sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py'))
    assert cfg.model.neck.pop('logit_fn') == 'laplace'
    assert cfg.model == full.model
    assert _build(path).neck.router.logit_fn == 'laplace'


def test_routed_ablation_changes_only_the_routing_recipe():
    path, = glob.glob(osp.join(ABLATION, 'sera-routed_*.py'))
    cfg = Config.fromfile(path)
    full = Config.fromfile(osp.join(
        REPO, 'configs', 'sera',
        'sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py'))
    assert cfg.model.backbone.adapter_cfg.pop('balance_weight') == 0.1
    assert cfg.model == full.model
    assert cfg.optim_wrapper.pop('paramwise_cfg') == dict(
        custom_keys={'.router.': dict(lr_mult=10.0)})
    assert cfg.optim_wrapper == full.optim_wrapper
    # the multiplier reaches every router parameter and nothing else
    from mmengine.optim import build_optim_wrapper
    model = _build(path)
    wrapper = build_optim_wrapper(model, Config.fromfile(path).optim_wrapper)
    lr = {id(p): g['lr'] for g in wrapper.optimizer.param_groups
          for p in g['params']}
    routers = {n for n, _ in model.named_parameters() if '.router.' in n}
    assert any(n.startswith('neck.router.') for n in routers)
    assert any(n.startswith('backbone.adapters.') for n in routers)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert lr[id(p)] == pytest.approx(1e-2 if n in routers else 1e-3)
