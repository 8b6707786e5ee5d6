"""tools/model_converters/dinov2_to_sera.py against the reference code.

References (installed by tools/install.sh, never downloaded by the tests):
* official layout: ``dinov2`` (PyPI 0.0.1.dev2, facebookresearch code of
  2023-04: ``DinoVisionTransformer``, no register tokens) builds the
  checkpoints and computes the reference features;
* official reg4 layout: that code's state dict plus ``register_tokens``,
  run by timm's own loader for official DINOv2 checkpoints
  (``checkpoint_filter_fn``) and timm's forward;
* timm layout: ``timm.models.vision_transformer.VisionTransformer`` with the
  ``vit_*_patch14(_reg4)_dinov2`` options.
Every model is random and tiny; the image is 70 x 98 (a 5 x 7 grid), so the
37 x 37 position table is resampled.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from dinov2.models.vision_transformer import DinoVisionTransformer
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import (VisionTransformer,
                                            checkpoint_filter_fn)

from mmseg_sera.models.backbones import dinov2 as dinov2_module
from mmseg_sera.models.backbones.dinov2 import DINOv2
from test_dinov2 import randomize_ as randomize_params_

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    'dinov2_to_sera',
    ROOT / 'tools' / 'model_converters' / 'dinov2_to_sera.py')
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)

DEPTH = 3
ATOL = 1e-4


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_params_(model, seed).eval()


def official(ffn: str = 'mlp', chunks: int = 0) -> DinoVisionTransformer:
    return randomize_(
        DinoVisionTransformer(
            img_size=518, patch_size=14, embed_dim=32, depth=DEPTH,
            num_heads=2, init_values=1e-5, ffn_layer=ffn,
            block_chunks=chunks))


def timm_vit(reg: int, ffn: str = 'mlp', dims: int = 32) -> VisionTransformer:
    kw = dict(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked,
              act_layer=nn.SiLU) if ffn == 'swiglu' else {}
    return randomize_(
        VisionTransformer(
            img_size=518, patch_size=14, embed_dim=dims, depth=DEPTH,
            num_heads=2, init_values=1e-5, reg_tokens=reg,
            no_embed_class=reg > 0, dynamic_img_size=True, num_classes=0,
            **kw))


def ours(sd, reg: int = 0, ffn: str = 'mlp', dims: int = 32,
         **kwargs) -> DINOv2:
    m = DINOv2(
        arch=dict(embed_dims=dims, num_layers=DEPTH, num_heads=2,
                  ffn_type=ffn),
        num_register_tokens=reg, out_indices=tuple(range(DEPTH)), **kwargs)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def expected_official(model, x):
    """Levels 0..D-2 without norm, the last one after the final norm."""
    with torch.no_grad():
        raw = model.get_intermediate_layers(
            x, n=list(range(DEPTH)), reshape=True, norm=False)
        normed = model.get_intermediate_layers(
            x, n=list(range(DEPTH)), reshape=True, norm=True)
    return list(raw[:-1]) + [normed[-1]]


def expected_timm(model, x):
    with torch.no_grad():
        raw = model.forward_intermediates(
            x, indices=list(range(DEPTH)), norm=False,
            intermediates_only=True)
        normed = model.forward_intermediates(
            x, indices=list(range(DEPTH)), norm=True,
            intermediates_only=True)
    return list(raw[:-1]) + [normed[-1]]


def assert_features(model, x, expected):
    with torch.no_grad():
        got = model(x)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        diff = (g - e).abs().max().item()
        assert diff <= ATOL, diff


X = torch.randn(
    2, 3, 14 * 5, 14 * 7, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('ffn, chunks, size', [
    ('mlp', 0, (70, 98)),
    ('mlp', 3, (70, 98)),          # FSDP block chunks: blocks.c.i.*
    ('swiglufused', 0, (70, 98)),  # ViT-g FFN: mlp.w12 / mlp.w3
    ('mlp', 0, (518, 518)),        # the pre-training grid: table as stored
])
def test_official_layout(ffn, chunks, size):
    ref = official(ffn, chunks)
    sd = ref.state_dict()
    if chunks:
        assert 'blocks.2.2.norm1.weight' in sd
    assert conv.detect_layout(sd) == 'official'
    out = conv.convert_dinov2(sd)
    assert 'mask_token' not in out and 'blocks.2.norm1.weight' in out
    assert torch.equal(out['pos_embed'], sd['pos_embed'])  # never resized
    x = X if size == (70, 98) else torch.randn(1, 3, *size)
    m = ours(out, ffn='swiglu' if ffn != 'mlp' else 'mlp')
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.1, False)
    assert_features(m, x, expected_official(ref, x))
    meta = conv.describe(out, 'official')
    assert meta['interpolate_offset'] == 0.1
    assert meta['ffn_type'] == ('mlp' if ffn == 'mlp' else 'swiglu')
    assert meta['num_layers'] == DEPTH and meta['pos_grid'] == 37


def test_official_reg4_layout():
    ref = official()
    sd = ref.state_dict()
    sd['register_tokens'] = 0.1 * torch.randn(
        1, 4, 32, generator=torch.Generator().manual_seed(2))
    # timm's loader for official DINOv2 checkpoints is the reference
    timm_ref = timm_vit(reg=4)
    timm_ref.load_state_dict(checkpoint_filter_fn(dict(sd), timm_ref))
    out = conv.convert_dinov2(dict(sd), src='official')
    assert torch.equal(out['register_tokens'], sd['register_tokens'])
    m = ours(out, reg=4)
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.0, True)
    assert_features(m, X, expected_timm(timm_ref, X))
    meta = conv.describe(out, 'official')
    assert (meta['interpolate_offset'], meta['interpolate_antialias'],
            meta['num_register_tokens']) == (0.0, True, 4)


@pytest.mark.parametrize('reg, ffn, dims', [(4, 'mlp', 32), (0, 'mlp', 32),
                                            (4, 'swiglu', 48)])
def test_timm_layout(reg, ffn, dims):
    ref = timm_vit(reg, ffn, dims)
    sd = ref.state_dict()
    assert conv.detect_layout(sd) == 'timm'
    out = conv.convert_dinov2(sd)
    if reg:
        # no_embed_class: a zero class entry is stored in front
        assert sd['pos_embed'].shape[1] == 37 * 37
        assert out['pos_embed'].shape == (1, 1 + 37 * 37, dims)
        assert torch.count_nonzero(out['pos_embed'][:, 0]) == 0
    # timm resamples by size with antialias, also without registers
    m = ours(out, reg=reg, ffn=ffn, dims=dims, interpolate_offset=0.0,
             interpolate_antialias=True)
    assert_features(m, X, expected_timm(ref, X))
    meta = conv.describe(out, 'timm')
    assert (meta['interpolate_offset'], meta['interpolate_antialias'],
            meta['ffn_type']) == (0.0, True, ffn)
    if not reg:
        # the official no-register mode is a different resampling
        m_off = ours(out, reg=0)
        with torch.no_grad():
            assert (m_off(X)[0] - m(X)[0]).abs().max() > 1e-3


def test_cli_and_pretrained_init(tmp_path, capsys):
    ref = official()
    src, dst = tmp_path / 'dinov2_vit_tiny14.pth', tmp_path / 'ours.pth'
    # an official training checkpoint: teacher.backbone.* plus heads
    teacher = {'backbone.' + k: v for k, v in ref.state_dict().items()}
    teacher['dino_head.mlp.0.weight'] = torch.zeros(4, 32)
    torch.save(dict(teacher=teacher, iteration=3), src)
    assert conv.main([str(src), str(dst)]) == 0
    printed = capsys.readouterr().out
    assert "dropped ['mask_token']" in printed
    assert 'interpolate_offset=0.1' in printed
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['source_layout'] == 'official'
    m = DINOv2(
        arch=dict(embed_dims=32, num_layers=DEPTH, num_heads=2),
        out_indices=tuple(range(DEPTH)),
        init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    m.init_weights()
    assert_features(m.eval(), X, expected_official(ref, X))
    # a contradicting --layout is a usage error naming the file
    with pytest.raises(SystemExit) as err:
        conv.main([str(src), str(dst), '--layout', 'timm'])
    assert err.value.code == 2
    assert str(src) in capsys.readouterr().err


def test_encoder_of_a_depth_network(tmp_path, capsys):
    """--prefix converts the DINOv2 encoder of a larger model (a
    Depth-Anything style depth network: encoder under ``pretrained.``
    beside ``depth_head.*``) and nothing else."""
    ref = official()
    sd = {'pretrained.' + k: v for k, v in ref.state_dict().items()}
    sd['depth_head.projects.0.weight'] = torch.ones(4, 32, 1, 1)
    src, dst = tmp_path / 'depth_anything.pth', tmp_path / 'ours.pth'
    torch.save(sd, src)
    # without the prefix the head's keys have no place in a DINOv2
    with pytest.raises(SystemExit):
        conv.main([str(src), str(dst)])
    assert 'depth_head' in capsys.readouterr().err
    assert conv.main([str(src), str(dst), '--prefix', 'pretrained.']) == 0
    m = DINOv2(
        arch=dict(embed_dims=32, num_layers=DEPTH, num_heads=2),
        out_indices=tuple(range(DEPTH)),
        init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    m.init_weights()
    assert_features(m.eval(), X, expected_official(ref, X))
    with pytest.raises(ValueError, match="prefix 'encoder.'.*pretrained"):
        conv.unwrap_checkpoint(sd, 'encoder.')


def _fake(keys, C=8, grid=3):
    shapes = dict(cls_token=(1, 1, C), pos_embed=(1, 1 + grid * grid, C),
                  mask_token=(1, C), register_tokens=(1, 4, C),
                  reg_token=(1, 4, C))
    return {k: torch.zeros(shapes.get(k, (C, ))) for k in keys}


def test_detection_and_chunk_flattening():
    base = ['cls_token', 'pos_embed', 'norm.weight', 'norm.bias']
    assert conv.detect_layout(_fake(base + ['mask_token'])) == 'official'
    assert conv.detect_layout(_fake(base + ['register_tokens'])) == 'official'
    assert conv.detect_layout(_fake(base + ['blocks.1.4.ls1.gamma'])) \
        == 'official'
    assert conv.detect_layout(_fake(base + ['blocks.0.mlp.w12.weight'])) \
        == 'official'
    assert conv.detect_layout(_fake(base + ['reg_token'])) == 'timm'
    assert conv.detect_layout(_fake(base)) == 'timm'

    sd = _fake(base + ['mask_token', 'blocks.0.0.ls1.gamma',
                       'blocks.1.1.ls1.gamma', 'blocks.1.2.mlp.w3.bias',
                       'blocks.1.2.mlp.w12.weight'])
    out = conv.convert_dinov2(sd)
    assert sorted(out) == sorted([
        'cls_token', 'pos_embed', 'norm.weight', 'norm.bias',
        'blocks.0.ls1.gamma', 'blocks.1.ls1.gamma', 'blocks.2.mlp.fc2.bias',
        'blocks.2.mlp.fc1.weight'
    ])
    # wrapped checkpoints
    for wrap in ('model', 'state_dict'):
        assert sorted(conv.convert_dinov2({wrap: sd})) == sorted(out)
    out = conv.convert_dinov2(_fake(base + ['reg_token', 'head.weight']))
    assert 'register_tokens' in out and 'head.weight' not in out


@pytest.mark.parametrize('keys, src, match', [
    (['mask_token', 'reg_token'], 'auto', 'mixes official'),
    (['blocks.0.attn.qkv.weight', 'blocks.0.attn.relative_bias'], 'auto',
     r"no place.*'blocks\.0\.attn\.relative_bias'"),
    (['fc_norm.weight'], 'timm', r"no place.*'fc_norm\.weight'"),
    (['mask_token'], 'timm', 'keys are those of the official layout'),
    ([], 'mmseg', 'src must be one of'),
])
def test_malformed_checkpoints(keys, src, match):
    sd = _fake(['cls_token', 'pos_embed'] + keys)
    with pytest.raises(ValueError, match=match):
        conv.convert_dinov2(sd, src=src)


def test_malformed_tables():
    with pytest.raises(ValueError, match='no pos_embed'):
        conv.convert_dinov2({'blocks.0.ls1.gamma': torch.zeros(3)})
    sd = _fake(['cls_token', 'pos_embed'])
    sd['pos_embed'] = torch.zeros(1, 12, 8)  # 12 = neither M*M nor 1+M*M
    with pytest.raises(ValueError, match='12 positions'):
        conv.convert_dinov2(sd)
    with pytest.raises(ValueError, match='not tensors'):
        conv.convert_dinov2(dict(cls_token=torch.zeros(1), epoch=3))


def test_recorded_resampling_applied_unless_set(tmp_path, monkeypatch):
    """A converted timm checkpoint without registers needs timm's mode
    (size-based, antialias), not the official no-register default: the
    backbone takes it from the file unless the config sets it, and keeps it
    in its own state for later loads (tools/test.py, init_model)."""
    ref = timm_vit(reg=0)
    src, dst = tmp_path / 'timm.pth', tmp_path / 'ours.pth'
    torch.save(ref.state_dict(), src)
    assert conv.main([str(src), str(dst)]) == 0
    arch = dict(embed_dims=32, num_layers=DEPTH, num_heads=2)
    logged = []
    monkeypatch.setattr(dinov2_module, 'print_log',
                        lambda msg, **kw: logged.append(msg))

    def build(**kwargs):
        return DINOv2(arch=arch, out_indices=tuple(range(DEPTH)), **kwargs)

    m = build(init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.1, False)
    m.init_weights()
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.0, True)
    assert_features(m.eval(), X, expected_timm(ref, X))
    assert any('interpolate_offset=0.0 (' + str(dst) in msg
               for msg in logged)

    # a trained model's state carries the mode: a fresh model built from the
    # same config (defaults 0.1 / False) gets it back, also after a dtype
    # cast of the state
    state = {k: v.double() if v.is_floating_point() else v
             for k, v in m.state_dict().items()}
    fresh = build()
    fresh.load_state_dict(state)
    assert (fresh.interpolate_offset, fresh.interpolate_antialias) == \
        (0.0, True)
    assert_features(fresh.float().eval(), X, expected_timm(ref, X))
    # an older state without the buffer keeps the current mode (strict ok)
    del state['pos_resampling']
    older = build()
    older.load_state_dict(state, strict=True)
    assert older.interpolate_offset == 0.1

    # an explicit option wins, with a warning; the other follows the file
    logged.clear()
    m = build(interpolate_offset=0.1,
              init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    m.init_weights()
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.1, True)
    assert 'interpolate_offset=0.0 recorded, 0.1 set' in logged[0]
    assert 'config wins' in logged[0]
    assert 'interpolate_offset=0.1 (config)' in logged[1]
