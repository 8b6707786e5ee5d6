"""DETRIS parts: DenseMoC, the Dense Aligner (DA), the Text Adapter (TA) and
the adapter slots that place them (``parallel_mlp`` in DINOv2,
``parallel_mlp_text`` in the CLIP text tower).

The expected values are computed here from the formulas of PEERS.md §3
(parameter counts built from DETRIS's modules, block equations written out
by hand), not from the code under test.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmseg.registry import MODELS
from mmseg_sera.models.adapters import (DenseMoC, DETRISDenseAligner,
                                        DETRISTextAdapter)
from mmseg_sera.models.backbones.dinov2 import DINOv2
from mmseg_sera.models.structures import TextFeatures
from mmseg_sera.models.text_encoders.clip_text import (OpenCLIPTextEncoder,
                                                       build_causal_mask)

TINY_VIT = dict(embed_dims=32, num_layers=4, num_heads=2)
TEXT_DIMS = 16
# a tiny DA: d = 16 (D-MoC widths 8 / 4 / 4, bottleneck 1)
TINY_DA = dict(type='DETRISDenseAligner', hidden_dims=16, attn_dims=16,
               num_heads=2, text_dims=TEXT_DIMS)
TINY_TEXT = dict(width=64, layers=3, heads=2)
SENTENCES = ['the man in the red shirt on the left', 'a dog']


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct random values for every parameter (LayerScale and norms
    included, so that nothing is an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith('gamma'):
                p.copy_(0.5 * r)
            elif 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model


def text_features(B: int = 2, L: int = 6, dims: int = TEXT_DIMS,
                  seed: int = 1) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[-1, L - 2:] = True  # the last sentence has two padding tokens
    return TextFeatures(tokens=torch.randn(B, L, dims, generator=g),
                        mask=mask,
                        pooled=torch.randn(B, dims, generator=g))


def tiny_da(**kw) -> DETRISDenseAligner:
    cfg = dict(TINY_DA, embed_dims=32)
    cfg.update(kw)
    return randomize_(MODELS.build(cfg), seed=3).eval()


def manual_mha(mha: nn.MultiheadAttention, q, kv, key_padding_mask=None):
    """Batch-first multi-head attention written out:
    ``out_proj(concat_h softmax(Q_h K_h^T / sqrt(dh)) V_h)``."""
    E, H = mha.embed_dim, mha.num_heads
    dh = E // H
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(x):  # B x n x E -> B x H x n x dh
        return x.reshape(x.shape[0], x.shape[1], H, dh).transpose(1, 2)

    Q, K, V = (heads(F.linear(q, wq, bq)), heads(F.linear(kv, wk, bk)),
               heads(F.linear(kv, wv, bv)))
    logits = Q @ K.transpose(-2, -1) / math.sqrt(dh)
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None],
                                    float('-inf'))
    alpha = logits.softmax(-1)
    out = (alpha @ V).transpose(1, 2).reshape(q.shape[0], q.shape[1], E)
    return mha.out_proj(out)


# --------------------------------------------------------------------------
# DenseMoC
# --------------------------------------------------------------------------
def test_dense_moc_parameter_counts():
    m2 = DenseMoC(dims=128)
    assert n_params(m2) == 20656
    assert [n_params(b) for b in m2.branches] == [8384, 3960, 8312]
    m1 = DenseMoC(dims=64, ndim=1, inner_residual=False)
    assert n_params(m1) == 3608
    assert [n_params(b) for b in m1.branches] == [2144, 636, 828]
    # D-MoC widths: 1x1 -> 64; 1x1 (192 -> 8) then 3x3 -> 32;
    # 1x1 (224 -> 8) then 5x5 -> 32; BN eps 1e-3, convs with bias
    convs = [m for m in m2.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0])
            for c in convs] == [(128, 64, 1), (192, 8, 1), (8, 32, 3),
                                (224, 8, 1), (8, 32, 5)]
    assert all(c.bias is not None for c in convs)
    assert all(b.eps == 1e-3 for b in m2.modules()
               if isinstance(b, nn.BatchNorm2d))


@pytest.mark.parametrize('ndim, shape', [(2, (2, 16, 3, 5)), (1, (2, 16, 7))])
@pytest.mark.parametrize('inner_residual', [True, False])
def test_dense_moc_is_dense(ndim, shape, inner_residual):
    """b1 = B1(X); b2 = B2([X, b1]); b3 = B3([X, b1, b2]);
    out = [b1, b2, b3] (+ X)."""
    m = randomize_(DenseMoC(dims=16, ndim=ndim,
                            inner_residual=inner_residual)).eval()
    x = torch.randn(*shape)
    br = m.branches
    b1 = br[0](x)
    b2 = br[1](torch.cat([x, b1], 1))
    b3 = br[2](torch.cat([x, b1, b2], 1))
    expected = torch.cat([b1, b2, b3], 1) + (x if inner_residual else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected)
    assert m(x).shape == shape


def test_dense_moc_errors():
    with pytest.raises(ValueError, match='bottleneck'):
        DenseMoC(dims=8)  # 8 / 16 channels
    with pytest.raises(ValueError, match='sum to 1'):
        DenseMoC(dims=16, ratios=(1 / 2, 1 / 4, 1 / 8))
    with pytest.raises(ValueError, match='ndim'):
        DenseMoC(dims=16, ndim=3)
    with pytest.raises(ValueError, match='expects'):
        DenseMoC(dims=16)(torch.randn(2, 16, 5))


# --------------------------------------------------------------------------
# Dense Aligner
# --------------------------------------------------------------------------
def test_dense_aligner_parameter_counts():
    da = DETRISDenseAligner(embed_dims=768)
    assert n_params(da) == 382896
    assert n_params(da.fc1) == 98432 and n_params(da.fc2) == 99072
    assert n_params(da.dmoc) == 20656
    cross = (da.img_proj, da.text_proj, da.cross_attn, da.back_proj)
    assert [n_params(m) for m in cross] == [16512, 65664, 66048, 16512]
    assert sum(n_params(m) for m in cross) == 164736
    assert n_params(DETRISDenseAligner(embed_dims=1024)) == 448688
    assert n_params(DETRISDenseAligner(embed_dims=1024,
                                       hidden_dims=384)) == 1201680
    assert da.cross_attn.dropout == 0.1 and da.cross_attn.num_heads == 8
    assert da.dmoc.inner_residual


def test_dense_aligner_init():
    torch.manual_seed(0)
    da = DETRISDenseAligner(embed_dims=768)
    for lin in (da.fc1, da.fc2, da.img_proj, da.text_proj, da.back_proj,
                da.cross_attn.out_proj):
        # trunc_normal_(std=.02) as in DINOv2: cut at +-2 (absolute), so
        # in effect N(0, 0.02^2)
        assert abs(lin.weight.std().item() - 0.02) < 0.003
        assert abs(lin.weight.mean().item()) < 0.003
        assert not lin.bias.any()
    for conv in (m for m in da.modules() if isinstance(m, nn.Conv2d)):
        fan_in = conv.weight[0].numel()
        want = math.sqrt(2 / fan_in)  # kaiming-normal, fan_in, ReLU
        assert abs(conv.weight.std().item() / want - 1) < 0.15, conv
        assert not conv.bias.any()
    # in_proj: xavier-uniform over the packed 3a x a matrix, zero bias
    w = da.cross_attn.in_proj_weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert not da.cross_attn.in_proj_bias.any()
    for bn in (m for m in da.modules() if isinstance(m, nn.BatchNorm2d)):
        assert (bn.weight == 1).all() and not bn.bias.any()
    # init_weights (mmengine) keeps the DETRIS init
    torch.manual_seed(1)
    da.init_weights()
    assert abs(da.fc1.weight.std().item() - 0.02) < 0.003


def test_dense_aligner_formula_non_square():
    """Patch token: fc2(x0 + W_back(MHA(W_img M, W_txt T))); prefix token:
    fc2(2 x0); on a 3 x 5 grid with P = 5."""
    da = tiny_da()
    P, hw = 5, (3, 5)
    h = torch.randn(2, P + 15, 32)
    text = text_features()
    with torch.no_grad():
        out = da(h, hw=hw, text=text, num_prefix=P)
        x0 = F.relu(da.fc1(h))
        grid = x0[:, P:].transpose(1, 2).reshape(2, 16, 3, 5)
        m = da.dmoc(grid).flatten(2).transpose(1, 2)
        a = manual_mha(da.cross_attn, da.img_proj(m),
                       da.text_proj(text.tokens))  # no key padding mask
        patches = da.fc2(x0[:, P:] + da.back_proj(a))
        prefix = da.fc2(2 * x0[:, :P])
    assert out.shape == h.shape
    torch.testing.assert_close(out[:, P:], patches)
    torch.testing.assert_close(out[:, :P], prefix)
    # the grid is row-major h x w: a transposed (5 x 3) reading differs
    with torch.no_grad():
        other = da(h, hw=(5, 3), text=text, num_prefix=P)
    assert not torch.allclose(other[:, P:], out[:, P:])


class FixedAttention(nn.Module):
    """Stands in for the DA's MHA: records the query, returns a fixed
    output (attention weights held, whatever the query)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.queries = []

    def forward(self, q, k, v, key_padding_mask=None, need_weights=False):
        self.queries.append(q.detach().clone())
        return self.out, None


@pytest.mark.parametrize('cross_residual', [False, True])
def test_dense_aligner_attention_replaces_conv_features(cross_residual):
    """With the attention held fixed, scaling the D-MoC output changes
    only the query: the patch outputs stay the same (DETRIS replaces M by
    the attention output). ``cross_residual=True`` adds M back."""
    da = tiny_da(cross_residual=cross_residual)
    P, hw = 5, (3, 5)
    h, text = torch.randn(2, P + 15, 32), text_features()
    fixed = FixedAttention(torch.randn(2, 15, 16))
    da.cross_attn = fixed
    with torch.no_grad():
        ref = da(h, hw=hw, text=text, num_prefix=P)
        handle = da.dmoc.register_forward_hook(lambda m, i, o: 3 * o)
        scaled = da(h, hw=hw, text=text, num_prefix=P)
        handle.remove()
    # the convs do feed the query ...
    assert not torch.allclose(fixed.queries[0], fixed.queries[1])
    torch.testing.assert_close(scaled[:, :P], ref[:, :P], rtol=0, atol=0)
    if cross_residual:
        assert not torch.allclose(scaled[:, P:], ref[:, P:])
    else:  # ... but not the output
        torch.testing.assert_close(scaled[:, P:], ref[:, P:], rtol=0, atol=0)
        with torch.no_grad():
            x0 = F.relu(da.fc1(h))
            want = da.fc2(x0[:, P:] + da.back_proj(fixed.out))
        torch.testing.assert_close(ref[:, P:], want)


def test_dense_aligner_prefix_ignores_patches_and_text():
    da = tiny_da()
    P, hw = 5, (2, 3)
    h = torch.randn(2, P + 6, 32)
    with torch.no_grad():
        a = da(h, hw=hw, text=text_features(seed=1), num_prefix=P)
        h2 = h.clone()
        h2[:, P:] += 1
        b = da(h2, hw=hw, text=text_features(seed=2), num_prefix=P)
    torch.testing.assert_close(a[:, :P], b[:, :P], rtol=0, atol=0)
    torch.testing.assert_close(a[:, :P], da.fc2(2 * F.relu(da.fc1(h[:, :P]))))


@pytest.mark.parametrize('key_padding', [False, True])
def test_dense_aligner_key_padding_option(key_padding):
    """DETRIS attends to padded words (default); ``key_padding=True``
    masks them."""
    da = tiny_da(key_padding=key_padding)
    P, hw = 1, (2, 3)
    h, text = torch.randn(2, P + 6, 32), text_features()
    text2 = TextFeatures(tokens=text.tokens.clone(), mask=text.mask,
                         pooled=text.pooled)
    text2.tokens[text.mask] += 5.0  # change the padded words only
    with torch.no_grad():
        a = da(h, hw=hw, text=text, num_prefix=P)
        b = da(h, hw=hw, text=text2, num_prefix=P)
        want = manual_mha(
            da.cross_attn,
            da.img_proj(da.dmoc(F.relu(da.fc1(h[:, P:])).transpose(
                1, 2).reshape(2, 16, 2, 3)).flatten(2).transpose(1, 2)),
            da.text_proj(text.tokens),
            text.mask if key_padding else None)
        want = da.fc2(F.relu(da.fc1(h[:, P:])) + da.back_proj(want))
    torch.testing.assert_close(a[:, P:], want)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # no padding
    assert torch.equal(a[1], b[1]) == key_padding


def test_dense_aligner_pooled_text_source():
    da = tiny_da(text_source='pooled')
    P, hw = 1, (2, 2)
    h, text = torch.randn(2, P + 4, 32), text_features()
    other_tokens = TextFeatures(tokens=torch.randn_like(text.tokens),
                                mask=text.mask, pooled=text.pooled)
    other_pooled = TextFeatures(tokens=text.tokens, mask=text.mask,
                                pooled=torch.randn_like(text.pooled))
    with torch.no_grad():
        a = da(h, hw=hw, text=text, num_prefix=P)
        b = da(h, hw=hw, text=other_tokens, num_prefix=P)
        c = da(h, hw=hw, text=other_pooled, num_prefix=P)
        # one key: the attention output is the projected value of it
        v = F.linear(da.text_proj(text.pooled),
                     da.cross_attn.in_proj_weight.chunk(3)[2],
                     da.cross_attn.in_proj_bias.chunk(3)[2])
        y = da.back_proj(da.cross_attn.out_proj(v))[:, None]
        want = da.fc2(F.relu(da.fc1(h[:, P:])) + y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[:, P:], c[:, P:])
    torch.testing.assert_close(a[:, P:], want)
    with pytest.raises(ValueError, match='key_padding'):
        DETRISDenseAligner(embed_dims=32, text_source='pooled',
                           key_padding=True)
    with pytest.raises(ValueError, match='text_source'):
        DETRISDenseAligner(embed_dims=32, text_source='sentence')


def test_dense_aligner_input_errors():
    da = tiny_da()
    h = torch.randn(2, 1 + 6, 32)
    with pytest.raises(ValueError, match='give 9 tokens'):
        da(h, hw=(2, 4), text=text_features(), num_prefix=1)
    with pytest.raises(ValueError, match='needs text'):
        da(h, hw=(2, 3), text=None, num_prefix=1)
    with pytest.raises(ValueError, match='text.tokens'):
        da(h, hw=(2, 3), text=text_features(dims=8), num_prefix=1)


# --------------------------------------------------------------------------
# Text Adapter
# --------------------------------------------------------------------------
def test_text_adapter_parameter_count_and_parts():
    ta = DETRISTextAdapter(embed_dims=512)
    assert n_params(ta) == 69720
    assert n_params(ta.fc1) == 32832 and n_params(ta.fc2) == 33280
    assert n_params(ta.dmoc) == 3608
    assert ta.dmoc.ndim == 1 and not ta.dmoc.inner_residual
    assert 6 * n_params(ta) == 418320


def test_text_adapter_formula():
    """x0 = ReLU(fc1 x); U = [x0_SOT, DMoC_1d(x0_1..L-1)] + x0;
    out = fc2 U."""
    ta = randomize_(DETRISTextAdapter(embed_dims=64, hidden_dims=16)).eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        out = ta(x)
        x0 = F.relu(ta.fc1(x))
        m = ta.dmoc(x0[:, 1:].transpose(1, 2)).transpose(1, 2)
        want = ta.fc2(torch.cat([x0[:, :1], m], 1) + x0)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(out[:, 0], ta.fc2(2 * x0[:, 0]))
        # SOT skips the convs; the convs are not causal (word 2 sees 3)
        x2 = x.clone()
        x2[:, 3] += 1
        out2 = ta(x2)
    torch.testing.assert_close(out2[:, 0], out[:, 0], rtol=0, atol=0)
    assert not torch.allclose(out2[:, 2], out[:, 2])


# --------------------------------------------------------------------------
# DINOv2 parallel_mlp slot
# --------------------------------------------------------------------------
def tiny_vit(**kw) -> DINOv2:
    cfg = dict(arch=TINY_VIT, img_size=14 * 6, num_register_tokens=4,
               out_indices=(1, 3))
    cfg.update(kw)
    return DINOv2(**cfg)


def da_slot(insert=(1, 3), **kw):
    return [dict(TINY_DA, insert=insert, slot='parallel_mlp', scale=0.2,
                 **kw)]


def test_parallel_slot_gets_ln2_and_sits_inside_gamma2():
    m = randomize_(tiny_vit(adapters=da_slot())).eval()
    blk = m.blocks[1]
    gamma = torch.linspace(-1.5, 2.0, 32)
    with torch.no_grad():
        blk.ls2.gamma.copy_(gamma)
    da = m.adapters.adapter('parallel_mlp', 1)
    assert isinstance(da, DETRISDenseAligner)
    seen = {}
    hooks = [
        blk.register_forward_pre_hook(
            lambda mod, args: seen.update(z=args[0])),
        blk.register_forward_hook(
            lambda mod, args, out: seen.update(out=out)),
        da.register_forward_pre_hook(
            lambda mod, args, kw: seen.update(h=args[0], kw=kw),
            with_kwargs=True),
    ]
    x, text = torch.randn(2, 3, 42, 70), text_features()  # 3 x 5 grid
    with torch.no_grad():
        m(x, text)
        for hk in hooks:
            hk.remove()
        z = seen['z']
        z1 = z + blk.ls1.gamma * blk.attn(blk.norm1(z))
        h = blk.norm2(z1)
        torch.testing.assert_close(seen['h'], h, rtol=0, atol=0)
        assert seen['kw']['hw'] == (3, 5) and seen['kw']['num_prefix'] == 5
        assert seen['kw']['text'] is text
        a = da(h, hw=(3, 5), text=text, num_prefix=5)
        want = z1 + gamma * (blk.mlp(h) + 0.2 * a)
        outside = z1 + gamma * blk.mlp(h) + 0.2 * a
    torch.testing.assert_close(seen['out'], want)
    assert not torch.allclose(seen['out'], outside)


def test_dinov2_with_dense_aligners_equals_manual_loop():
    """Non-square 3 x 5 grid; DA in blocks 1 and 3 (scale 0.2); block
    outputs 1 (raw) and 3 (final norm)."""
    m = randomize_(tiny_vit(adapters=da_slot())).eval()
    assert m.adapters.indices('parallel_mlp') == (1, 3)
    x, text = torch.randn(2, 3, 42, 70), text_features()
    with torch.no_grad():
        out = m.forward_features(x, text)
        z, hw = m.prepare_tokens(x)
        feats = []
        for i, blk in enumerate(m.blocks):
            z = z + blk.ls1.gamma * blk.attn(blk.norm1(z))
            h = blk.norm2(z)
            update = blk.mlp(h)
            if i in (1, 3):
                da = m.adapters['parallel_mlp'][str(i)]
                update = update + 0.2 * da(h, hw=hw, text=text, num_prefix=5)
            z = z + blk.ls2.gamma * update
            if i in (1, 3):
                t = m.norm(z) if i == 3 else z
                feats.append(t[:, 5:].transpose(1, 2).reshape(2, 32, 3, 5))
    assert hw == (3, 5)
    assert len(out.feats) == 2 and out.routing == {}
    for a, b in zip(out.feats, feats):
        torch.testing.assert_close(a, b)
    # and the adapters matter
    plain = tiny_vit()
    plain.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        ref = plain.eval()(x)
    assert not torch.allclose(ref[0], out.feats[0])


def test_frozen_dinov2_trains_only_adapters():
    m = randomize_(tiny_vit(trainable='frozen', adapter_indices=(0, ),
                            adapter_cfg=dict(type='SERAAdapter',
                                             text_dims=TEXT_DIMS,
                                             hidden_dims=8, num_heads=2),
                            adapters=da_slot()))
    names = {n for n, _ in m.named_parameters()}
    adapters = {n for n in names if n.startswith('adapters.')}
    assert 'adapters.parallel_mlp.1.fc1.weight' in adapters
    assert 'adapters.0.down_proj.weight' in adapters  # legacy layout kept
    assert {n for n, p in m.named_parameters() if p.requires_grad} == adapters
    m.train()
    assert not m.blocks.training and not m.norm.training
    for mod in m.adapters.modules():
        assert mod.training
    m.eval()
    out = m(torch.randn(2, 3, 42, 56), text_features())
    sum((f * torch.randn_like(f)).sum() for f in out).backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == adapters
    # a DINOv2 checkpoint (no adapters) loads into the adapted model
    assert all(not k.startswith('adapters.')
               for k, _ in m.backbone_named_parameters())


def test_with_cp_passes_parallel_branches():
    torch.manual_seed(0)
    ref = randomize_(tiny_vit(trainable='frozen',
                              adapters=da_slot(attn_drop=0.0)))
    cp = tiny_vit(trainable='frozen', with_cp=True,
                  adapters=da_slot(attn_drop=0.0))
    cp.load_state_dict(ref.state_dict())
    x, text = torch.randn(2, 3, 42, 56), text_features()
    outs, grads = [], []
    for m in (ref, cp):
        m.train()
        out = m(x, text)
        sum(f.sum() for f in out).backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters()
                      if p.grad is not None})
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert set(grads[0]) == set(grads[1]) == {
        n for n, _ in ref.named_parameters() if n.startswith('adapters.')}
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


# --------------------------------------------------------------------------
# CLIP text tower parallel_mlp_text slot
# --------------------------------------------------------------------------
def tiny_text(**kw) -> OpenCLIPTextEncoder:
    cfg = dict(text_cfg=TINY_TEXT, embed_dim=32, context_length=12,
               trainable='full')
    cfg.update(kw)
    return OpenCLIPTextEncoder(**cfg)


TA_SLOT = [dict(type='DETRISTextAdapter', insert=(0, 2), scale=0.2,
                hidden_dims=16)]


def text_pair(**kw):
    """A plain and an adapted tower with the same (perturbed) weights."""
    torch.manual_seed(0)
    plain = tiny_text(**kw)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapted = tiny_text(adapters=TA_SLOT, **kw)
    missing, unexpected = adapted.load_state_dict(plain.state_dict(),
                                                  strict=False)
    assert not unexpected and missing
    assert all(k.startswith('adapters.parallel_mlp_text.') for k in missing)
    return plain.eval(), adapted.eval()


def test_text_adapter_with_zero_output_equals_plain_tower():
    plain, adapted = text_pair()
    for j in (0, 2):
        ta = adapted.adapters.adapter('parallel_mlp_text', j)
        randomize_(ta, seed=j)
        with torch.no_grad():
            ta.fc2.weight.zero_()
            ta.fc2.bias.zero_()
    with torch.no_grad():
        a, b = plain(SENTENCES), adapted(SENTENCES)
    for f in ('tokens', 'pooled'):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0,
                                   atol=0)


def test_text_adapter_in_tower_equals_manual_blocks():
    """x = x + attn(ln_1 x); x = x + mlp(ln_2 x) + 0.2 TA(x) in blocks 0
    and 2 (TA reads the un-normalised stream), plain block 1."""
    plain, adapted = text_pair()
    for j in (0, 2):
        randomize_(adapted.adapters.adapter('parallel_mlp_text', j), seed=j)
    ids = adapted.tokenize(SENTENCES)
    with torch.no_grad():
        out = adapted.forward_tokens(ids)
        ref = plain.forward_tokens(ids)
        x = adapted.embed(ids)
        mask = build_causal_mask(12)
        for j, blk in enumerate(adapted.blocks):
            assert isinstance(blk.ls_1, nn.Identity)  # CLIP: no LayerScale
            q = blk.ln_1(x)
            x = x + blk.attn(q, q, q, attn_mask=mask, need_weights=False)[0]
            y = x + blk.mlp(blk.ln_2(x))
            if j in (0, 2):
                ta = adapted.adapters['parallel_mlp_text'][str(j)]
                y = y + 0.2 * ta(x)
            x = y
        want = adapted.finalize(x, ids)
    torch.testing.assert_close(out.tokens, want.tokens)
    torch.testing.assert_close(out.pooled, want.pooled)
    assert not torch.allclose(out.tokens, ref.tokens)


def test_frozen_text_tower_trains_only_text_adapters():
    enc = tiny_text(trainable='frozen', adapters=TA_SLOT)
    names = {n for n, _ in enc.named_parameters()}
    adapters = {n for n in names if n.startswith('adapters.')}
    assert 'adapters.parallel_mlp_text.2.fc1.weight' in adapters
    assert {n for n, p in enc.named_parameters()
            if p.requires_grad} == adapters
    enc.train()
    assert not enc.transformer.training and not enc.ln_final.training
    assert all(m.training for m in enc.adapters.modules())
    enc.eval()
    assert not any(m.training for m in enc.adapters.modules())
    enc.train()
    out = enc(SENTENCES)
    assert out.pooled.requires_grad
    (out.tokens.sum() + out.pooled.sum()).backward()
    got = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert got == adapters


def test_text_tower_with_adapters_loads_clip_checkpoint(tmp_path):
    plain = tiny_text()
    path = tmp_path / 'clip_text.pth'
    torch.save(plain.state_dict(), path)
    enc = tiny_text(adapters=TA_SLOT, pretrained=str(path))
    enc.init_weights()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)


# --------------------------------------------------------------------------
# slot errors
# --------------------------------------------------------------------------
SERA = dict(type='SERAAdapter', text_dims=TEXT_DIMS, hidden_dims=8,
            num_heads=2)


@pytest.mark.parametrize('adapters, match', [
    ([dict(SERA, insert=(1, ), slot='parallel_mlp_text')],
     "DINOv2 has no 'parallel_mlp_text' slot"),
    ([dict(TINY_DA, insert=(1, ), slot='diagonal')],
     "cannot go in slot 'diagonal'"),
    ([dict(SERA, insert=(1, ), slot='diagonal')], "unknown slot kind"),
    ([dict(SERA, insert=(1, ), slot='bridge')], 'not a bridge adapter'),
    ([dict(type='DETRISTextAdapter', insert=(1, ))],
     "no 'parallel_mlp_text' slot"),
    ([dict(TINY_DA, slot='parallel_mlp', insert=(4, ))], 'out of range'),
    ([dict(TINY_DA, slot='parallel_mlp', insert=(-5, ))], 'out of range'),
    ([dict(TINY_DA, insert=(2, ), slot='parallel_mlp')],
     'after the last block'),  # out_indices ends at block 1
    ([dict(TINY_DA, insert=(1, -3))], 'duplicate'),
    ([dict(TINY_DA, insert=(0, )), dict(TINY_DA, insert=(0, ))],
     'duplicate'),
    ([dict(SERA, insert=(0, ), slot='post_block')], 'duplicate'),
    ([dict(insert=(1, ), slot='parallel_mlp')], "no 'type'"),
    ([dict(TINY_DA)], "no 'insert'"),
    ([dict(TINY_DA, insert=())], "empty 'insert'"),
    ([dict(SERA, insert=(1, ))], "needs a 'slot'"),
    ([dict(SERA, insert=(1, ), slot='post_block', scale=0.5)],
     "'scale' applies"),
    ([dict(type='NoSuchAdapter', insert=(1, ))], 'unknown adapter type'),
])
def test_dinov2_slot_errors(adapters, match):
    with pytest.raises(ValueError, match=match):
        tiny_vit(out_indices=(0, 1), adapter_indices=(0, ), adapter_cfg=SERA,
                 adapters=adapters)


@pytest.mark.parametrize('adapters, match', [
    ([dict(TINY_DA, insert=(1, ))], "no 'parallel_mlp' slot"),
    ([dict(SERA, insert=(1, ), slot='post_block')], "no 'post_block' slot"),
    ([dict(type='DETRISTextAdapter', insert=(3, ))], 'out of range'),
    ([dict(type='DETRISTextAdapter', insert=(0, 0))], 'duplicate'),
    ([dict(insert=(0, ))], "no 'type'"),
])
def test_text_encoder_slot_errors(adapters, match):
    with pytest.raises(ValueError, match=match):
        tiny_text(adapters=adapters)


def test_registry_names():
    for name in ('DenseMoC', 'DETRISDenseAligner', 'DETRISTextAdapter'):
        assert MODELS.get(name) is not None
    assert DETRISDenseAligner.slot_kind == 'parallel_mlp'
    assert DETRISTextAdapter.slot_kind == 'parallel_mlp_text'
    m = MODELS.build(dict(type='DenseMoC', dims=16, ndim=1))
    assert isinstance(m, DenseMoC) and m.out_dims == 16
