"""DINOv2 backbone: shapes, padding, out norms, adapter slots, freezing,
checkpointing, pretrained loading."""
import copy

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModule

from mmseg.registry import MODELS
from mmseg_sera.models.backbones.dinov2 import DINOv2
from mmseg_sera.models.structures import (AdapterOutput, BackboneOutput,
                                          TextFeatures)

TINY = dict(embed_dims=32, num_layers=4, num_heads=2)
TEST_ADAPTER = 'DINOv2TestAdapter'


@MODELS.register_module(name=TEST_ADAPTER, force=True)
class _TestAdapter(BaseModule):
    """Bottleneck adapter whose output projection starts at zero.

    Checks the slot contract: patch tokens only (N = h * w), hw and text
    passed through. Returns B x 2 routing and a constant aux loss.
    """

    def __init__(self, embed_dims: int, hidden_dims: int = 8,
                 text_dims: int = 16) -> None:
        super().__init__()
        self.down = nn.Linear(embed_dims, hidden_dims)
        self.text_proj = nn.Linear(text_dims, hidden_dims)
        self.up = nn.Linear(hidden_dims, embed_dims)
        self.route = nn.Linear(hidden_dims, 2)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.calls = []

    def forward(self, x, hw, text=None):
        assert x.shape[1] == hw[0] * hw[1]
        self.calls.append((tuple(x.shape), hw, text is not None))
        y = torch.relu(self.down(x))
        if text is not None:
            y = y + self.text_proj(text.pooled)[:, None]
        return AdapterOutput(
            tokens=x + self.up(y),
            routing=self.route(y.mean(1)).softmax(-1),
            aux_losses=dict(loss_test=x.new_tensor(1.0)))


def tiny(**kwargs) -> DINOv2:
    cfg = dict(arch=TINY, img_size=14 * 6, out_indices=(0, 1, 3))
    cfg.update(kwargs)
    return DINOv2(**cfg)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a distinct random value (LayerScale included,
    so that blocks are far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.1 * r)
            elif name.endswith('gamma'):
                p.copy_(0.5 * r)
            else:
                p.copy_(0.1 * r)
    return model


def text_features(B: int, L: int = 5, dims: int = 16) -> TextFeatures:
    return TextFeatures(
        tokens=torch.randn(B, L, dims),
        mask=torch.zeros(B, L, dtype=torch.bool),
        pooled=torch.randn(B, dims))


def test_registry_and_properties():
    m = MODELS.build(dict(type='DINOv2', arch=TINY, num_register_tokens=4))
    assert isinstance(m, DINOv2)
    assert m.embed_dims == 32 and m.num_prefix_tokens == 5
    assert m.out_indices == (3, )
    # defaults follow the official code: reg4 -> size + antialias
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.0, True)
    m0 = tiny()
    assert (m0.interpolate_offset, m0.interpolate_antialias) == (0.1, False)
    m1 = tiny(interpolate_offset=0.0, interpolate_antialias=True)
    assert (m1.interpolate_offset, m1.interpolate_antialias) == (0.0, True)
    keys = set(dict(m.named_parameters()))
    for k in ('cls_token', 'register_tokens', 'pos_embed',
              'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
              'blocks.0.ls1.gamma', 'blocks.3.mlp.fc2.bias', 'norm.weight'):
        assert k in keys
    assert m.pos_embed.shape == (1, 1 + 37 * 37, 32)
    assert DINOv2.arch_settings['giant']['ffn_type'] == 'swiglu'
    assert DINOv2._resolve_arch('g')['embed_dims'] == 1536


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='huge'), 'Unknown DINOv2 arch'),
    (dict(arch=dict(embed_dims=32)), 'lacks'),
    (dict(out_indices=(4, )), 'out of range'),
    (dict(out_indices=(1, -3)), 'duplicates'),
    (dict(trainable='half'), 'trainable'),
    (dict(out_norm='first'), 'out_norm'),
    (dict(pos_embed_init='zeros'), 'pos_embed_init'),
    (dict(adapter_indices=(1, ), adapter_cfg=None), 'adapter_cfg'),
    (dict(out_indices=(1, ), adapter_indices=(2, ),
          adapter_cfg=dict(type=TEST_ADAPTER)), 'after the last out index'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_sincos_pos_embed_init():
    from mmseg_sera.models.position import sine_position_2d
    m = tiny(img_size=112, pos_embed_init='sincos', trainable='full')
    assert m.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert m.pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(32))
    torch.testing.assert_close(m.pos_embed[0, 1:],
                               sine_position_2d(8, 8, 32))
    # patch (row 0, col 1) differs from (1, 0): the code tells x from y
    assert not torch.allclose(m.pos_embed[0, 2], m.pos_embed[0, 9])
    # the official init stays the default
    assert tiny(img_size=112).pos_embed[0, 1:].abs().max() < 0.1


def test_bad_input_shape():
    with pytest.raises(ValueError, match='B x 3 x H x W'):
        tiny()(torch.randn(1, 1, 28, 28))


def test_non_square_shapes_and_padding():
    m = randomize_(tiny(num_register_tokens=4, out_indices=(0, -1))).eval()
    x = torch.randn(2, 3, 70, 98)  # 5 x 7 grid
    feats = m(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 5, 7)] * 2
    # 65 x 90 is zero-padded at the bottom/right to 70 x 98
    x_small = x[:, :, :65, :90]
    x_padded = torch.zeros_like(x)
    x_padded[:, :, :65, :90] = x_small
    with torch.no_grad():
        a, b = m(x_small), m(x_padded)
    assert [tuple(f.shape) for f in a] == [(2, 32, 5, 7)] * 2
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fa, fb)
    with torch.no_grad():
        c = m(x[:, :, :56, :84])  # exact multiples: no padding
    assert c[0].shape == (2, 32, 4, 6)


def test_out_norm_modes():
    base = randomize_(tiny(out_norm='none')).eval()
    x = torch.randn(1, 3, 42, 56)
    outs = {}
    for mode in ('none', 'all', 'last'):
        m = tiny(out_norm=mode)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            outs[mode] = m.eval()(x)
    none, all_, last = outs['none'], outs['all'], outs['last']

    def ln(f):
        return base.norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with torch.no_grad():
        for n, a in zip(none, all_):
            torch.testing.assert_close(a, ln(n))
        torch.testing.assert_close(last[0], none[0])
        torch.testing.assert_close(last[1], none[1])
        torch.testing.assert_close(last[2], ln(none[2]))
    assert not torch.allclose(last[2], none[2])


def test_pos_embed_resampled_at_run_time_only():
    m = randomize_(tiny())
    stored = m.pos_embed.detach().clone()
    # the pre-training grid gets the stored table as is
    assert torch.equal(m.interpolate_pos_embed(6, 6, torch.float32), stored)
    p = m.interpolate_pos_embed(5, 7, torch.float32)
    assert p.shape == (1, 1 + 35, 32)
    torch.testing.assert_close(p[:, :1], stored[:, :1])
    assert torch.equal(m.pos_embed.detach(), stored)
    # the two resampling modes differ
    m.interpolate_offset, m.interpolate_antialias = 0.0, True
    q = m.interpolate_pos_embed(5, 7, torch.float32)
    assert not torch.allclose(p, q)


def _pair(**kwargs):
    """Same weights, without and with adapters."""
    slot_args = ('adapter_indices', 'adapter_cfg')
    plain = randomize_(
        tiny(**{k: v for k, v in kwargs.items() if k not in slot_args}))
    adapted = tiny(**kwargs)
    missing, unexpected = adapted.load_state_dict(
        plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith('adapters.') for k in missing)
    return plain.eval(), adapted.eval()


def test_fresh_adapters_are_identity_and_slot_contract():
    plain, adapted = _pair(
        num_register_tokens=4,
        adapter_indices=(0, 2),
        adapter_cfg=dict(type=TEST_ADAPTER))
    assert list(adapted.adapters) == ['0', '2']
    assert adapted.adapters['0'].down.in_features == 32  # embed_dims filled
    x, text = torch.randn(2, 3, 70, 98), text_features(2)
    with torch.no_grad():
        ref = plain(x)
        out = adapted.forward_features(x, text)
    assert isinstance(out, BackboneOutput)
    for a, b in zip(ref, out.feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # patch tokens only (prefix of 5 removed), grid and text handed over
    assert adapted.adapters['0'].calls == [((2, 35, 32), (5, 7), True)]
    assert set(out.routing) == {0, 2}
    assert out.routing[0].shape == (2, 2)
    assert out.aux_losses['loss_test'].item() == 2.0  # merged over adapters

    # a non-zero adapter after block 2 changes level 3 only
    with torch.no_grad():
        adapted.adapters['2'].up.weight.normal_()
        changed = adapted(x, text)
    torch.testing.assert_close(changed[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(changed[1], ref[1], rtol=0, atol=0)
    assert not torch.allclose(changed[2], ref[2])


def test_fresh_sera_adapter_is_identity():
    from mmseg_sera.models.adapters.sera_adapter import SERAAdapter
    plain, adapted = _pair(
        num_register_tokens=4,
        adapter_indices=(1, ),
        adapter_cfg=dict(type='SERAAdapter', text_dims=16, hidden_dims=8,
                         num_heads=2))
    assert isinstance(adapted.adapters['1'], SERAAdapter)
    adapted.init_weights()
    x, text = torch.randn(2, 3, 70, 98), text_features(2)
    with torch.no_grad():
        ref = plain(x)
        out = adapted.forward_features(x, text)
    for a, b in zip(ref, out.feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert out.routing[1].shape == (2, 2)


def _grad_names(model, x, text=None):
    model.zero_grad()
    sum(f.sum() for f in model(x, text)).backward()
    return {
        n
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }


@pytest.mark.parametrize('trainable', ['frozen', 'ln_bias', 'full'])
def test_freezing_and_train_mode(trainable):
    m = randomize_(
        tiny(trainable=trainable, out_indices=(1, 3), adapter_indices=(1, ),
             adapter_cfg=dict(type=TEST_ADAPTER), drop_path_rate=0.1))
    # randomize_ left requires_grad untouched
    assert m.train() is m
    backbone_mods = [mod for n, mod in m.named_modules()
                     if n and not n.startswith('adapters')]
    adapter_mods = list(m.adapters.modules())
    assert all(mod.training for mod in adapter_mods)
    if trainable == 'full':
        assert all(mod.training for mod in backbone_mods)
    else:
        assert not any(mod.training for mod in backbone_mods)

    names = {n for n, _ in m.named_parameters()}
    adapters = {n for n in names if n.startswith('adapters.')}
    ln_bias = {
        n
        for n in names - adapters
        if n.endswith('bias') or '.norm' in n or n.startswith('norm.')
    }
    expected_rg = {
        'frozen': adapters,
        'ln_bias': adapters | ln_bias,
        'full': names
    }[trainable]
    assert {n for n, p in m.named_parameters()
            if p.requires_grad} == expected_rg

    torch.manual_seed(0)
    m.eval()  # deterministic (drop path off) for the gradient check
    got = _grad_names(m, torch.randn(2, 3, 42, 56), text_features(2))
    # every trainable parameter gets a gradient and nothing else does
    # (the adapter's router only feeds the routing output: no grad)
    unused = {n for n in names if '.route.' in n}
    assert got == expected_rg - unused
    share = m.trainable_share()
    assert {'frozen': share == 0, 'ln_bias': 0 < share < 0.2,
            'full': share == 1}[trainable]


def test_ln_bias_share_vit_b14():
    m = DINOv2(arch='base', trainable='ln_bias')
    share = m.trainable_share()
    n = sum(p.numel() for p in m.parameters())
    print(f'ViT-B/14 ln_bias: {share * 100:.3f}% of {n / 1e6:.1f}M '
          'backbone parameters trainable')
    assert 85e6 < n < 88e6
    assert 0.0005 < share < 0.01
    assert m.blocks[0].attn.qkv.bias.requires_grad
    assert m.blocks[0].norm1.weight.requires_grad
    assert not m.blocks[0].attn.qkv.weight.requires_grad
    assert not m.blocks[0].ls1.gamma.requires_grad
    assert not m.pos_embed.requires_grad and not m.cls_token.requires_grad


def test_with_cp_matches():
    a = randomize_(tiny(trainable='full', num_register_tokens=4,
                        adapter_indices=(1, ),
                        adapter_cfg=dict(type=TEST_ADAPTER)))
    with torch.no_grad():
        a.adapters['1'].up.weight.normal_()
    b = tiny(trainable='full', num_register_tokens=4, adapter_indices=(1, ),
             adapter_cfg=dict(type=TEST_ADAPTER), with_cp=True)
    b.load_state_dict(a.state_dict())
    x, text = torch.randn(2, 3, 42, 56), text_features(2)
    outs, grads = [], []
    for m in (a, b):
        m.train()
        feats = m(x, text)
        sum((f * f).sum() for f in feats).backward()
        outs.append(feats)
        grads.append({n: p.grad for n, p in m.named_parameters()
                      if p.grad is not None})
    for fa, fb in zip(*outs):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_explicit_attention_equals_fused():
    """``Attention.fused=False`` (explicit softmax(q k^T / sqrt(d)) v, the
    benchmark's reference path) gives the SDPA result and gradients."""
    model = randomize_(tiny(trainable='full', num_register_tokens=4))
    x = torch.randn(2, 3, 42, 56)
    outs, grads = [], []
    for fused in (True, False):
        for blk in model.blocks:
            blk.attn.fused = fused
        model.zero_grad()
        feats = model(x)
        sum((f * f).sum() for f in feats).backward()
        outs.append(feats)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    for fa, fb in zip(*outs):
        torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4,
                                   atol=1e-5)


def test_pretrained_init(tmp_path):
    src = randomize_(tiny(num_register_tokens=4))
    path = tmp_path / 'dinov2_ours.pth'
    torch.save(dict(state_dict=src.state_dict(), meta={}), path)
    m = tiny(num_register_tokens=4, adapter_indices=(0, ),
             adapter_cfg=dict(type=TEST_ADAPTER),
             init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    m.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert torch.count_nonzero(m.adapters['0'].up.weight) == 0
    # prefix selection, e.g. from a whole segmentor checkpoint
    whole = {'backbone.' + k: v for k, v in src.state_dict().items()}
    whole['decode_head.conv.weight'] = torch.zeros(1)
    torch.save(dict(state_dict=whole), tmp_path / 'whole.pth')
    m2 = tiny(num_register_tokens=4, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'whole.pth'),
        prefix='backbone.'))
    m2.init_weights()
    assert torch.equal(m2.pos_embed, src.pos_embed)


def test_pretrained_errors(tmp_path):
    missing = tmp_path / 'nope.pth'
    m = tiny(init_cfg=dict(type='Pretrained', checkpoint=str(missing)))
    with pytest.raises(FileNotFoundError) as err:
        m.init_weights()
    assert str(missing) in str(err.value)
    assert 'dinov2_to_sera.py' in str(err.value)

    # an unconverted (official-layout) file
    sd = randomize_(tiny()).state_dict()
    sd['mask_token'] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / 'official.pth')
    m = tiny(init_cfg=dict(type='Pretrained',
                           checkpoint=str(tmp_path / 'official.pth')))
    with pytest.raises(ValueError, match='mask_token.*dinov2_to_sera'):
        m.init_weights()

    # a position table of another grid is not resized silently
    sd = tiny(img_size=14 * 8).state_dict()
    torch.save(sd, tmp_path / 'grid8.pth')
    m = tiny(init_cfg=dict(type='Pretrained',
                           checkpoint=str(tmp_path / 'grid8.pth')))
    with pytest.raises(ValueError, match='pos_embed has shape'):
        m.init_weights()


def test_deepcopy_keeps_train_override():
    # deepcopy (used by EMA hooks / model wrappers) keeps working
    m = tiny(adapter_indices=(0, ), adapter_cfg=dict(type=TEST_ADAPTER))
    c = copy.deepcopy(m)
    assert c.train() is c and not c.blocks[0].training
