"""ETRIS parts: the CLIP ViT backbone (``CLIPViT``), the lock-step text
stream of ``OpenCLIPTextEncoder``, the ``ETRISBridger`` in the ``bridge``
slot (CLIPViT and DINOv2) and the segmentor's bridge mode.

Expected values come from PEERS.md §2 (parameter counts built from ETRIS's
modules, the stage equations written out by hand below) and from open_clip's
own modules on the same weights, not from the code under test.
"""
import math

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_sera  # noqa: F401  (registers the components)
from mmseg_sera.models.adapters import ETRISBridger
from mmseg_sera.models.backbones.clip_vit import (CLIPViT,
                                                  extract_visual_state_dict)
from mmseg_sera.models.backbones.dinov2 import DINOv2
from mmseg_sera.models.backbones.slots import text_block_schedule
from mmseg_sera.models.text_encoders.clip_text import OpenCLIPTextEncoder

# tiny towers: image 32 wide, 4 blocks, 2 heads, patch 16, stored 4 x 4 grid
TINY_VISION = dict(width=32, layers=4, head_width=16, patch_size=16,
                   image_size=64)
TEXT_WIDTH, TEXT_LAYERS, EMBED = 16, 4, 12
TINY_TEXT = dict(width=TEXT_WIDTH, layers=TEXT_LAYERS, heads=2)
SENTENCES = ['the man in the red shirt', 'a dog']
CONTEXT = 10
TINY_BRIDGE = dict(type='ETRISBridger', text_dims=TEXT_WIDTH, hidden_dims=8,
                   num_heads=2)


def n_params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters()
               if p.requires_grad or not trainable)


def perturb_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Add noise to every parameter and BN statistic (so that no LayerNorm,
    BN or bias is an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith('running_var'):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def tiny_clip(layers: int = 4) -> nn.Module:
    """A tiny open_clip CLIP (both towers), random weights, eval mode."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=EMBED, vision_cfg=dict(TINY_VISION, layers=layers),
        text_cfg=dict(context_length=77, vocab_size=49408, width=TEXT_WIDTH,
                      heads=2, layers=TEXT_LAYERS))
    return perturb_(model).eval()


@pytest.fixture(scope='module')
def clip_model():
    return tiny_clip()


@pytest.fixture(scope='module')
def ckpt(clip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp('clip') / 'open_clip_tiny.bin'
    torch.save(clip_model.state_dict(), path)
    return str(path)


def vit(ckpt=None, **kw) -> CLIPViT:
    kw.setdefault('vision_cfg', TINY_VISION)
    kw.setdefault('embed_dim', EMBED)
    kw.setdefault('out_indices', (1, 2, 3))
    model = CLIPViT(pretrained=ckpt, **kw)
    model.init_weights()
    return model


def text_encoder(ckpt=None, **kw) -> OpenCLIPTextEncoder:
    kw.setdefault('text_cfg', TINY_TEXT)
    kw.setdefault('embed_dim', EMBED)
    kw.setdefault('context_length', CONTEXT)
    enc = OpenCLIPTextEncoder(pretrained=ckpt, **kw)
    enc.init_weights()
    return enc


def images(B: int = 2, H: int = 48, W: int = 80, seed: int = 0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(
        seed))


# --------------------------------------------------------------------------
# reference computations (written out from the formulas)
# --------------------------------------------------------------------------
def manual_mha(mha: nn.MultiheadAttention, q, kv, key_padding_mask=None):
    """``out_proj(concat_h softmax(Q_h K_h^T / sqrt(dh)) V_h)``."""
    E, H = mha.embed_dim, mha.num_heads
    dh = E // H
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], H, dh).transpose(1, 2)

    Q, K, V = (heads(F.linear(q, wq, bq)), heads(F.linear(kv, wk, bk)),
               heads(F.linear(kv, wv, bv)))
    logits = Q @ K.transpose(-2, -1) / math.sqrt(dh)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None],
                                    float('-inf'))
    out = (logits.softmax(-1) @ V).transpose(1, 2).reshape(
        q.shape[0], q.shape[1], E)
    return mha.out_proj(out)


def conv1x1(layer: nn.Module, x):
    """A 1x1 Conv2d / ConvTranspose2d (no bias) on B x c x h x w by
    einsum: Conv weight out x in, ConvTranspose weight in x out."""
    w = layer.weight[:, :, 0, 0]
    if isinstance(layer, nn.ConvTranspose2d):
        w = w.t()
    return torch.einsum('oc,bchw->bohw', w, x)


def bn_relu(bn: nn.BatchNorm2d, x):
    """Eval-mode BN (running statistics) then ReLU."""
    inv = (bn.running_var + bn.eps).rsqrt()
    y = (x - bn.running_mean[:, None, None]) * inv[:, None, None]
    return F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def ln(norm: nn.LayerNorm, x):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_stage(br: ETRISBridger, s: int, patches, text, hw, prev,
                    misread: str = ''):
    """One stage, PEERS §2.2, eval mode. ``misread`` builds a plausible
    wrong reading: 'sequential' (T^ attends to the fused V^),
    'no_chain_norm' (V~ + V~_prev without LN), 'chain_fused' (carry V^,
    T^ instead of V~, T~)."""
    m = br.stages[s]
    B, N, C = patches.shape
    grid = patches.transpose(1, 2).reshape(B, C, *hw)
    zin_conv, zin_bn = m.zoom_in[0], m.zoom_in[1]
    v = bn_relu(zin_bn, conv1x1(zin_conv, grid)).flatten(2).transpose(1, 2)
    t = F.linear(text, m.text_in.weight, m.text_in.bias)
    if s > 0:
        v_prev, t_prev = prev
        if misread == 'no_chain_norm':
            v, t = v + v_prev, t + t_prev
        else:
            v = ln(br.norms_v[s - 1], v + v_prev)
            t = ln(br.norms_t[s - 1], t + t_prev)
    v_hat = v * manual_mha(m.attn_v, v, t)
    kv = v_hat if misread == 'sequential' else v
    t_hat = t * manual_mha(m.attn_t, t, kv)
    out_grid = v_hat.transpose(1, 2).reshape(B, -1, *hw)
    res = bn_relu(m.zoom_out[1], conv1x1(m.zoom_out[0], out_grid))
    new_patches = patches + res.flatten(2).transpose(1, 2)
    new_text = text + F.linear(t_hat, m.text_out.weight, m.text_out.bias)
    carry = (v_hat, t_hat) if misread == 'chain_fused' else (v, t)
    return new_patches, new_text, carry


def tiny_bridger(insert=(0, 1, 2), C=24, seed=3, **kw) -> ETRISBridger:
    cfg = dict(TINY_BRIDGE, embed_dims=C, insert=insert)
    cfg.update(kw)
    return perturb_(MODELS.build(cfg), seed=seed, std=0.2).eval()


# --------------------------------------------------------------------------
# ETRISBridger: counts, init, the stage equations
# --------------------------------------------------------------------------
def test_bridger_parameter_counts_vit_b16():
    br = ETRISBridger(embed_dims=768, insert=(3, 7, 11))  # d = 64
    st = br.stages[0]
    assert n_params(st.zoom_in) == 49_280
    assert n_params(st.zoom_out) == 50_688
    assert n_params(st.text_in) == 32_832
    assert n_params(st.text_out) == 33_280
    assert n_params(st.attn_v) == n_params(st.attn_t) == 16_640
    assert all(n_params(s) == 199_360 for s in br.stages)
    assert n_params(br.norms_v) + n_params(br.norms_t) == 512
    assert n_params(br) == 598_592
    big = ETRISBridger(embed_dims=768, insert=(3, 7, 11), hidden_dims=128)
    assert n_params(big.stages[0]) == 462_208
    assert n_params(big) == 1_387_648  # the paper's 1.39 M
    # the last stage swaps the zooms: ConvTranspose in, Conv out
    for s, stage in enumerate(br.stages):
        conv_in = stage.zoom_in[0]
        assert isinstance(conv_in, nn.ConvTranspose2d) == (s == 2)
        assert isinstance(stage.zoom_out[0], nn.ConvTranspose2d) == (s < 2)
        assert conv_in.bias is None and stage.zoom_out[0].bias is None
        assert isinstance(stage.zoom_out[-1], nn.ReLU)


def test_bridger_init_is_etris():
    torch.manual_seed(0)
    br = ETRISBridger(embed_dims=768, insert=(3, 7, 11))
    d = 64
    for stage in br.stages:
        for lin in (stage.text_in, stage.text_out, stage.attn_v.out_proj,
                    stage.attn_t.out_proj):
            assert abs(lin.weight.std().item() - 0.02) < 0.002
            assert abs(lin.weight.mean().item()) < 0.002
            assert (lin.bias == 0).all()
        for mha in (stage.attn_v, stage.attn_t):
            bound = math.sqrt(6 / (d + 3 * d))  # xavier-uniform, 3d x d
            assert mha.in_proj_weight.abs().max() <= bound
            assert abs(mha.in_proj_weight.std().item() -
                       bound / math.sqrt(3)) < 0.01
            assert (mha.in_proj_bias == 0).all()
        for conv in (stage.zoom_in[0], stage.zoom_out[0]):
            # kaiming-normal, fan_out, relu: torch's fan_out = size(0)
            fan_out = conv.weight.shape[0]
            assert abs(conv.weight.std().item() -
                       math.sqrt(2 / fan_out)) < 0.1 * math.sqrt(2 / fan_out)
        for bn in (stage.zoom_in[1], stage.zoom_out[1]):
            assert (bn.weight == 1).all() and (bn.bias == 0).all()
        assert stage.out_scale is None
    for norm in list(br.norms_v) + list(br.norms_t):
        assert (norm.weight == 1).all() and (norm.bias == 0).all()
    # no zero init: a fresh bridge changes both streams
    x = torch.randn(2, 6, 768)
    t = torch.randn(2, 5, 512)
    out = br.eval()(0, x, t, hw=(2, 3))
    assert (out.patches - x).abs().max() > 0
    assert (out.text - t).abs().max() > 0


@pytest.mark.parametrize('misread', ['', 'sequential', 'no_chain_norm',
                                     'chain_fused'])
def test_bridger_stages_follow_the_equations(misread):
    """Three chained stages against the hand-written reference; each
    plausible misreading must differ from the module."""
    br = tiny_bridger()
    hw = (3, 5)
    g = torch.Generator().manual_seed(5)
    patches = torch.randn(2, 15, 24, generator=g)
    text = torch.randn(2, 6, TEXT_WIDTH, generator=g)
    carry = ref_prev = None
    differs = False
    with torch.no_grad():
        for s in range(3):
            out = br(s, patches, text, hw=hw, carry=carry)
            ref = reference_stage(br, s, patches, text, hw, ref_prev,
                                  misread=misread)
            if misread:
                differs |= not (torch.allclose(out.patches, ref[0],
                                               atol=1e-4) and
                                torch.allclose(out.text, ref[1], atol=1e-4))
            else:
                torch.testing.assert_close(out.patches, ref[0])
                torch.testing.assert_close(out.text, ref[1])
                torch.testing.assert_close(out.carry[0], ref[2][0])
                torch.testing.assert_close(out.carry[1], ref[2][1])
            # continue every chain from the module's own state
            patches, text, carry = out.patches, out.text, out.carry
            ref_prev = ref[2] if misread == 'chain_fused' else out.carry
    assert differs or not misread


def test_bridger_stage1_reads_ln_of_sum_with_stage0():
    """Stage 1 sees LN^v_0(V~_1 + V~_0): a different stage-0 carry changes
    stage 1, and passing no carry to stage 1 is refused."""
    br = tiny_bridger()
    x = torch.randn(2, 6, 24)
    t = torch.randn(2, 5, TEXT_WIDTH)
    with torch.no_grad():
        c0 = br(0, x, t, hw=(2, 3)).carry
        a = br(1, x, t, hw=(2, 3), carry=c0)
        b = br(1, x, t, hw=(2, 3), carry=(2 * c0[0], c0[1]))
        assert not torch.allclose(a.patches, b.patches)
        v1 = bn_relu(br.stages[1].zoom_in[1],
                     conv1x1(br.stages[1].zoom_in[0],
                             x.transpose(1, 2).reshape(2, 24, 2, 3)))
        v1 = v1.flatten(2).transpose(1, 2)
        torch.testing.assert_close(a.carry[0],
                                   ln(br.norms_v[0], v1 + c0[0]))
    with pytest.raises(ValueError, match='carry'):
        br(1, x, t, hw=(2, 3))
    with pytest.raises(ValueError, match='carry'):
        br(0, x, t, hw=(2, 3), carry=c0)


@pytest.mark.parametrize('train', [False, True])
def test_injected_image_residual_is_non_negative(train):
    br = tiny_bridger().train(train)
    x = torch.randn(2, 12, 24)
    t = torch.randn(2, 5, TEXT_WIDTH)
    carry = None
    for s in range(3):
        out = br(s, x, t, hw=(3, 4), carry=carry)
        assert (out.patches - x >= 0).all()
        assert (out.patches - x > 0).any()
        x, t, carry = out


def test_all_text_tokens_updated_including_padding():
    br = tiny_bridger()
    t = torch.randn(2, 6, TEXT_WIDTH)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3:] = True
    out = br(0, torch.randn(2, 6, 24), t, hw=(2, 3), text_mask=mask)
    assert ((out.text - t).abs().amax(-1) > 0).all()


def test_key_padding_option():
    """Default: padded words are keys of MHA^v (ETRIS); key_padding=True
    masks them out."""
    x = torch.randn(2, 6, 24)
    t = torch.randn(2, 5, TEXT_WIDTH)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    t2 = t.clone()
    t2[:, 3:] += 5.
    with torch.no_grad():
        for key_padding, same in ((False, False), (True, True)):
            br = tiny_bridger(key_padding=key_padding)
            a = br(0, x, t, hw=(2, 3), text_mask=mask).patches
            b = br(0, x, t2, hw=(2, 3), text_mask=mask).patches
            assert torch.allclose(a, b) == same


def test_zero_init_out_starts_as_identity_and_learns():
    br = MODELS.build(dict(TINY_BRIDGE, embed_dims=24, insert=(0, 1),
                           zero_init_out=True)).train()
    x = torch.randn(2, 6, 24)
    t = torch.randn(2, 5, TEXT_WIDTH)
    out = br(0, x, t, hw=(2, 3))
    torch.testing.assert_close(out.patches, x, atol=0, rtol=0)
    torch.testing.assert_close(out.text, t, atol=0, rtol=0)
    (out.patches.sum() + out.text.square().sum()).backward()
    st = br.stages[0]
    assert st.out_scale.grad.abs().max() > 0
    assert st.text_out.weight.grad.abs().max() > 0
    assert n_params(br) == n_params(
        MODELS.build(dict(TINY_BRIDGE, embed_dims=24,
                          insert=(0, 1)))) + 2 * 24


def test_bridger_bad_arguments():
    with pytest.raises(ValueError, match='increasing'):
        ETRISBridger(embed_dims=24, insert=(3, 1))
    with pytest.raises(ValueError, match='divisible'):
        ETRISBridger(embed_dims=24, insert=(0, ), hidden_dims=10,
                     num_heads=3)
    br = tiny_bridger()
    with pytest.raises(ValueError, match='text_dims'):
        br(0, torch.randn(2, 6, 24), torch.randn(2, 5, 7), hw=(2, 3))
    with pytest.raises(ValueError, match='patches'):
        br(0, torch.randn(2, 7, 24), torch.randn(2, 5, TEXT_WIDTH),
           hw=(2, 3))


# --------------------------------------------------------------------------
# CLIPViT against open_clip
# --------------------------------------------------------------------------
def test_extract_visual_state_dict_is_pure(clip_model):
    sd = clip_model.state_dict()
    before = dict(sd)
    out = extract_visual_state_dict({'state_dict': sd})
    assert set(out) == {k[7:] for k in sd if k.startswith('visual.')}
    assert sd.keys() == before.keys()
    with pytest.raises(ValueError, match='image-tower keys'):
        extract_visual_state_dict(
            {k: v for k, v in sd.items() if not k.startswith('visual.')})


@pytest.mark.parametrize('out_norm', ['last', 'all'])
def test_clip_vit_matches_open_clip_visual(clip_model, ckpt, out_norm):
    """Levels after blocks 1 and 3 equal open_clip's
    ``forward_intermediates``; the projected last level equals open_clip's
    ``ln_post(tokens) @ proj``; the class token path gives open_clip's
    pooled image feature."""
    model = vit(ckpt, out_indices=(1, 3), out_norm=out_norm,
                out_proj=True).eval()
    x = images(H=64, W=64)  # the stored 4 x 4 grid: no resampling
    with torch.no_grad():
        feats = model(x)
        ref = clip_model.visual.forward_intermediates(
            x, indices=[1, 3], normalize_intermediates=False)
        ref_n = clip_model.visual.forward_intermediates(
            x, indices=[1, 3], normalize_intermediates=True)
    assert model.out_channels == (32, EMBED)
    first = ref_n if out_norm == 'all' else ref
    torch.testing.assert_close(feats[0], first['image_intermediates'][0])
    proj = clip_model.visual.proj
    last = torch.einsum('bchw,cp->bphw', ref_n['image_intermediates'][1],
                        proj)
    torch.testing.assert_close(feats[1], last)
    # the same weights give open_clip's pooled feature (CLS path)
    with torch.no_grad():
        tokens, _ = model.prepare_tokens(x)
        for blk in model.blocks:
            tokens = blk(tokens)
        pooled = model.ln_post(tokens[:, 0]) @ model.proj
    torch.testing.assert_close(pooled, ref['image_features'])
    torch.testing.assert_close(pooled, clip_model.encode_image(x))


def test_position_table_resampled_for_non_square_grid(clip_model, ckpt):
    """A 3 x 5 grid: the table is resized bicubically at run time; the
    features equal a manual forward through open_clip's own modules."""
    model = vit(ckpt, out_indices=(3, ), out_norm='none').eval()
    vis = clip_model.visual
    x = images(H=48, W=80)
    with torch.no_grad():
        feat = model(x)[0]
        pos = vis.positional_embedding
        grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(3, 5), mode='bicubic',
                             align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(15, -1)])
        z = vis.conv1(x).flatten(2).transpose(1, 2)
        z = torch.cat([vis.class_embedding.expand(2, 1, -1), z], 1) + pos
        z = vis.transformer(vis.ln_pre(z))
    assert feat.shape == (2, 32, 3, 5)
    torch.testing.assert_close(feat,
                               z[:, 1:].transpose(1, 2).reshape(2, 32, 3, 5))


def test_pos_embed_size_resizes_at_load_like_run_time(ckpt):
    """ETRIS resizes the table once at load (14 -> 26); ``pos_embed_size``
    does the same, and equals resampling at run time."""
    stored = vit(ckpt, pos_embed_size=6).eval()
    assert stored.positional_embedding.shape == (37, 32)
    runtime = vit(ckpt).eval()
    assert runtime.positional_embedding.shape == (17, 32)
    x = images(H=96, W=96)
    with torch.no_grad():
        for a, b in zip(stored(x), runtime(x)):
            torch.testing.assert_close(a, b)


def test_input_padded_to_patch_multiple(ckpt):
    model = vit(ckpt, out_indices=(0, )).eval()
    with torch.no_grad():
        a = model(images(H=40, W=70))[0]
        b = model(F.pad(images(H=40, W=70), (0, 10, 0, 8)))[0]
    assert a.shape == (2, 32, 3, 5)
    torch.testing.assert_close(a, b)


def test_clip_vit_trainable_policies():
    frozen = vit(train_pos_embed=True,
                 adapters=[dict(TINY_BRIDGE, insert=(1, 3))])
    names = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert names == {'positional_embedding'} | {
        n for n, _ in frozen.named_parameters() if n.startswith('adapters.')
    }
    frozen.train()
    assert not frozen.transformer.training and not frozen.ln_post.training
    assert frozen.adapters.bridge.training
    ln_bias = vit(trainable='ln_bias')
    for n, p in ln_bias.named_parameters():
        expect = '.ln_' in n or n.startswith(('ln_pre', 'ln_post')) or \
            n.endswith('bias')
        assert p.requires_grad == expect, n
    assert all(p.requires_grad for p in vit(trainable='full').parameters())


def test_clip_vit_checkpoint_errors(tmp_path, ckpt):
    missing = tmp_path / 'checkpoints' / 'clip_vit_b16.bin'
    with pytest.raises(FileNotFoundError, match='clip_vit_b16.bin'):
        vit(str(missing))
    # a 4-block checkpoint into a 3-block tower: the extra keys are listed
    with pytest.raises(ValueError, match=r'unexpected keys.*resblocks\.3'):
        vit(ckpt, vision_cfg=dict(TINY_VISION, layers=3), out_indices=(2, ))
    with pytest.raises(ValueError, match=r'missing keys.*resblocks\.4'):
        vit(ckpt, vision_cfg=dict(TINY_VISION, layers=5), out_indices=(2, ))
    bad = tmp_path / 'wide.bin'
    torch.save(tiny_clip().state_dict() | {
        'visual.proj': torch.zeros(32, 7)
    }, bad)
    with pytest.raises(ValueError, match='proj has shape'):
        vit(str(bad))


def test_clip_vit_bad_arguments():
    with pytest.raises(ValueError, match='out of range'):
        vit(out_indices=(4, ))
    with pytest.raises(ValueError, match="out_norm='last'"):
        vit(out_norm='none', out_proj=True)
    with pytest.raises(ValueError, match='unknown open_clip model'):
        CLIPViT(model_name='no-such-model')
    with pytest.raises(ValueError, match='offline'):
        CLIPViT(model_name='hf-hub:someone/model')


# --------------------------------------------------------------------------
# slots: errors, schedule
# --------------------------------------------------------------------------
def test_slot_errors():
    with pytest.raises(ValueError, match='out of range'):
        vit(adapters=[dict(TINY_BRIDGE, insert=(1, 4))])
    with pytest.raises(ValueError, match='after the last block'):
        vit(out_indices=(1, ), adapters=[dict(TINY_BRIDGE, insert=(1, 2))])
    with pytest.raises(ValueError, match="has no 'parallel_mlp_text' slot"):
        vit(adapters=[dict(type='DETRISTextAdapter', insert=(1, ))])
    with pytest.raises(ValueError, match="has no 'bridge' slot"):
        text_encoder(adapters=[dict(TINY_BRIDGE, insert=(1, ))])
    with pytest.raises(ValueError, match='twice'):
        vit(adapters=[dict(TINY_BRIDGE, insert=(1, -3))])
    with pytest.raises(ValueError, match='already has a bridge'):
        vit(adapters=[dict(TINY_BRIDGE, insert=(1, )),
                      dict(TINY_BRIDGE, insert=(3, ))])
    with pytest.raises(ValueError, match="'scale'"):
        vit(adapters=[dict(TINY_BRIDGE, insert=(1, ), scale=0.5)])


def test_text_block_schedule():
    assert text_block_schedule(12, 12) == {i: (i, ) for i in range(12)}
    # DINOv2-L (24) beside CLIP text (12): text block j after image 2j + 1
    assert text_block_schedule(24, 12) == {2 * j + 1: (j, )
                                           for j in range(12)}
    # more text blocks than image blocks: some run before image block 0
    # (floor((j + 1) * 2 / 4) - 1 = -1, 0, 0, 1)
    assert text_block_schedule(2, 4) == {-1: (0, ), 0: (1, 2), 1: (3, )}


# --------------------------------------------------------------------------
# the text stream
# --------------------------------------------------------------------------
def test_text_stream_equals_forward(ckpt):
    enc = text_encoder(ckpt, adapters=[
        dict(type='DETRISTextAdapter', insert=(1, 3), scale=0.2,
             hidden_dims=16)
    ]).eval()
    with torch.no_grad():
        ref = enc(SENTENCES)
        state = enc.begin(SENTENCES)
        assert state.next_block == 0 and state.x.shape == (2, CONTEXT, 16)
        for j in range(TEXT_LAYERS):
            state = enc.step(state, j)
        out = enc.end(state)
        ids = enc.tokenize(SENTENCES)
        out_ids = enc.begin(ids)
        for _ in range(TEXT_LAYERS):
            out_ids = out_ids.step()
        out_ids = out_ids.end()
    for a, b in ((out, ref), (out_ids, ref)):
        torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)
        torch.testing.assert_close(a.pooled, b.pooled, atol=0, rtol=0)
        assert torch.equal(a.mask, b.mask)


def test_text_stream_order_is_enforced(ckpt):
    enc = text_encoder(ckpt)
    state = enc.begin(SENTENCES)
    with pytest.raises(ValueError, match='next block is 0'):
        enc.step(state, 1)
    state = enc.step(state, 0)
    with pytest.raises(ValueError, match='only 1 of 4'):
        enc.end(state)
    with pytest.raises(ValueError, match='another encoder'):
        text_encoder(ckpt).step(state, 1)
    with pytest.raises(ValueError, match='keep shape'):
        state.with_x(state.x[:, :3])


def test_text_positional_embedding_trainable():
    enc = text_encoder(train_pos_embed=True)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {'positional_embedding'}
    assert n_params(enc, trainable=True) == 77 * TEXT_WIDTH
    out = enc(SENTENCES)
    out.pooled.sum().backward()
    grad = enc.positional_embedding.grad
    assert grad[:CONTEXT].abs().sum() > 0 and (grad[CONTEXT:] == 0).all()
    assert n_params(OpenCLIPTextEncoder(context_length=17,
                                        train_pos_embed=True),
                    trainable=True) == 39_424  # ETRIS: 77 x 512


# --------------------------------------------------------------------------
# lock-step backbones with the bridge
# --------------------------------------------------------------------------
def test_lockstep_without_bridge_equals_plain_towers(ckpt):
    model = vit(ckpt).eval()
    enc = text_encoder(ckpt).eval()
    x = images()
    with torch.no_grad():
        out = model.forward_features(x, text_stream=enc.begin(SENTENCES))
        plain = enc(SENTENCES)
        feats = model(x)
    assert out.text is not None
    torch.testing.assert_close(out.text.tokens, plain.tokens, atol=0, rtol=0)
    torch.testing.assert_close(out.text.pooled, plain.pooled, atol=0, rtol=0)
    for a, b in zip(out.feats, feats):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert model.forward_features(x).text is None


def test_zero_init_bridge_equals_plain_towers(ckpt):
    model = vit(ckpt, adapters=[dict(TINY_BRIDGE, insert=(1, 3),
                                     zero_init_out=True)]).train()
    bare = vit(ckpt).eval()
    enc = text_encoder(ckpt)
    x = images()
    out = model.forward_features(x, text_stream=enc.begin(SENTENCES))
    plain = enc(SENTENCES)
    torch.testing.assert_close(out.text.tokens, plain.tokens)
    torch.testing.assert_close(out.text.pooled, plain.pooled)
    for a, b in zip(out.feats, bare(x)):
        torch.testing.assert_close(a, b)
    # ... and the bridge still gets gradients through both towers
    (out.feats[-1].sum() + out.text.pooled.sum()).backward()
    bridge = model.adapters.bridge
    assert bridge.stages[0].text_out.weight.grad.abs().max() > 0
    assert bridge.stages[0].out_scale.grad.abs().max() > 0


def manual_lockstep(model, enc, bridge, x, texts, insert, text_after):
    """Both towers by hand: image block i, then the text blocks of
    ``text_after[i]``, then the bridge stage of block i on the patches
    (CLS kept). Returns the levels (out_indices, ETRIS convention) and the
    final text features."""
    tokens, hw = model.prepare_tokens(x)
    ids = enc.tokenize(texts)
    t = enc.embed(ids)
    mask = enc.attn_mask
    feats, carry, j = [], None, 0
    for i in range(model.num_layers):
        tokens = model.blocks[i](tokens)
        for _ in range(text_after.get(i, 0)):
            t = enc.blocks[j](t, attn_mask=mask)
            j += 1
        if i in insert:
            cls = tokens[:, :1]
            out = bridge(insert.index(i), tokens[:, 1:], t, hw=hw,
                         carry=carry)
            tokens = torch.cat([cls, out.patches], 1)
            t, carry = out.text, out.carry
        if i in model.out_indices:
            p = tokens[:, 1:]
            if i == model.out_indices[-1]:
                p = model.ln_post(p) @ model.proj
            feats.append(p.transpose(1, 2).reshape(x.shape[0], -1, *hw))
    return feats, enc.finalize(t, ids)


@pytest.mark.parametrize('text_layers,text_after', [
    (TEXT_LAYERS, {0: 1, 1: 1, 2: 1, 3: 1}),  # equal depths: j = i
    (2, {1: 1, 3: 1}),  # 4 image vs 2 text blocks: j after 2j + 1
])
def test_bridged_clip_vit_equals_manual_lockstep(text_layers, text_after):
    torch.manual_seed(0)
    model = perturb_(vit(out_indices=(1, 2, 3), out_proj=True, adapters=[
        dict(TINY_BRIDGE, insert=(1, 3))
    ]), std=0.1).eval()
    enc = perturb_(text_encoder(text_cfg=dict(TINY_TEXT,
                                              layers=text_layers)),
                   std=0.1).eval()
    x = images()  # 3 x 5 grid
    with torch.no_grad():
        out = model.forward_features(x, text_stream=enc.begin(SENTENCES))
        feats, text = manual_lockstep(model, enc, model.adapters.bridge, x,
                                      SENTENCES, [1, 3], text_after)
    assert [f.shape for f in out.feats] == [(2, 32, 3, 5), (2, 32, 3, 5),
                                            (2, EMBED, 3, 5)]
    for a, b in zip(out.feats, feats):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out.text.tokens, text.tokens)
    torch.testing.assert_close(out.text.pooled, text.pooled)
    assert torch.equal(out.text.mask, text.mask)


def test_bridge_keeps_prefix_tokens_on_dinov2():
    """DINOv2 with 2 registers: P = 3 prefix tokens pass the bridge
    unchanged; the lock-step text equals the plain tower with a zero-init
    bridge."""
    cfg = dict(arch=dict(embed_dims=24, num_layers=4, num_heads=2),
               img_size=56, num_register_tokens=2, out_indices=(1, 3))
    torch.manual_seed(0)
    dino = DINOv2(**cfg, adapters=[dict(TINY_BRIDGE, insert=(1, 3))]).eval()
    enc = text_encoder().eval()
    x = images(H=42, W=70)
    tokens, hw = dino.prepare_tokens(x)
    run = dino.adapters.start_lockstep(enc.begin(SENTENCES), num_prefix=3,
                                       hw=hw)
    with torch.no_grad():
        for i in range(2):
            tokens = dino.blocks[i](tokens)
            new = run.after_block(i, tokens)
        assert torch.equal(new[:, :3], tokens[:, :3])
        assert (new[:, 3:] - tokens[:, 3:] >= 0).all()
        assert (new[:, 3:] != tokens[:, 3:]).any()
        out = dino.forward_features(x, text_stream=enc.begin(SENTENCES))
    assert [f.shape for f in out.feats] == [(2, 24, 3, 5)] * 2
    assert out.text.tokens.shape == (2, CONTEXT, TEXT_WIDTH)
    with pytest.raises(ValueError, match='needs a lock-step text stream'):
        dino(x)  # a stock EncoderDecoder cannot run a bridge

    torch.manual_seed(0)
    zero = DINOv2(**cfg, adapters=[dict(TINY_BRIDGE, insert=(1, 3),
                                        zero_init_out=True)]).eval()
    bare = DINOv2(**cfg).eval()
    bare.load_state_dict(
        {k: v for k, v in zero.state_dict().items()
         if not k.startswith('adapters.')})
    with torch.no_grad():
        z = zero.forward_features(x, text_stream=enc.begin(SENTENCES))
        plain = enc(SENTENCES)
        for a, b in zip(z.feats, bare(x)):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(z.text.tokens, plain.tokens)


# --------------------------------------------------------------------------
# the segmentor in bridge mode
# --------------------------------------------------------------------------
def tiny_etris_cfg(**backbone_kw) -> dict:
    backbone = dict(type='CLIPViT', vision_cfg=TINY_VISION, embed_dim=EMBED,
                    out_indices=(1, 2, 3), out_norm='last', out_proj=True,
                    trainable='frozen', train_pos_embed=True,
                    adapters=[dict(TINY_BRIDGE, insert=(1, 3))])
    backbone.update(backbone_kw)
    return dict(
        type='ReferringEncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor',
                               mean=[122.8, 116.7, 104.1],
                               std=[68.5, 66.6, 70.3], bgr_to_rgb=True,
                               size_divisor=16, pad_val=0, seg_pad_val=255),
        backbone=backbone,
        text_encoder=dict(type='OpenCLIPTextEncoder', text_cfg=TINY_TEXT,
                          embed_dim=EMBED, context_length=CONTEXT,
                          trainable='frozen', train_pos_embed=True),
        neck=dict(type='HierarchicalAlignNeck', in_channels=[32, 32, EMBED],
                  channels=16, text_dims=EMBED, num_heads=2,
                  coord_residual=False),
        decode_head=dict(type='CRISHead', in_channels=16, channels=8,
                         text_dims=TEXT_WIDTH, pooled_dims=EMBED,
                         num_decoder_layers=1, decoder_heads=2,
                         decoder_ffn_channels=16, up_channels=[8, 8]))


def etris_batch(model, H=48, W=80):
    g = torch.Generator().manual_seed(0)
    samples = []
    for text in SENTENCES:
        s = SegDataSample(metainfo=dict(text=text, ori_shape=(H, W),
                                        img_shape=(H, W), pad_shape=(H, W)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 2, (1, H, W),
                                                    generator=g))
        samples.append(s)
    inputs = [torch.randint(0, 256, (3, H, W), generator=g,
                            dtype=torch.uint8) for _ in samples]
    return dict(inputs=inputs, data_samples=samples)


def test_tiny_etris_segmentor_loss_backward_predict(monkeypatch):
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(tiny_etris_cfg())
    model.init_weights()
    assert model.bridge_mode
    model.train()
    seen = {}
    real_loss = model.decode_head.loss

    def spy(feats, text, *args, **kw):
        seen['text'] = text
        return real_loss(feats, text, *args, **kw)

    monkeypatch.setattr(model.decode_head, 'loss', spy)
    data = model.data_preprocessor(etris_batch(model), training=True)
    losses = model(**data, mode='loss')
    assert set(losses) == {'loss_mask', 'acc_seg'}
    losses['loss_mask'].backward()
    # the head got the bridge-modified text, not the plain tower's
    plain = model.text_encoder(SENTENCES)
    assert not torch.allclose(seen['text'].tokens, plain.tokens)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in model.named_parameters()
        if not n.startswith(('backbone.', 'text_encoder.'))
        or n.startswith('backbone.adapters.')
    } | {'backbone.positional_embedding',
         'text_encoder.positional_embedding'}
    assert trainable == expected
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected
    model.eval()
    data = model.data_preprocessor(etris_batch(model), training=False)
    with torch.no_grad():
        preds = model(**data, mode='predict')
        logits = model(**data, mode='tensor')
    assert preds[0].pred_sem_seg.data.shape == (1, 48, 80)
    assert logits.shape == (2, 1, 12, 20)  # stride 4 of the 3 x 5 grid


class _NoStreamTextEncoder(OpenCLIPTextEncoder):
    """A text encoder without the stream API (for the error test)."""
    begin = None


def test_bridge_without_text_stream_api_raises():
    MODELS.register_module(name='_NoStreamTextEncoder',
                           module=_NoStreamTextEncoder, force=True)
    init_default_scope('mmseg')
    cfg = tiny_etris_cfg()
    cfg['text_encoder']['type'] = '_NoStreamTextEncoder'
    with pytest.raises(ValueError, match='no stream API'):
        MODELS.build(cfg)


# --------------------------------------------------------------------------
# the full-size ETRIS ViT-B/16 count (build only)
# --------------------------------------------------------------------------
def test_full_etris_vit_b16_trainable_parameters():
    init_default_scope('mmseg')
    model = MODELS.build(dict(
        type='ReferringEncoderDecoder',
        backbone=dict(type='CLIPViT', model_name='ViT-B-16',
                      quick_gelu=True, pos_embed_size=26,
                      out_indices=(3, 7, 11), out_proj=True,
                      trainable='frozen', train_pos_embed=True,
                      adapters=[dict(type='ETRISBridger', insert=(3, 7, 11),
                                     text_dims=512, hidden_dims=64,
                                     num_heads=8)]),
        text_encoder=dict(type='OpenCLIPTextEncoder', model_name='ViT-B-16',
                          quick_gelu=True, context_length=17,
                          trainable='frozen', train_pos_embed=True),
        neck=dict(type='HierarchicalAlignNeck', in_channels=[768, 768, 512],
                  coord_residual=False),
        decode_head=dict(type='CRISHead')))
    parts = {
        'bridger': n_params(model.backbone.adapters, trainable=True),
        'vis_pos': model.backbone.positional_embedding.numel(),
        'text_pos': model.text_encoder.positional_embedding.numel(),
        'neck': n_params(model.neck, trainable=True),
        'head': n_params(model.decode_head, trainable=True),
    }
    assert parts == dict(bridger=598_592, vis_pos=519_936, text_pos=39_424,
                         neck=9_983_488, head=7_899_136 + 4_788_737)
    assert model.backbone.out_channels == (768, 768, 512)
    assert n_params(model, trainable=True) == 23_829_313
