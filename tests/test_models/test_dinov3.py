"""DINOv3 backbone: sizes, input sizes, RoPE, freezing, every slot kind.

Checkpoint conversion and the equality with timm and with a reference
forward of the official layout are in ``test_dinov3_converter.py``.
"""
import pytest
import torch

from mmseg.registry import MODELS
from mmseg_sera.models.backbones import DINOv2, DINOv3, PyramidDINOv2
from mmseg_sera.models.backbones.rope import AxialRoPE, apply_rope
from test_dinov2 import TEST_ADAPTER, randomize_, text_features

TINY = dict(embed_dims=32, num_layers=3, num_heads=2)


def tiny(**kwargs) -> DINOv3:
    cfg = dict(arch=TINY, out_indices=(0, 2))
    cfg.update(kwargs)
    return DINOv3(**cfg)


def test_registry_keys_and_defaults():
    m = MODELS.build(dict(type='DINOv3', arch=TINY))
    assert isinstance(m, DINOv3) and isinstance(m, DINOv2)
    assert m.patch_size == 16 and m.num_prefix_tokens == 5
    assert m.rope_periods == 'stored'
    keys = set(m.state_dict())
    for k in ('cls_token', 'register_tokens', 'rope_embed.periods',
              'patch_embed.proj.weight', 'blocks.0.attn.qkv.bias',
              'blocks.0.attn.qkv.bias_mask', 'blocks.2.ls2.gamma',
              'blocks.2.mlp.fc2.bias', 'norm.weight'):
        assert k in keys, k
    assert not any('pos_embed' in k or 'pos_resampling' in k for k in keys)
    # periods base ** (4 j / d), d = 16; mask 1 / 0 / 1 (no key bias)
    torch.testing.assert_close(
        m.rope_embed.periods,
        100.**(torch.arange(4, dtype=torch.float32) / 4), rtol=0, atol=0)
    mask = m.blocks[0].attn.qkv.bias_mask
    assert mask.tolist() == [1.] * 32 + [0.] * 32 + [1.] * 32
    assert m.blocks[0].norm1.eps == 1e-5
    assert m.blocks[0].ls1.gamma.detach().eq(1e-5).all()


def _official_count(a) -> int:
    """Parameters of an official DINOv3 ViT (mask token excluded), from
    the layer shapes."""
    C, L = a['embed_dims'], a['num_layers']
    H = int(C * a['mlp_ratio'])
    if a['ffn_type'] == 'mlp':
        ffn = 2 * C * H + H + C
    else:
        align = 64 if a['ffn_type'] == 'swiglu64' else 8
        d = int(H * 2 / 3)
        h = d + (-d) % align
        ffn = 3 * C * h + 2 * h + C
    attn = 3 * C * C + (3 * C if a['qkv_bias'] else 0) + C * C + C
    block = 4 * C + attn + 2 * C + ffn
    return 3 * 16 * 16 * C + C + 5 * C + L * block + 2 * C


@pytest.mark.parametrize('arch', list(DINOv3.arch_settings))
def test_every_size_builds_on_meta_and_counts(arch):
    with torch.device('meta'):
        m = DINOv3(arch=arch)
    a = DINOv3.arch_settings[arch]
    n = sum(p.numel() for p in m.parameters())
    assert n == _official_count(a)
    assert m.blocks[0].mlp.fc1.weight.is_meta
    if arch == '7b':
        # 4096 wide, 40 blocks, SwiGLU hidden 8192 (64-aligned), no qkv bias
        assert m.blocks[0].attn.qkv.bias is None
        assert m.blocks[0].mlp.fc2.in_features == 8192
        assert 6.7e9 < n < 6.8e9
    if arch in ('small_plus', 'large_plus', 'huge_plus'):
        assert m.blocks[0].mlp.fc1.out_features == 2 * int(
            a['embed_dims'] * 4)
    print(f'DINOv3 {arch}: {n / 1e6:.1f}M parameters')


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='giant'), 'Unknown DINOv3 arch'),
    (dict(arch=dict(embed_dims=24, num_layers=3, num_heads=4)),
     'divisible by 4'),
    (dict(rope_periods='bf16'), 'rope_periods'),
    (dict(arch=dict(TINY, qkv_bias=False), qkv_bias_mask=True), None),
    (dict(trainable='half'), 'trainable'),
])
def test_bad_arguments(kwargs, match):
    if match is None:  # no qkv bias: no mask, builds (the 7B)
        assert tiny(**kwargs).blocks[0].attn.qkv.bias is None
        return
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_sizes_floor_as_official():
    m = randomize_(tiny()).eval()
    x = torch.randn(1, 3, 61, 110)
    with torch.no_grad():
        a = m(x)
        b = m(x[:, :, :48, :96])  # the pixels the official model sees
    assert [tuple(f.shape) for f in a] == [(1, 32, 3, 6)] * 2
    for fa, fb in zip(a, b):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    with pytest.raises(ValueError, match='at least 16 x 16'):
        m(torch.randn(1, 3, 15, 64))
    with pytest.raises(ValueError, match='B x 3 x H x W'):
        m(torch.randn(1, 1, 32, 32))


def test_rope_tables_and_prefix_tokens():
    rope = AxialRoPE(head_dims=8, base=100.)
    sin, cos = rope(2, 3)
    assert sin.shape == cos.shape == (6, 8)
    # patch (row 1, col 0): y = 2 * 1.5 / 2 - 1 = 0.5, x = 2 * 0.5 / 3 - 1
    y, x = 0.5, 1 / 3 - 1
    p = rope.periods
    want = torch.cat([2 * torch.pi * y / p, 2 * torch.pi * x / p]).tile(2)
    torch.testing.assert_close(sin[3], torch.sin(want))
    q = torch.randn(1, 2, 3 + 6, 8)
    q2, k2 = apply_rope(q, q.clone(), (sin, cos))
    assert torch.equal(q2[:, :, :3], q[:, :, :3])  # prefix unrotated
    assert not torch.allclose(q2[:, :, 3:], q[:, :, 3:])
    # a rotation: norms of each (i, i + d/2) pair are kept
    pairs = (q[..., 3:, :4]**2 + q[..., 3:, 4:]**2)
    torch.testing.assert_close(q2[..., 3:, :4]**2 + q2[..., 3:, 4:]**2,
                               pairs)
    # the stored periods are used unless mode='fp32'
    with torch.no_grad():
        rope.periods.mul_(1.01)
    assert not torch.allclose(rope(2, 3)[0], sin)
    rope.mode = 'fp32'
    torch.testing.assert_close(rope(2, 3)[0], sin, rtol=0, atol=0)
    with pytest.raises(ValueError, match='mode'):
        rope.mode = 'bf16'


@pytest.mark.parametrize('trainable', ['frozen', 'ln_bias', 'full'])
def test_train_mode_rope_rescale_only_when_fully_trained(trainable):
    m = randomize_(tiny(trainable=trainable, rope_rescale_coords=2.0))
    x = torch.randn(2, 3, 48, 80)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        m.train()
        torch.manual_seed(1)
        got = m(x)
    assert m.rope_embed.training == (trainable == 'full')
    same = all(torch.equal(a, b) for a, b in zip(ref, got))
    # frozen / ln_bias: the backbone stays in eval mode, no rescale
    assert same == (trainable != 'full')


def test_freezing_policies_and_share():
    m = tiny(trainable='ln_bias')
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert 'blocks.0.attn.qkv.bias' in names and 'norm.weight' in names
    assert 'blocks.0.attn.qkv.weight' not in names
    assert 'cls_token' not in names and 'register_tokens' not in names
    assert 0 < m.trainable_share() < 0.05
    assert tiny(trainable='frozen').trainable_share() == 0
    assert tiny(trainable='full').trainable_share() == 1


def test_with_cp_matches():
    a = randomize_(tiny(trainable='full', adapter_indices=(1, ),
                        adapter_cfg=dict(type=TEST_ADAPTER),
                        rope_rescale_coords=2.0))
    b = tiny(trainable='full', adapter_indices=(1, ),
             adapter_cfg=dict(type=TEST_ADAPTER), with_cp=True,
             rope_rescale_coords=2.0)
    b.load_state_dict(a.state_dict())
    x, text = torch.randn(2, 3, 48, 80), text_features(2)
    outs, grads = [], []
    for m in (a, b):
        m.train()
        torch.manual_seed(0)  # the same RoPE scales in both
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


def _pair(**kwargs):
    """Same backbone weights, without and with adapters."""
    plain = randomize_(tiny())
    adapted = tiny(**kwargs)
    adapted.init_weights()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(),
                                                  strict=False)
    assert not unexpected and all(k.startswith('adapters.') for k in missing)
    return plain.eval(), adapted.eval()


def _feats_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_post_block_adapters_at_identity():
    x, text = torch.randn(2, 3, 48, 80), text_features(2)
    for cfg in (dict(type=TEST_ADAPTER),
                dict(type='SERAAdapter', text_dims=16, hidden_dims=8,
                     num_heads=2)):
        plain, adapted = _pair(adapter_indices=(0, 1), adapter_cfg=cfg)
        with torch.no_grad():
            ref = plain(x)
            out = adapted.forward_features(x, text)
        assert _feats_equal(ref, out.feats)
        assert set(out.routing) == {0, 1}
        # class + 4 register tokens with each level
        assert [tuple(p.shape) for p in out.prefix_tokens] == [(2, 5, 32)
                                                               ] * 2
    # the test can fail: a non-zero adapter after block 1 changes level 2
    plain, adapted = _pair(adapter_indices=(1, ),
                           adapter_cfg=dict(type=TEST_ADAPTER))
    with torch.no_grad():
        adapted.adapters['1'].up.weight.normal_()
        changed = adapted(x, text)
        ref = plain(x)
    assert torch.equal(changed[0], ref[0])
    assert not torch.allclose(changed[1], ref[1])
    assert adapted.adapters['1'].calls[-1] == ((2, 15, 32), (3, 5), True)


def test_parallel_mlp_adapter_at_identity():
    x, text = torch.randn(2, 3, 48, 80), text_features(2)
    da = dict(type='DETRISDenseAligner', text_dims=16, hidden_dims=16,
              attn_dims=8, num_heads=2)
    plain, zero = _pair(adapters=[dict(da, insert=(0, 2), scale=0.0)])
    _, live = _pair(adapters=[dict(da, insert=(0, 2), scale=0.5)])
    with torch.no_grad():
        ref, got, moved = plain(x), zero(x, text), live(x, text)
    assert _feats_equal(ref, got)
    assert not torch.allclose(moved[0], ref[0])


def test_bridge_at_identity():
    enc = MODELS.build(
        dict(type='OpenCLIPTextEncoder', model_name='ViT-B-16',
             text_cfg=dict(width=16, layers=1, heads=2), embed_dim=8,
             context_length=10, pretrained=None, trainable='frozen'))
    x = torch.randn(2, 3, 48, 80)
    bridge = dict(type='ETRISBridger', insert=(0, 2), text_dims=16,
                  hidden_dims=8, num_heads=2, zero_init_out=True)
    plain, adapted = _pair(adapters=[bridge])
    with torch.no_grad():
        ref = plain(x)
        out = adapted.forward_features(
            x, text_stream=enc.begin(['a red ball', 'the left one']))
    assert _feats_equal(ref, out.feats)
    assert out.text.tokens.shape == (2, 10, 16)


def test_pyramid_takes_a_dinov3():
    m = PyramidDINOv2(backbone=dict(type='DINOv3', arch=TINY,
                                    out_indices=(0, 1, 2)),
                      out_scales=(2., 1., 0.5))
    feats = m(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 12), (4, 6), (2, 3)]


def test_rope_periods_record(tmp_path):
    src = randomize_(tiny())
    with torch.no_grad():  # bf16-rounded periods, as official files hold
        src.rope_embed.periods.copy_(
            src.rope_embed.periods.to(torch.bfloat16).float())
    path = tmp_path / 'w.pth'
    torch.save(dict(state_dict=src.state_dict(),
                    meta=dict(source_layout='timm', rope_periods='fp32')),
               path)
    x = torch.randn(1, 3, 48, 80)
    feats = {}
    for cfg in (None, 'stored', 'fp32'):
        m = tiny(rope_periods=cfg,
                 init_cfg=dict(type='Pretrained', checkpoint=str(path)))
        m.init_weights()
        assert torch.equal(m.rope_embed.periods, src.rope_embed.periods)
        assert m.rope_periods == (cfg or 'fp32')  # record unless set
        with torch.no_grad():
            feats[cfg] = m.eval()(x)
    assert _feats_equal(feats[None], feats['fp32'])
    diff = (feats['stored'][-1] - feats['fp32'][-1]).abs().max()
    assert diff > 1e-5, diff


def test_pretrained_errors(tmp_path):
    m = tiny(init_cfg=dict(type='Pretrained',
                           checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='dinov3_to_sera.py'):
        m.init_weights()
    # another size: a shape mismatch names the key
    wide = DINOv3(arch=dict(TINY, embed_dims=48))
    torch.save(dict(state_dict=wide.state_dict()), tmp_path / 'w.pth')
    m = tiny(init_cfg=dict(type='Pretrained',
                           checkpoint=str(tmp_path / 'w.pth')))
    with pytest.raises(ValueError, match='cls_token has shape'):
        m.init_weights()
    # an unconverted official file
    sd = tiny().state_dict()
    sd['storage_tokens'] = sd.pop('register_tokens')
    torch.save(sd, tmp_path / 'o.pth')
    m = tiny(init_cfg=dict(type='Pretrained',
                           checkpoint=str(tmp_path / 'o.pth')))
    with pytest.raises(ValueError, match='storage_tokens.*dinov3_to_sera'):
        m.init_weights()
