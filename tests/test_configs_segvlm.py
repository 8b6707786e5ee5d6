"""The SegVLM configs (configs/segvlm/): SERA's configs with SegVLM's refine
blocks and RAF loss in the head and nothing else changed; the RefCOCO one
builds with the expected blocks and parameter counts, the tiny one trains
for a few iterations through tools/train.py and evaluates through
tools/test.py."""
import math
import os.path as osp

import pytest
from mmengine.config import Config

from .conftest import (REPO, TINY_CONFIG, run_test_tool, run_tool,
                       tiny_cfg_options)
from .test_configs_peers import _scalars, cp  # noqa: F401  (fixture)

SEGVLM_DIR = osp.join(REPO, 'configs', 'segvlm')
SEGVLM_B = osp.join(
    SEGVLM_DIR, 'segvlm_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py')
SEGVLM_TINY = osp.join(
    SEGVLM_DIR, 'segvlm_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
SERA_B = osp.join(
    REPO, 'configs', 'sera',
    'sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py')
HEAD_KEYS = ('refine_cfg', 'refine_at', 'loss_decode')


@pytest.mark.parametrize('path,sera', [(SEGVLM_B, SERA_B),
                                       (SEGVLM_TINY, TINY_CONFIG)],
                         ids=['refcoco', 'tiny'])
def test_segvlm_configs_are_sera_with_segvlm_head_parts(path, sera):
    cfg, base = Config.fromfile(path), Config.fromfile(sera)
    head = cfg.model.decode_head.to_dict()
    assert head['refine_cfg']['type'] == 'SegVLMRefineBlock'
    assert head['refine_cfg']['text_cond'] and \
        head['refine_cfg']['se_text_cond']
    assert tuple(head['refine_at']) == ('neck', 'up')
    loss, = head['loss_decode']
    assert loss['type'] == 'RAFLoss'
    assert {k: v for k, v in head.items() if k not in HEAD_KEYS} == \
        base.model.decode_head.to_dict()
    for key in cfg.model:
        if key != 'decode_head':
            assert cfg.model[key] == base.model[key], key
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg',
                'train_dataloader', 'val_dataloader', 'test_dataloader',
                'randomness', 'default_hooks'):
        assert cfg.get(key) == base.get(key), key


def _refine_block(c: int, text: int = 512, offset_text: int = 64) -> int:
    """One text-conditioned DeformableRefine + text-conditioned SE, r = 16
    (PEERS.md 4.2 / 4.3, written out)."""
    h = max(1, c // 16)
    dcn = c * c * 9 + c + (c + offset_text) * 9 * 27 + 27
    w_s = text * offset_text + offset_text
    se = (text * h + h) + ((c + h) * h + h) + (h * c + c)
    return dcn + w_s + 2 * c + se


def test_segvlm_b_head(cp):  # noqa: F811
    """Blocks at stride 14 (256 wide) and after both upsampling convs (128
    and 64), on the pooled CLIP sentence (512); the neck block's DCN has
    PEERS.md's text-conditioned count; RAF is the only head loss."""
    from mmseg_sera.models.heads.segvlm import SegVLMRefineBlock
    from mmseg_sera.models.losses import RAFLoss
    model = cp.build_model(SEGVLM_B)
    head = model.decode_head
    blocks = [head.refine_in] + list(head.refine_up)
    assert all(isinstance(b, SegVLMRefineBlock) for b in blocks)
    widths = [b.blocks[0].dcn.channels for b in blocks]
    assert widths == [256, 128, 64]
    for b in blocks:
        assert len(b.blocks) == 1 and b.blocks[0].backend == 'torchvision'
        assert b.blocks[0].text_proj.in_features == 512
    assert sum(p.numel() for p in head.refine_in.blocks[0].dcn.parameters()
               ) == 667_867
    for b, c in zip(blocks, widths):
        assert sum(p.numel() for p in b.parameters()) == _refine_block(c)
    counts = cp.count_parameters(model)
    sera = cp.count_parameters(cp.build_model(SERA_B))
    assert counts['parts']['head']['total'] == \
        sera['parts']['head']['total'] + sum(map(_refine_block, widths))
    losses = list(head.loss_decode)
    assert len(losses) == 1 and isinstance(losses[0], RAFLoss)


def test_tiny_segvlm_head(cp):  # noqa: F811
    """The tiny head: the 64-wide neck map and the inherited 128 -> 64 up
    path, 64-d sentence, 16 text channels for the offsets."""
    head = cp.build_model(SEGVLM_TINY).decode_head
    blocks = [head.refine_in] + list(head.refine_up)
    widths = [b.blocks[0].dcn.channels for b in blocks]
    assert widths == [64, 128, 64]
    for b, c in zip(blocks, widths):
        assert sum(p.numel() for p in b.parameters()) == _refine_block(
            c, text=64, offset_text=16)


def test_tiny_segvlm_trains_and_evaluates(synthetic_root, tmp_path):
    """Two training steps through tools/train.py (16 items, batch 8) with
    every RAF term logged, then tools/test.py on 8 validation sentences."""
    work_dir = str(tmp_path / 'train')
    short = {'train_cfg.max_epochs': 1,
             'train_dataloader.dataset.indices': 16,
             'test_dataloader.dataset.indices': 8,
             'test_dataloader.batch_size': 8}
    run_tool(['tools/train.py', SEGVLM_TINY, '--work-dir', work_dir] +
             tiny_cfg_options(synthetic_root, **short))
    rows = [r for r in _scalars(work_dir) if 'loss' in r]
    assert len(rows) == 2
    for row in rows:
        for term in ('bce', 'focal', 'dice'):
            key = f'loss_raf_{term}'
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert 'loss_mask' not in row and 'loss_dice' not in row
        assert math.isfinite(row['loss']) and row['loss'] > 0
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()

    run_test_tool(SEGVLM_TINY, ckpt, tmp_path / 'eval',
                  tiny_cfg_options(synthetic_root, **short))
