"""Configs on DINOv3: SERA, DETRIS and SpectralMoE-RIS on B/16 and L/16
(RefCOCO, by inheritance from the DINOv2-B configs) and the tiny
DINOv3-style SERA for the synthetic demo.

The trainable parameter counts are those of
``tools/analysis_tools/count_params.py`` (docs/benchmarks.md); the tiny
config trains two steps through tools/train.py and evaluates through
tools/test.py."""
import glob
import importlib.util
import json
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmseg.registry import MODELS
from .conftest import REPO, run_test_tool, run_tool, tiny_cfg_options

SERA = osp.join(REPO, 'configs', 'sera')
B16 = osp.join(SERA, 'sera_dinov3-b16_clip-b16_1xb16-50e_refcoco-448x448.py')
L16 = osp.join(SERA, 'sera_dinov3-l16_clip-b16_1xb16-50e_refcoco-448x448.py')
DETRIS = osp.join(REPO, 'configs', 'detris',
                  'detris_dinov3-{}16_clip-b16_1xb32-65e_refcoco-448x448.py')
SMOE = osp.join(REPO, 'configs', 'spectralmoe',
                'spectralmoe-ris_dinov3-{}16_clip-b16_1xb16-50e_refcoco-'
                '448x448.py')
TINY = osp.join(SERA,
                'sera_dinov3-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')


@pytest.fixture(scope='module')
def cp():
    path = osp.join(REPO, 'tools', 'analysis_tools', 'count_params.py')
    spec = importlib.util.spec_from_file_location('_tool_count_params',
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('path, arch, width, out, adapters', [
    (B16, 'base', 768, (3, 7, 11), (2, 5, 8, 11)),
    (L16, 'large', 1024, (7, 15, 23), (5, 11, 17, 23)),
])
def test_refcoco_configs(path, arch, width, out, adapters):
    cfg = Config.fromfile(path)
    bb = cfg.model.backbone
    assert bb.type == 'DINOv3' and bb.arch == arch
    assert bb.trainable == 'ln_bias'
    assert tuple(bb.out_indices) == out
    assert tuple(bb.adapter_indices) == adapters
    assert bb.init_cfg.checkpoint.endswith(f'dinov3_vit{arch[0]}16_sera.pth')
    assert 'img_size' not in bb and 'interpolate_offset' not in bb
    assert cfg.model.neck.in_channels == [width] * 3
    assert cfg.model.data_preprocessor.size_divisor == 16
    assert cfg.model.data_preprocessor.mean[0] == pytest.approx(122.77, 1e-3)
    assert cfg.train_dataloader.dataset.type == 'RefCocoDataset'
    # 448 = 28 patches of 16 px
    assert any(t.get('size') == (448, 448) for t in cfg.train_pipeline)


def test_b16_counts(cp):
    counts = cp.count_parameters(cp.build_model(B16))
    parts = counts['parts']
    assert parts['backbone'] == dict(total=85_668_864, trainable=122_112)
    assert parts['adapters']['trainable'] == 1_307_656
    assert parts['text_encoder']['trainable'] == 0
    assert counts['total']['trainable'] == 4_786_058


def test_l16_backbone_counts_on_meta():
    cfg = Config.fromfile(L16)
    with torch.device('meta'):
        bb = MODELS.build(cfg.model.backbone)
    own = [p for n, p in bb.named_parameters()
           if not n.startswith('adapters.')]
    assert sum(p.numel() for p in own) == 303_153_152
    assert sum(p.numel() for p in own if p.requires_grad) == 322_560
    assert sum(p.numel() for p in bb.adapters.parameters()) == 1_439_752


@pytest.mark.parametrize('size, kind, blocks, adapters, out', [
    ('b', 'detris', tuple(range(1, 12, 2)), 2_715_696 - 418_320,
     (4, 8, 11)),
    ('l', 'detris', tuple(range(1, 24, 2)), 5_802_576 - 418_320,
     (9, 17, 23)),
    ('b', 'smoe', tuple(range(12)), 2_796_289, (3, 7, 11)),
    ('l', 'smoe', tuple(range(24)), 5_804_033, (7, 15, 23)),
])
def test_detris_and_spectralmoe_on_dinov3(size, kind, blocks, adapters,
                                          out):
    """The image tower of each (built on the meta device): its slots and
    trainable parameters (DETRIS: the Dense Aligners; the Text Adapters,
    418,320, sit in the text tower)."""
    path = (DETRIS if kind == 'detris' else SMOE).format(size)
    cfg = Config.fromfile(path)
    assert cfg.model.data_preprocessor.size_divisor == 16
    with torch.device('meta'):
        bb = MODELS.build(cfg.model.backbone)
    assert type(bb).__name__ == 'DINOv3'
    assert bb.arch['embed_dims'] == {'b': 768, 'l': 1024}[size]
    assert bb.out_indices == out
    slot = 'parallel_mlp' if kind == 'detris' else 'post_block'
    assert bb.adapters.indices(slot) == blocks
    assert sum(p.numel() for p in bb.adapters.parameters()) == adapters
    own = sum(p.numel() for n, p in bb.named_parameters()
              if p.requires_grad and not n.startswith('adapters.'))
    assert own == (0 if kind == 'detris' else {
        'b': 122_112, 'l': 322_560}[size])


def test_tiny_model(cp):
    m = cp.build_model(TINY)
    bb = m.backbone
    assert type(bb).__name__ == 'DINOv3' and bb.patch_size == 16
    assert bb.num_prefix_tokens == 5 and bb.trainable == 'full'
    assert bb.adapters.indices('post_block') == (1, 3)
    counts = cp.count_parameters(m)
    assert counts['total']['trainable'] == 4_160_070


def test_tiny_config_trains_and_evaluates(synthetic_root, tmp_path):
    """Two training steps through tools/train.py, then tools/test.py."""
    work_dir = str(tmp_path / 'train')
    short = {'train_cfg.max_epochs': 1,
             'train_dataloader.dataset.indices': 16,
             'test_dataloader.dataset.indices': 8,
             'test_dataloader.batch_size': 8}
    run_tool(['tools/train.py', TINY, '--work-dir', work_dir] +
             tiny_cfg_options(synthetic_root, **short))
    rows = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                   'scalars.json')):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    losses = [r for r in rows if 'loss' in r]
    assert len(losses) == 2
    assert all(math.isfinite(r['loss']) and r['loss'] > 0 for r in losses)
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    run_test_tool(TINY, ckpt, tmp_path / 'eval',
                  tiny_cfg_options(synthetic_root, **short))
