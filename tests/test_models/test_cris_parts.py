"""The CRIS-lineage parts ETRIS and DETRIS share (PEERS.md 1.3-1.7):
HierarchicalAlignNeck, VLGlobalAlignDecoder, TextDynamicConvProjector and
CRISHead. Exact parameter counts at the peer widths (build only), the
one-key attention gate against its closed form, the coord residual, the
word padding, the dynamic kernel against per-sample convolutions, the
losses by hand, and a tiny DINOv2 + CLIP segmentor end to end."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_sera  # noqa: F401  (registers the components)
from mmseg_sera.models.heads import (CRISHead, TextDynamicConvProjector,
                                     VLGlobalAlignDecoder)
from mmseg_sera.models.necks import HierarchicalAlignNeck, mha_gate_to_linear
from mmseg_sera.models.necks.hierarchical_align import (SentenceGate,
                                                        add_coord_channels)
from mmseg_sera.models.position import sine_position_2d
from mmseg_sera.models.structures import NeckOutput, TextFeatures


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _text(B: int = 2, L: int = 6, dims: int = 12, pooled: int = 10,
          seed: int = 0) -> TextFeatures:
    g = _gen(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[-1, L - 2:] = True  # the last sentence is two words shorter
    return TextFeatures(
        tokens=torch.randn(B, L, dims, generator=g), mask=mask,
        pooled=torch.randn(B, pooled, generator=g))


def _maps(channels, h: int = 3, w: int = 5, B: int = 2, seed: int = 0):
    g = _gen(seed)
    return tuple(torch.randn(B, c, h, w, generator=g) for c in channels)


def _small_neck(**kw) -> HierarchicalAlignNeck:
    torch.manual_seed(0)
    cfg = dict(in_channels=(12, 12, 8), channels=16, text_dims=10,
               num_heads=2)
    cfg.update(kw)
    return HierarchicalAlignNeck(**cfg)


# --------------------------------------------------------------------------
# parameter counts at the peer widths (PEERS.md 1.3-1.5), build only
# --------------------------------------------------------------------------
def test_neck_parameter_counts_detris_and_etris():
    detris = HierarchicalAlignNeck(in_channels=(768, 768, 768),
                                   coord_residual=True)
    assert _count(detris) == 10_114_560
    assert _count(detris.txt_proj) == 262_656
    assert [_count(g) for g in detris.gates] == [1_050_624] * 3
    assert [_count(p) for p in detris.projs] == [394_240] * 3
    assert _count(detris.aggr) == 787_456
    assert _count(detris.coord_convs) == 4_729_856
    # F5 (the last level) uses a 1x1 ConvTranspose, the others a 1x1 Conv
    assert isinstance(detris.projs[2].conv, nn.ConvTranspose2d)
    assert all(type(p.conv) is nn.Conv2d for p in detris.projs[:2])
    etris = HierarchicalAlignNeck(in_channels=(768, 768, 512),
                                  coord_residual=False)
    assert _count(etris) == 9_983_488
    # the linear gate drops the dead q/k rows: 2 d^2 + 2 d per level
    linear = HierarchicalAlignNeck(in_channels=(768, 768, 768),
                                   gate='linear')
    assert _count(linear) == 10_114_560 - 3 * 525_312


def test_decoder_projector_and_head_parameter_counts():
    decoder = VLGlobalAlignDecoder()
    assert len(decoder.layers) == 3
    assert [_count(m) for m in decoder.layers] == [2_632_704] * 3
    assert _count(decoder) == 7_899_136
    for layer in decoder.layers:  # dropout 0.1 also on attention weights
        assert layer.self_attn.dropout == layer.cross_attn.dropout == 0.1
        assert layer.drop.p == 0.1 and layer.self_attn.num_heads == 8
    projector = TextDynamicConvProjector()
    assert _count(projector) == 4_788_737
    assert _count(projector.dynamic) == 1_182_465
    assert _count(projector) - _count(projector.dynamic) == 3_606_272
    assert projector.dynamic.kernel_size == 3 and projector.scale == 4
    head = CRISHead()
    assert _count(head) == 7_899_136 + 4_788_737
    assert head.threshold == 0.35 and head.loss_at == 'logits'
    assert [m.loss_name for m in [head.loss_decode]] == ['loss_mask']


def test_pytorch_default_init():
    """PEERS.md 1.7: PyTorch defaults (conv weights within the
    kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in); mmcv's ConvModule
    would use Kaiming normal, which exceeds it), BN 1/0, zero MHA biases."""
    neck = _small_neck(in_channels=(64, 64, 64), channels=64, text_dims=64,
                       num_heads=8)
    proj = TextDynamicConvProjector(in_channels=64, up_channels=(64, 32),
                                    channels=32, text_dims=64)
    convs = [m for m in list(neck.modules()) + list(proj.modules())
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 3 + 1 + 2 + 2 + 1
    for conv in convs:
        w = conv.weight
        fan_in = w.shape[1] * w[0, 0].numel()
        assert w.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
    for m in list(neck.modules()) + list(proj.modules()):
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    for gate in neck.gates:
        assert (gate.attn.in_proj_bias == 0).all()
        assert (gate.attn.out_proj.bias == 0).all()


# --------------------------------------------------------------------------
# neck
# --------------------------------------------------------------------------
def test_mha_gate_ignores_the_query_and_equals_its_closed_form():
    torch.manual_seed(0)
    gate = SentenceGate(dims=16, num_heads=4, mode='mha')
    s = torch.randn(2, 16, generator=_gen(1))
    x1 = torch.randn(2, 7, 16, generator=_gen(2))
    x2 = 5 * torch.randn(2, 7, 16, generator=_gen(3))
    g1, g2 = gate.gate(x1, s), gate.gate(x2, s)
    assert g1.shape == (2, 7, 16)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    # W_o (W_v s + b_v) + b_o with the v rows of in_proj
    w, b = gate.attn.in_proj_weight, gate.attn.in_proj_bias
    ref = F.linear(F.linear(s, w[32:], b[32:]), gate.attn.out_proj.weight,
                   gate.attn.out_proj.bias)
    torch.testing.assert_close(g1, ref[:, None].expand(2, 7, 16),
                               atol=1e-5, rtol=1e-5)
    # the q/k rows get no gradient
    gate.gate(x1, s).sum().backward()
    assert gate.attn.in_proj_weight.grad[:32].abs().max() < 1e-6
    assert gate.attn.in_proj_weight.grad[32:].abs().max() > 1e-3


def test_linear_gate_equals_mha_gate_with_converted_weights():
    mha = _small_neck(gate='mha').eval()
    linear = _small_neck(gate='linear').eval()
    converted = mha_gate_to_linear(mha.state_dict())
    assert not any('attn' in k for k in converted)
    linear.load_state_dict(converted, strict=True)
    feats, text = _maps((12, 12, 8)), _text()
    with torch.no_grad():
        a = mha(feats, text).feats[0]
        b = linear(feats, text).feats[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # ... and not by accident: a fresh linear neck differs
    with torch.no_grad():
        c = _small_neck(gate='linear').eval()(feats, text).feats[0]
    assert (a - c).abs().max() > 1e-3


def test_gate_scales_each_channel_of_the_projection():
    """Q_i = G_i * g_i: a gate of ones leaves the projection unchanged."""
    neck = _small_neck(gate='linear').eval()
    for gate in neck.gates:
        nn.init.zeros_(gate.out.weight)
        nn.init.ones_(gate.out.bias)
    feats, text = _maps((12, 12, 8)), _text()
    with torch.no_grad():
        a = neck.fuse(feats, text)
        ref = neck.aggr(
            torch.cat([p(f) for p, f in zip(neck.projs, feats)], dim=1))
    torch.testing.assert_close(a, ref)


def test_coord_residual_true_is_a_plus_c():
    residual = _small_neck(coord_residual=True).eval()
    plain = _small_neck(coord_residual=False).eval()
    plain.load_state_dict(residual.state_dict())
    feats, text = _maps((12, 12, 8)), _text()
    with torch.no_grad():
        a = residual.fuse(feats, text)
        c = residual.coord_convs(add_coord_channels(a))
        out_res = residual(feats, text)
        out_plain = plain(feats, text)
    assert isinstance(out_res, NeckOutput) and len(out_res.feats) == 1
    assert out_res.feats[0].shape == (2, 16, 3, 5)
    torch.testing.assert_close(out_plain.feats[0], c)
    torch.testing.assert_close(out_res.feats[0], a + c)
    assert (a.abs().max() > 1e-3)


def test_coord_channels_x_first_non_square():
    x = torch.randn(2, 4, 3, 5)
    out = add_coord_channels(x)
    assert out.shape == (2, 6, 3, 5)
    assert torch.equal(out[:, :4], x)
    xs, ys = torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 3)
    for i in range(3):
        for j in range(5):
            assert out[1, 4, i, j] == xs[j] and out[1, 5, i, j] == ys[i]


def test_neck_any_grid_and_bad_inputs():
    neck = _small_neck()
    for h, w in ((3, 5), (1, 1), (6, 2)):
        out = neck(_maps((12, 12, 8), h, w), _text())
        assert out.feats[0].shape == (2, 16, h, w)
    with pytest.raises(ValueError, match='expected 3 maps'):
        neck(_maps((12, 12)), _text())
    with pytest.raises(ValueError, match='one grid'):
        neck(_maps((12, 12)) + _maps((8, ), 3, 4), _text())
    with pytest.raises(ValueError, match='text.pooled'):
        neck(_maps((12, 12, 8)), _text(pooled=12))
    with pytest.raises(ValueError, match='gate'):
        _small_neck(gate='film')


# --------------------------------------------------------------------------
# decoder
# --------------------------------------------------------------------------
def test_pixel_code_layout_of_peers():
    """PEERS.md 1.4: first half x, second half y, sin on even / cos on odd
    channels, f_i = exp(-ln(1e4) 2i / (C/2)); rows (y, x) row-major."""
    h, w, C = 3, 5, 16
    code = sine_position_2d(h, w, C).reshape(h, w, C)
    half = C // 2
    for y in range(h):
        for x in range(w):
            for c in range(half):
                f = math.exp(-math.log(1e4) * 2 * (c // 2) / half)
                trig = math.sin if c % 2 == 0 else math.cos
                assert abs(code[y, x, c] - trig(x * f)) < 1e-5
                assert abs(code[y, x, half + c] - trig(y * f)) < 1e-5


def test_decoder_ignores_padded_words():
    torch.manual_seed(0)
    dec = VLGlobalAlignDecoder(num_layers=2, dims=16, text_dims=12,
                               num_heads=2, ffn_dims=16).eval()
    x = torch.randn(2, 16, 3, 5, generator=_gen(1))
    text = _text(L=6, dims=12)
    assert text.mask[1, 4:].all() and not text.mask[0].any()
    edited = text.tokens.clone()
    edited[1, 4:] = 100 * torch.randn(2, 12, generator=_gen(2))
    with torch.no_grad():
        out = dec(x, text)
        same = dec(x, TextFeatures(edited, text.mask, text.pooled))
        edited[1, 0] += 1.0  # a real word does matter
        other = dec(x, TextFeatures(edited, text.mask, text.pooled))
    assert out.shape == (2, 16, 3, 5)
    torch.testing.assert_close(same, out, atol=1e-6, rtol=1e-6)
    assert (other[1] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(other[0], out[0])


# --------------------------------------------------------------------------
# projector
# --------------------------------------------------------------------------
@pytest.mark.parametrize('k', [1, 3])
def test_dynamic_projector_equals_per_sample_conv(k):
    torch.manual_seed(0)
    proj = TextDynamicConvProjector(in_channels=16, up_channels=(12, 8),
                                    channels=6, text_dims=10,
                                    kernel_size=k).eval()
    v = torch.randn(3, 16, 3, 5, generator=_gen(1))
    s = torch.randn(3, 10, generator=_gen(2))
    with torch.no_grad():
        out = proj(v, s)
        # independent visual path: nn.Upsample(x2) + CBR, twice, then 1x1
        x = v
        for cbr in proj.up_convs:
            x = cbr(nn.Upsample(scale_factor=2, mode='bilinear')(x))
        x = proj.visual_proj(x)
        params = proj.dynamic.fc(s)
        ref = torch.cat([
            F.conv2d(x[b:b + 1], params[b, :-1].reshape(1, 6, k, k),
                     params[b, -1:], padding=k // 2) for b in range(3)
        ])
    assert out.shape == (3, 1, 12, 20)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# head
# --------------------------------------------------------------------------
def _small_head(**kw) -> CRISHead:
    torch.manual_seed(0)
    cfg = dict(in_channels=16, channels=6, text_dims=12, pooled_dims=10,
               num_decoder_layers=1, decoder_heads=2,
               decoder_ffn_channels=16, up_channels=(12, 8))
    cfg.update(kw)
    return CRISHead(**cfg)


def _samples(labels: torch.Tensor) -> list:
    out = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        s.set_metainfo(dict(img_shape=tuple(lab.shape),
                            pad_shape=tuple(lab.shape)))
        out.append(s)
    return out


def test_neck_and_head_non_square_end_to_end():
    neck, head = _small_neck(), _small_head()
    out = neck(_maps((12, 12, 8), 3, 5), _text())
    logits = head(out.feats, _text())
    assert logits.shape == (2, 1, 12, 20)
    assert torch.isfinite(logits).all()


def test_head_loss_is_bce_on_the_logit_grid():
    head = _small_head().eval()
    feats, text = (torch.randn(2, 16, 3, 5, generator=_gen(1)), ), _text()
    labels = torch.randint(0, 2, (2, 42, 70), generator=_gen(2))
    labels[0, :10] = 255  # ignored rows
    with torch.no_grad():
        logits = head(feats, text)
        losses = head.loss_by_feat(logits, _samples(labels))
    assert set(losses) == {'loss_mask', 'acc_seg'}
    # the peers: gt nearest-resized to the logits (12 x 20), mean BCE over
    # the valid pixels
    small = F.interpolate(labels[:, None].float(), size=(12, 20),
                          mode='nearest')[:, 0]
    valid = small != 255
    ref = F.binary_cross_entropy_with_logits(
        logits[:, 0][valid], small[valid])
    torch.testing.assert_close(losses['loss_mask'], ref)
    acc = ((logits[:, 0].sigmoid() > 0.35) == small.bool())[valid]
    torch.testing.assert_close(losses['acc_seg'], acc.float().mean() * 100)
    # loss_at='gt': logits bilinearly resized to the ground truth instead
    gt_head = _small_head(loss_at='gt')
    gt_loss = gt_head.loss_by_feat(logits, _samples(labels))['loss_mask']
    up = F.interpolate(logits, size=(42, 70), mode='bilinear')[:, 0]
    full_valid = labels != 255
    torch.testing.assert_close(
        gt_loss,
        F.binary_cross_entropy_with_logits(up[full_valid],
                                           labels[full_valid].float()))
    with pytest.raises(ValueError, match='0, 1 or 255'):
        head.loss_by_feat(logits, _samples(torch.full((2, 42, 70), 3)))
    with pytest.raises(ValueError, match='loss_at'):
        _small_head(loss_at='both')


def test_head_contract_loss_predict_and_gradients():
    head = _small_head().train()
    feats = (torch.randn(2, 16, 3, 5, generator=_gen(1)), )
    text = _text()
    labels = torch.randint(0, 2, (2, 42, 70), generator=_gen(2))
    losses = head.loss(feats, text, _samples(labels), dict())
    losses['loss_mask'].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    head.eval()
    metas = [dict(img_shape=(42, 70), pad_shape=(42, 70))] * 2
    with torch.no_grad():
        pred = head.predict(feats, text, metas, dict())
    assert pred.shape == (2, 1, 42, 70)
    with pytest.raises(ValueError, match='out_channels'):
        _small_head(out_channels=2)
    with pytest.raises(ValueError, match='use_sigmoid'):
        _small_head(loss_decode=dict(type='CrossEntropyLoss'))
    with pytest.raises(ValueError, match='text.tokens'):
        head(feats, _text(dims=10))


def test_registry_builds_the_four_parts():
    init_default_scope('mmseg')
    for name in ('HierarchicalAlignNeck', 'VLGlobalAlignDecoder',
                 'TextDynamicConvProjector', 'CRISHead'):
        assert MODELS.get(name) is not None, name
    neck = MODELS.build(dict(type='HierarchicalAlignNeck',
                             in_channels=[12, 12, 8], channels=16,
                             text_dims=10, num_heads=2))
    assert isinstance(neck, HierarchicalAlignNeck)


# --------------------------------------------------------------------------
# segmentor: tiny DINOv2 + tiny CLIP text tower + neck + head
# --------------------------------------------------------------------------
def _tiny_segmentor():
    model = dict(
        type='ReferringEncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor',
            mean=[122.7709383, 116.7460125, 104.09373615],
            std=[68.5005327, 66.6321579, 70.32316305],
            bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size_divisor=14,
            test_cfg=dict(size_divisor=14)),
        text_encoder=dict(
            type='OpenCLIPTextEncoder', model_name='ViT-B-16',
            text_cfg=dict(width=16, layers=1, heads=2), embed_dim=8,
            context_length=10, pretrained=None, trainable='full'),
        backbone=dict(
            type='DINOv2',
            arch=dict(embed_dims=32, num_layers=3, num_heads=2,
                      mlp_ratio=2),
            img_size=56, num_register_tokens=0, out_indices=(0, 1, 2),
            trainable='full', init_cfg=None),
        neck=dict(
            type='HierarchicalAlignNeck', in_channels=[32, 32, 32],
            channels=16, text_dims=8, num_heads=2, coord_residual=True),
        decode_head=dict(
            type='CRISHead', in_channels=16, channels=8, text_dims=16,
            pooled_dims=8, num_decoder_layers=1, decoder_heads=2,
            decoder_ffn_channels=16, up_channels=(16, 8)),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))
    init_default_scope('mmseg')
    torch.manual_seed(0)
    return MODELS.build(model)


def _batch(H: int = 42, W: int = 70) -> dict:
    g = _gen(0)
    inputs, samples = [], []
    for text in ('the red circle', 'a small blue square at the top'):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 2, (1, H, W), generator=g))
        s.set_metainfo(dict(text=text, ori_shape=(H, W), img_shape=(H, W),
                            pad_shape=(H, W)))
        samples.append(s)
        inputs.append(
            torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8))
    return dict(inputs=inputs, data_samples=samples)


def test_segmentor_loss_backward_predict():
    model = _tiny_segmentor()
    model.train()
    data = model.data_preprocessor(_batch(), training=True)
    losses = model(**data, mode='loss')
    assert set(losses) == {'loss_mask', 'acc_seg'}
    assert losses['loss_mask'].requires_grad
    losses['loss_mask'].backward()
    for part in ('backbone', 'text_encoder'):  # the towers train too
        assert any(p.grad is not None
                   for p in getattr(model, part).parameters()), part
    for part in ('neck', 'decode_head'):  # every parameter is used
        for name, p in getattr(model, part).named_parameters():
            assert p.grad is not None, f'{part}.{name}'
    model.eval()
    data = model.data_preprocessor(_batch(), training=False)
    with torch.no_grad():
        logits = model(**data, mode='tensor')
        results = model(**data, mode='predict')
    assert logits.shape == (2, 1, 12, 20)  # 3 x 5 patches, x 4
    for res in results:
        assert res.pred_sem_seg.data.shape == (1, 42, 70)
        probs = res.seg_logits.data
        assert torch.equal(res.pred_sem_seg.data.bool(), probs > 0.35)
