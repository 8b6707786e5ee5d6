"""The peer configs: DETRIS-B (configs/detris/), ETRIS ViT-B/16
(configs/etris/), the tiny DETRIS and ETRIS and the hybrid for the
synthetic set (configs/hybrid/).

Each builds (random weights, no checkpoint read); DETRIS-B's and ETRIS's
trainable parameters equal the authors' counts part by part (PEERS.md 3.7,
2.5); the RefCOCO+ / G-Ref variants inherit the right schedule and
word_len; the tiny configs share SERA's demo towers and recipe, and train
for a few iterations through tools/train.py and evaluate through
tools/test.py."""
import glob
import importlib.util
import json
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import PixelData

from mmseg.structures import SegDataSample

from .conftest import (REPO, TINY_CONFIG, run_test_tool, run_tool,
                       tiny_cfg_options)

DETRIS_DIR = osp.join(REPO, 'configs', 'detris')
ETRIS_DIR = osp.join(REPO, 'configs', 'etris')
HYBRID_DIR = osp.join(REPO, 'configs', 'hybrid')
NEW_CONFIGS = sorted(
    glob.glob(osp.join(DETRIS_DIR, '*.py')) +
    glob.glob(osp.join(ETRIS_DIR, '*.py')) +
    glob.glob(osp.join(HYBRID_DIR, '*.py')))
_B = 'detris_dinov2-b14-reg4_clip-b16_1xb32-'
DETRIS_B = {
    'refcoco': osp.join(DETRIS_DIR, _B + '65e_refcoco-448x448.py'),
    'refcoco+': osp.join(DETRIS_DIR, _B + '65e_refcoco+-448x448.py'),
    'refcocog-umd': osp.join(DETRIS_DIR, _B + '65e_refcocog-umd-448x448.py'),
    'refcocog-google': osp.join(DETRIS_DIR,
                                _B + '50e_refcocog-google-448x448.py'),
}
DETRIS_TINY = osp.join(
    DETRIS_DIR, 'detris_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
HYBRID_TINY = osp.join(
    HYBRID_DIR, 'detris-da_sera-fusion_dinov2-tiny_clip-tiny_1xb16-50e_'
    'synthetic-112x112.py')
DETRIS_BLOCKS = (1, 3, 5, 7, 9, 11)
_E = 'clip-vit-b16_1xb32-50e_'
ETRIS_B = {
    'refcoco': osp.join(ETRIS_DIR, 'etris_' + _E + 'refcoco-416x416.py'),
    'refcoco-d128': osp.join(ETRIS_DIR,
                             'etris-d128_' + _E + 'refcoco-416x416.py'),
    'refcoco+': osp.join(ETRIS_DIR, 'etris_' + _E + 'refcoco+-416x416.py'),
    'refcocog-umd': osp.join(ETRIS_DIR,
                             'etris_' + _E + 'refcocog-umd-416x416.py'),
    'refcocog-google': osp.join(ETRIS_DIR,
                                'etris_' + _E + 'refcocog-google-416x416.py'),
}
ETRIS_TINY = osp.join(
    ETRIS_DIR, 'etris_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
ETRIS_BLOCKS = (3, 7, 11)
CLIP_CKPT = 'checkpoints/open_clip_vit_b16.bin'


def _count_params_module():
    path = osp.join(REPO, 'tools', 'analysis_tools', 'count_params.py')
    spec = importlib.util.spec_from_file_location('_tool_count_params',
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def cp():
    return _count_params_module()


@pytest.fixture(scope='module')
def detris_b(cp):
    """The RefCOCO DETRIS-B model, random weights."""
    return cp.build_model(DETRIS_B['refcoco'])


def test_the_new_configs_are_there():
    assert set(DETRIS_B.values()) | {DETRIS_TINY, HYBRID_TINY} <= set(
        NEW_CONFIGS)
    assert set(ETRIS_B.values()) | {ETRIS_TINY} == set(
        glob.glob(osp.join(ETRIS_DIR, '*.py')))


@pytest.mark.parametrize('path', NEW_CONFIGS, ids=osp.basename)
def test_config_builds(cp, path):
    cfg = Config.fromfile(path)
    assert cfg.model.type == 'ReferringEncoderDecoder'
    assert cfg.train_dataloader.dataset.type == 'RefCocoDataset'
    model = cp.build_model(path)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------
# DETRIS-B
# --------------------------------------------------------------------------
def test_detris_b_model(detris_b):
    """The peer-faithful model of PEERS.md 6: towers, slots, neck, head."""
    m = detris_b
    bb = m.backbone
    assert bb.num_register_tokens == 4 and bb.pos_grid == 37
    assert bb.out_indices == (4, 8, 11) and bb.out_norm == 'last'
    assert bb.pos_resampling.tolist() == [1000, 0]  # offset 0.1, no AA
    assert bb.trainable == 'frozen'
    assert bb.adapters.indices('parallel_mlp') == DETRIS_BLOCKS
    da = bb.adapters.adapter('parallel_mlp', 1)
    assert type(da).__name__ == 'DETRISDenseAligner'
    assert da.hidden_dims == 128 and da.embed_dims == 768
    te = m.text_encoder
    assert te.context_length == 17
    assert te.adapters.indices('parallel_mlp_text') == DETRIS_BLOCKS
    assert type(m.neck).__name__ == 'HierarchicalAlignNeck'
    assert m.neck.in_channels == [768, 768, 768]
    assert m.neck.coord_residual
    head = m.decode_head
    assert type(head).__name__ == 'CRISHead'
    assert head.threshold == 0.35 and head.loss_at == 'logits'
    loss = head.loss_decode  # one loss: the plain BCE
    assert type(loss).__name__ == 'CrossEntropyLoss' and loss.use_sigmoid
    # CLIP mean / std (RGB), also for DINOv2
    mean = m.data_preprocessor.mean.flatten().tolist()
    assert mean == pytest.approx([122.7709383, 116.7460125, 104.09373615])


def _soft_target_step(model, size: int) -> set:
    """One training step on two random samples of ``size`` px with soft
    targets: only ``loss_mask``, finite; returns the names of the
    parameters that got a gradient (then cleared)."""
    samples = []
    for text in ('the man on the left', 'a red umbrella'):
        shape = (size, size)
        s = SegDataSample(metainfo=dict(text=text, ori_shape=shape,
                                        img_shape=shape, pad_shape=shape))
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 2, (1, *shape), dtype=torch.uint8))
        s.set_field(PixelData(data=torch.rand(1, *shape)), 'gt_soft_mask')
        samples.append(s)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
              for _ in samples]
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples),
                                   training=True)
    losses = model(**data, mode='loss')
    assert set(k for k in losses if k.startswith('loss')) == {'loss_mask'}
    assert torch.isfinite(losses['loss_mask'])
    losses['loss_mask'].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_detris_b_trains_only_its_adapters_neck_and_head(detris_b):
    """One step at 112 px with soft targets: finite loss; gradients reach
    the adapters, the neck and the head, never the frozen towers."""
    torch.manual_seed(0)
    model = detris_b.train()
    grads = _soft_target_step(model, 112)
    frozen = [n for n in grads if n.startswith(('backbone.', 'text_encoder.'))
              and '.adapters.' not in n]
    assert frozen == []
    for prefix in ('backbone.adapters.', 'text_encoder.adapters.', 'neck.',
                   'decode_head.decoder.', 'decode_head.projector.'):
        assert any(n.startswith(prefix) for n in grads), prefix


# the authors' trainable counts (PEERS.md 3.3, 3.5, 1.3-1.5, 3.7)
DETRIS_B_COUNTS = [
    ('adapters.backbone.parallel_mlp', 6, 382_896),
    ('adapters.text_encoder.parallel_mlp_text', 6, 69_720),
    ('head.decoder', 1, 7_899_136),
    ('head.projector', 1, 4_788_737),
]


@pytest.mark.parametrize('sub,modules,each', DETRIS_B_COUNTS,
                         ids=[c[0] for c in DETRIS_B_COUNTS])
def test_detris_b_component_count(cp, detris_b, sub, modules, each):
    counts = cp.count_parameters(detris_b)
    row = counts['subparts'][sub]
    assert row['modules'] == modules
    assert row['total'] == row['trainable'] == modules * each


def test_detris_b_neck_and_total_count(cp, detris_b):
    counts = cp.count_parameters(detris_b)
    parts = counts['parts']
    assert parts['neck']['trainable'] == parts['neck']['total'] == 10_114_560
    assert parts['adapters']['trainable'] == 2_297_376 + 418_320
    assert parts['head']['trainable'] == 7_899_136 + 4_788_737
    assert parts['backbone']['trainable'] == 0
    assert parts['text_encoder']['trainable'] == 0
    assert counts['total']['trainable'] == 25_518_129
    # the sub-parts add up to their parts
    sub = counts['subparts']
    assert sum(r['total'] for k, r in sub.items()
               if k.startswith('neck.')) == parts['neck']['total']
    assert sum(r['total'] for k, r in sub.items()
               if k.startswith('head.')) == parts['head']['total']
    assert sum(r['total'] for k, r in sub.items()
               if k.startswith('adapters.')) == parts['adapters']['total']
    table = cp.format_table(counts)
    assert 'head.decoder' in table and '7,899,136' in table


def test_count_params_cli_reports_subparts(cp, tmp_path, capsys):
    out = tmp_path / 'detris.json'
    cp.main([DETRIS_B['refcoco'], '--json', str(out)])
    with open(out) as f:
        saved = json.load(f)
    assert saved['total']['trainable'] == 25_518_129
    assert saved['subparts']['head.projector']['trainable'] == 4_788_737
    assert 'head.projector' in capsys.readouterr().out


@pytest.mark.parametrize('name,epochs,milestones,word_len,dataset', [
    ('refcoco', 65, [35, 55], 17, ('refcoco', 'unc')),
    ('refcoco+', 65, [35, 55], 17, ('refcoco+', 'unc')),
    ('refcocog-umd', 65, [35, 55], 22, ('refcocog', 'umd')),
    ('refcocog-google', 50, [35], 17, ('refcocog', 'google')),
])
def test_detris_b_schedule_and_word_len(name, epochs, milestones, word_len,
                                        dataset):
    """DETRIS's own schedules (PEERS.md 1.1): Adam 1e-4 without weight
    decay, MultiStepLR x0.1, batch 32, 448 letterbox with soft targets and
    no flip, seed 0."""
    cfg = Config.fromfile(DETRIS_B[name])
    assert cfg.train_cfg.max_epochs == epochs
    sched, = cfg.param_scheduler
    assert sched.type == 'MultiStepLR' and sched.gamma == 0.1
    assert sched.milestones == milestones and sched.end == epochs
    assert cfg.model.text_encoder.context_length == word_len
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('Adam', 1e-4, 0.0)
    assert cfg.optim_wrapper.get('clip_grad') is None
    assert cfg.train_dataloader.batch_size == 32
    assert cfg.randomness.seed == 0
    for split in ('train', 'val', 'test'):
        ds = cfg[f'{split}_dataloader'].dataset
        assert (ds.dataset, ds.split_by) == dataset
    steps = cfg.train_dataloader.dataset.pipeline
    types = [t['type'] for t in steps]
    assert 'RandomReferFlip' not in types
    assert 'PhotoMetricDistortion' not in types
    resize, = [t for t in steps if t['type'] == 'ReferResizePad']
    assert resize['size'] == (448, 448)
    assert resize['mask_interp'] == 'bilinear'
    assert resize['pad_val'] == pytest.approx((104.09, 116.75, 122.77))


# --------------------------------------------------------------------------
# ETRIS ViT-B/16
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def etris_b(cp):
    """The RefCOCO ETRIS ViT-B/16 model (d = 64, as released), random
    weights."""
    return cp.build_model(ETRIS_B['refcoco'])


@pytest.fixture(scope='module')
def etris_d128(cp):
    """The paper-width ETRIS (d = 128), random weights."""
    return cp.build_model(ETRIS_B['refcoco-d128'])


def test_etris_b_model(etris_b):
    """PEERS.md 2 and 1.1: towers, bridge, levels, neck, head, inputs."""
    m = etris_b
    assert m.bridge_mode
    bb = m.backbone
    assert type(bb).__name__ == 'CLIPViT' and bb.model_name == 'ViT-B-16'
    assert bb.pos_grid == (26, 26) and bb.patch_size == (16, 16)
    assert bb.out_indices == ETRIS_BLOCKS and bb.out_norm == 'last'
    assert bb.out_proj and bb.out_channels == (768, 768, 512)
    assert bb.trainable == 'frozen' and bb.train_pos_embed
    assert bb.pretrained == CLIP_CKPT
    assert bb.adapters.indices('bridge') == ETRIS_BLOCKS
    assert bb.adapters.indices('post_block') == ()
    assert bb.adapters.indices('parallel_mlp') == ()
    bridge = bb.adapters.bridge_adapter
    assert type(bridge).__name__ == 'ETRISBridger'
    assert (bridge.embed_dims, bridge.text_dims, bridge.hidden_dims) == \
        (768, 512, 64)
    assert bridge.stages[0].attn_v.num_heads == 8
    assert not bridge.zero_init_out and not bridge.key_padding
    te = m.text_encoder
    assert te.context_length == 17 and len(te.blocks) == 12
    assert te.trainable == 'frozen' and te.train_pos_embed
    assert te.pretrained == CLIP_CKPT
    # QuickGELU in both towers (OpenAI weights)
    for tower in (bb, te):
        act = tower.blocks[0].mlp.gelu
        assert type(act).__name__ == 'QuickGELU'
    assert type(m.neck).__name__ == 'HierarchicalAlignNeck'
    assert m.neck.in_channels == [768, 768, 512]
    assert not m.neck.coord_residual
    head = m.decode_head
    assert type(head).__name__ == 'CRISHead'
    assert head.threshold == 0.35 and head.loss_at == 'logits'
    loss = head.loss_decode
    assert type(loss).__name__ == 'CrossEntropyLoss' and loss.use_sigmoid
    pre = m.data_preprocessor
    assert pre.mean.flatten().tolist() == pytest.approx(
        [122.7709383, 116.7460125, 104.09373615])
    assert pre.std.flatten().tolist() == pytest.approx(
        [68.5005327, 66.6321579, 70.32316305])
    assert pre.size_divisor == 16 and pre.test_cfg['size_divisor'] == 16


def test_etris_b_trains_only_bridge_position_tables_neck_and_head(etris_b):
    """The trainable set is the Bridger, the two position tables, the neck
    and the head (nothing else of the towers); one step at 128 px (8 x 8
    patches, table resampled) with soft targets reaches all of them."""
    model = etris_b.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = {n for n in trainable
             if n.startswith(('backbone.', 'text_encoder.'))
             and '.adapters.' not in n}
    assert tower == {'backbone.positional_embedding',
                     'text_encoder.positional_embedding'}
    torch.manual_seed(0)
    grads = _soft_target_step(model, 128)
    assert grads <= trainable
    assert tower <= grads
    for prefix in ('backbone.adapters.bridge.stages.0.',
                   'backbone.adapters.bridge.stages.2.',
                   'backbone.adapters.bridge.norms_t.', 'neck.',
                   'decode_head.decoder.', 'decode_head.projector.'):
        assert any(n.startswith(prefix) for n in grads), prefix


# the authors' trainable counts (PEERS.md 2.5, 1.3-1.5)
ETRIS_VIS_POS = 519_936  # (26^2 + 1) x 768
ETRIS_TEXT_POS = 39_424  # 77 x 512
ETRIS_NECK = 9_983_488
ETRIS_DECODER = 7_899_136
ETRIS_PROJECTOR = 4_788_737
ETRIS_COUNTS = {64: (598_592, 23_829_313), 128: (1_387_648, 24_618_369)}


def test_etris_d128_total_is_the_d64_total_with_the_wider_bridger():
    (b64, t64), (b128, t128) = ETRIS_COUNTS[64], ETRIS_COUNTS[128]
    rest = (ETRIS_VIS_POS + ETRIS_TEXT_POS + ETRIS_NECK + ETRIS_DECODER +
            ETRIS_PROJECTOR)
    assert rest == 23_230_721
    assert t64 == b64 + rest and t128 == b128 + rest
    assert t128 == t64 - b64 + b128


@pytest.mark.parametrize('d', [64, 128], ids=['d64', 'd128'])
def test_etris_component_counts(cp, etris_b, etris_d128, d):
    """count_params per component: the Bridger (one module spanning its
    three stages), the position tables (the backbone's and the text
    encoder's own trainable parameters), neck, decoder, projector, total;
    the frozen towers are CLIP ViT-B/16's."""
    model = etris_b if d == 64 else etris_d128
    bridger, total = ETRIS_COUNTS[d]
    counts = cp.count_parameters(model)
    parts, sub = counts['parts'], counts['subparts']
    row = sub['adapters.backbone.bridge']
    assert row['modules'] == 1
    assert row['total'] == row['trainable'] == bridger
    assert parts['adapters']['total'] == parts['adapters']['trainable'] == \
        bridger
    assert parts['backbone']['trainable'] == ETRIS_VIS_POS
    assert parts['text_encoder']['trainable'] == ETRIS_TEXT_POS
    assert parts['neck']['total'] == parts['neck']['trainable'] == ETRIS_NECK
    for name, n in (('head.decoder', ETRIS_DECODER),
                    ('head.projector', ETRIS_PROJECTOR)):
        assert sub[name]['total'] == sub[name]['trainable'] == n, name
    assert parts['head']['trainable'] == ETRIS_DECODER + ETRIS_PROJECTOR
    assert parts['other']['total'] == 0
    assert counts['total']['trainable'] == total
    # frozen CLIP ViT-B/16 towers (the image table sized for 26 x 26)
    assert parts['backbone']['total'] == 86_192_640 + ETRIS_VIS_POS - 151_296
    assert parts['text_encoder']['total'] == 63_428_096  # with the proj
    assert sum(r['total'] for k, r in sub.items()
               if k.startswith('neck.')) == parts['neck']['total']
    table = cp.format_table(counts)
    assert 'adapters.backbone.bridge' in table and f'{bridger:,}' in table


@pytest.mark.parametrize('name,word_len,dataset,hidden', [
    ('refcoco', 17, ('refcoco', 'unc'), 64),
    ('refcoco-d128', 17, ('refcoco', 'unc'), 128),
    ('refcoco+', 17, ('refcoco+', 'unc'), 64),
    ('refcocog-umd', 22, ('refcocog', 'umd'), 64),
    ('refcocog-google', 22, ('refcocog', 'google'), 64),
])
def test_etris_schedule_and_word_len(name, word_len, dataset, hidden):
    """ETRIS's recipe (PEERS.md 1.1): Adam 1e-4 without weight decay,
    x0.1 at epoch 35 of 50 on every dataset, batch 32, seed 0, word_len
    17 (22 for both G-Ref partitions), 416 letterbox in training and
    testing, soft targets, no flip or colour jitter."""
    cfg = Config.fromfile(ETRIS_B[name])
    assert cfg.train_cfg.max_epochs == 50
    sched, = cfg.param_scheduler
    assert sched.type == 'MultiStepLR' and sched.gamma == 0.1
    assert sched.milestones == [35] and sched.end == 50 and sched.by_epoch
    assert cfg.model.text_encoder.context_length == word_len
    bridge, = cfg.model.backbone.adapters
    assert bridge.type == 'ETRISBridger' and bridge.hidden_dims == hidden
    assert tuple(bridge.insert) == ETRIS_BLOCKS and bridge.num_heads == 8
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('Adam', 1e-4, 0.0)
    assert cfg.optim_wrapper.get('clip_grad') is None
    assert cfg.train_dataloader.batch_size == 32
    assert cfg.randomness.seed == 0
    for split in ('train', 'val', 'test'):
        ds = cfg[f'{split}_dataloader'].dataset
        assert (ds.dataset, ds.split_by) == dataset
        steps = ds.pipeline
        types = [t['type'] for t in steps]
        assert 'RandomReferFlip' not in types
        assert 'PhotoMetricDistortion' not in types
        resize, = [t for t in steps if t['type'] == 'ReferResizePad']
        assert resize['size'] == (416, 416), split
        assert resize['pad_val'] == pytest.approx((104.09, 116.75, 122.77))
        assert resize.get('mask_interp', 'nearest') == (
            'bilinear' if split == 'train' else 'nearest')
    assert cfg.test_dataloader.dataset.sentence_sampling == 'all'


def test_count_params_cli_reports_the_bridge(cp, tmp_path, capsys):
    out = tmp_path / 'etris.json'
    cp.main([ETRIS_B['refcoco'], '--json', str(out)])
    with open(out) as f:
        saved = json.load(f)
    assert saved['total']['trainable'] == 23_829_313
    assert saved['subparts']['adapters.backbone.bridge']['trainable'] == \
        598_592
    assert saved['parts']['backbone']['trainable'] == ETRIS_VIS_POS
    assert 'adapters.backbone.bridge' in capsys.readouterr().out


# --------------------------------------------------------------------------
# tiny DETRIS and the hybrid: SERA's demo towers and recipe
# --------------------------------------------------------------------------
def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


_DA = dict(type='DETRISDenseAligner', insert=(1, 3), scale=0.2,
           hidden_dims=32)
_BRIDGE = dict(type='ETRISBridger', insert=(1, 3), hidden_dims=32,
               num_heads=2, text_dims=64)


@pytest.mark.parametrize('path,adapter', [
    (DETRIS_TINY, _DA), (HYBRID_TINY, _DA), (ETRIS_TINY, _BRIDGE)
], ids=['detris-tiny', 'hybrid-tiny', 'etris-tiny'])
def test_tiny_configs_share_sera_demo_towers_and_recipe(path, adapter):
    cfg, sera = Config.fromfile(path), Config.fromfile(TINY_CONFIG)
    adapter_keys = ('adapters', 'adapter_indices', 'adapter_cfg')
    assert _without(cfg.model.backbone.to_dict(), *adapter_keys) == \
        _without(sera.model.backbone.to_dict(), *adapter_keys)
    assert _without(cfg.model.text_encoder.to_dict(), 'adapters') == \
        _without(sera.model.text_encoder.to_dict(), 'adapters')
    assert cfg.model.data_preprocessor == sera.model.data_preprocessor
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'train_dataloader', 'val_dataloader', 'test_dataloader',
                'randomness', 'default_hooks'):
        assert cfg[key] == sera[key], key
    assert cfg.model.decode_head.threshold == sera.model.decode_head.threshold
    assert cfg.model.backbone.adapter_indices == ()
    built, = cfg.model.backbone.adapters
    assert {k: built[k] for k in adapter} == adapter


def test_tiny_detris_and_hybrid_models(cp):
    detris = cp.build_model(DETRIS_TINY)
    assert detris.backbone.adapters.indices('parallel_mlp') == (1, 3)
    assert detris.backbone.adapters.indices('post_block') == ()
    assert detris.text_encoder.adapters.indices('parallel_mlp_text') == (1, )
    assert type(detris.neck).__name__ == 'HierarchicalAlignNeck'
    assert detris.neck.coord_residual
    assert type(detris.decode_head).__name__ == 'CRISHead'
    hybrid = cp.build_model(HYBRID_TINY)
    assert hybrid.backbone.adapters.indices('parallel_mlp') == (1, 3)
    assert hybrid.backbone.adapters.indices('post_block') == ()
    assert type(hybrid.neck).__name__ == 'SERAFusion'
    assert type(hybrid.decode_head).__name__ == 'ReferHead'


def test_tiny_etris_model(cp):
    """SERA's tiny towers with a two-stage Bridger after image blocks 1
    and 3; text block 0 runs after image block 1 and text block 1 after
    image block 3 (each before the stage there); ETRIS's neck (no coord
    residual) and CRISHead at the tiny DETRIS widths."""
    from mmseg_sera.models.backbones.slots import text_block_schedule
    m = cp.build_model(ETRIS_TINY)
    assert m.bridge_mode
    bb, te = m.backbone, m.text_encoder
    assert type(bb).__name__ == 'DINOv2' and len(bb.blocks) == 4
    assert len(te.blocks) == 2 and te.embed_dims == 64
    assert bb.adapters.indices('post_block') == ()
    assert bb.adapters.indices('parallel_mlp') == ()
    assert bb.adapters.indices('bridge') == (1, 3)
    bridge = bb.adapters.bridge_adapter
    assert type(bridge).__name__ == 'ETRISBridger'
    assert (bridge.embed_dims, bridge.text_dims, bridge.hidden_dims) == \
        (96, 64, 32)
    assert bridge.num_stages == 2 and not bridge.zero_init_out
    assert bridge.stages[0].attn_v.num_heads == 2
    assert text_block_schedule(len(bb.blocks), len(te.blocks)) == {
        1: (0, ),
        3: (1, )
    }
    assert type(m.neck).__name__ == 'HierarchicalAlignNeck'
    assert m.neck.in_channels == [96, 96, 96] and not m.neck.coord_residual
    head = m.decode_head
    assert type(head).__name__ == 'CRISHead' and head.threshold == 0.5
    # the CRIS parts have the tiny DETRIS widths
    detris = cp.build_model(DETRIS_TINY)
    counts = cp.count_parameters(m)['subparts']
    ref = cp.count_parameters(detris)['subparts']
    for sub in ('head.decoder', 'head.projector'):
        assert counts[sub] == ref[sub], sub
    assert counts['adapters.backbone.bridge']['modules'] == 1


def _scalars(work_dir: str) -> list:
    rows = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                   'scalars.json')):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    return rows


@pytest.mark.parametrize('path', [DETRIS_TINY, HYBRID_TINY, ETRIS_TINY],
                         ids=['detris-tiny', 'hybrid-tiny', 'etris-tiny'])
def test_tiny_config_trains_and_evaluates(synthetic_root, tmp_path, path):
    """A few iterations through tools/train.py (16 training items, batch
    8: two steps), then tools/test.py on 8 validation sentences."""
    work_dir = str(tmp_path / 'train')
    short = {'train_cfg.max_epochs': 1,
             'train_dataloader.dataset.indices': 16,
             'test_dataloader.dataset.indices': 8,
             'test_dataloader.batch_size': 8}
    run_tool(['tools/train.py', path, '--work-dir', work_dir] +
             tiny_cfg_options(synthetic_root, **short))
    losses = [r for r in _scalars(work_dir) if 'loss' in r]
    assert len(losses) == 2
    for row in losses:
        assert math.isfinite(row['loss']) and row['loss'] > 0
        assert all(math.isfinite(v) for k, v in row.items()
                   if k.startswith('loss'))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()

    run_test_tool(path, ckpt, tmp_path / 'eval',
                  tiny_cfg_options(synthetic_root, **short))
