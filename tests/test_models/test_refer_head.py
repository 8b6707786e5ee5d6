"""ReferHead: shapes, losses against independent computations, text
conditioning, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData

from mmseg.structures import SegDataSample
from mmseg_sera.models.heads.refer_head import (ReferHead,
                                                TextDynamicProjector,
                                                sine_position_2d)
from mmseg_sera.models.structures import TextFeatures

D, C, CT, CP, L = 16, 8, 12, 10, 6


def _text(batch: int, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, 4:] = True  # two padding slots
    return TextFeatures(
        tokens=torch.randn(batch, L, CT, generator=g),
        mask=mask,
        pooled=torch.randn(batch, CP, generator=g))


def _head(**kwargs) -> ReferHead:
    torch.manual_seed(0)
    cfg = dict(in_channels=D, channels=C, text_dims=CT, pooled_dims=CP,
               decoder_heads=2)
    cfg.update(kwargs)
    return ReferHead(**cfg)


def _samples(labels: torch.Tensor) -> list:
    """labels: B x H x W -> SegDataSamples with gt_sem_seg 1 x H x W."""
    out = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        out.append(s)
    return out


@pytest.mark.parametrize('layers', [0, 1])
@pytest.mark.parametrize('grid,expected', [((32, 32), (112, 112)),
                                           ((32, 20), (112, 70)),
                                           ((7, 33), (25, 116))])
def test_output_stride_4(layers, grid, expected):
    head = _head(num_decoder_layers=layers).eval()
    feats = (torch.randn(2, D, *grid), )
    logits = head(feats, _text(2))
    assert logits.shape == (2, 1, *expected)
    assert torch.isfinite(logits).all()
    assert (head.decoder is None) == (layers == 0)


def test_other_strides():
    head = _head(in_stride=16, out_stride=4).eval()
    assert len(head.up_convs) == 2
    assert head(torch.randn(1, D, 5, 6), _text(1)).shape == (1, 1, 20, 24)
    same = _head(in_stride=4, out_stride=4).eval()
    assert len(same.up_convs) == 0
    assert same(torch.randn(1, D, 5, 6), _text(1)).shape == (1, 1, 5, 6)
    with pytest.raises(ValueError, match='in_stride'):
        _head(in_stride=2, out_stride=4)


def test_up_channels_narrow_the_upsampling_path():
    head = _head(up_channels=(C // 2, C // 4)).eval()
    widths = [(c.conv.in_channels, c.conv.out_channels)
              for c in head.up_convs]
    assert widths == [(D, C // 2), (C // 2, C // 4)]
    assert head.visual_proj.in_channels == C // 4
    assert head.visual_proj.out_channels == head.channels
    assert head(torch.randn(2, D, 32, 20), _text(2)).shape == (2, 1, 112, 70)
    narrow = sum(p.numel() for p in head.up_convs.parameters())
    wide = sum(p.numel() for p in _head().up_convs.parameters())
    assert narrow < wide
    for bad in [(24, ), (24, 8, 4), (24, 0)]:
        with pytest.raises(ValueError, match='up_channels needs 2'):
            _head(up_channels=bad)


def _attn_dropouts(head: ReferHead) -> list:
    layer = head.decoder.layers[0]
    return [layer.self_attn.dropout, layer.cross_attn.dropout]


def test_decoder_attention_dropout_is_separate():
    default = _head(num_decoder_layers=1, decoder_dropout=0.2)
    assert _attn_dropouts(default) == [0.2, 0.2]
    assert default.decoder.layers[0].drop.p == 0.2

    # Residual/FFN dropout off, attention-weight dropout on: training-mode
    # outputs vary from call to call, and only because of the attention.
    feats, text = (torch.randn(2, D, 6, 6), ), _text(2)
    only_attn = _head(num_decoder_layers=1, decoder_dropout=0.0,
                      decoder_attn_dropout=0.5).train()
    assert _attn_dropouts(only_attn) == [0.5, 0.5]
    assert only_attn.decoder.layers[0].drop.p == 0.0
    torch.manual_seed(1)
    first = only_attn(feats, text)
    assert not torch.allclose(first, only_attn(feats, text))

    # Attention dropout off: the training-mode decoder is deterministic
    # (BN in training mode still normalises by batch statistics, equally).
    no_attn = _head(num_decoder_layers=1, decoder_dropout=0.0,
                    decoder_attn_dropout=0.0).train()
    torch.testing.assert_close(no_attn(feats, text), no_attn(feats, text))
    # ... and equals the eval-mode decoder (no dropout anywhere).
    v = torch.randn(2, D, 6, 6)
    train_out = no_attn.decoder(v, text)
    torch.testing.assert_close(train_out, no_attn.eval().decoder(v, text))


def test_input_selection_last_and_concat():
    head = _head().eval()
    a, b = torch.randn(2, D, 6, 6), torch.randn(2, D, 6, 6)
    text = _text(2)
    torch.testing.assert_close(head((a, b), text), head((b, ), text))
    cat_head = _head(in_channels=[D, D], in_index=[0, 1],
                     input_transform='resize_concat').eval()
    assert cat_head((a, b), text).shape == (2, 1, 21, 21)


def test_logits_depend_on_sentence():
    head = _head(num_decoder_layers=1).eval()
    feats = torch.randn(1, D, 6, 6).expand(2, -1, -1, -1)
    text = _text(2)
    logits = head((feats, ), text)
    # same image, two sentences -> different masks
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    # padded word slots are masked out of the cross-attention
    text2 = TextFeatures(tokens=text.tokens.clone(), mask=text.mask,
                         pooled=text.pooled)
    text2.tokens[:, 4:] += 5.0
    torch.testing.assert_close(head((feats, ), text2), logits)
    text2.tokens[:, 1] += 5.0
    assert (head((feats, ), text2) - logits).abs().max() > 1e-4


@pytest.mark.parametrize('k', [1, 3])
def test_dynamic_kernel_equals_per_sample_conv(k):
    torch.manual_seed(0)
    proj = TextDynamicProjector(channels=C, text_dims=CP, kernel_size=k)
    x = torch.randn(3, C, 7, 9)
    pooled = torch.randn(3, CP)
    out = proj(x, pooled)
    assert out.shape == (3, 1, 7, 9)
    params = proj.fc(pooled)
    for b in range(3):
        w = params[b, :-1].reshape(1, C, k, k)
        ref = F.conv2d(x[b:b + 1], w, params[b, -1:], padding=k // 2)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)
    # a different sentence embedding gives different logits
    assert (proj(x, pooled + 1.0) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match='odd'):
        TextDynamicProjector(channels=C, text_dims=CP, kernel_size=2)


def _labels():
    lab = torch.tensor([[[1, 0, 0, 1], [0, 1, 255, 255], [1, 1, 0, 0],
                         [255, 0, 1, 0]],
                        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0],
                         [255, 255, 255, 255]]])
    return lab


def test_loss_mask_equals_bce_on_valid_pixels():
    head = _head()
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 4, 4) * 3
    lab = _labels()
    losses = head.loss_by_feat(logits, _samples(lab))
    assert set(losses) == {'loss_mask', 'loss_dice', 'acc_seg'}
    for v in losses.values():
        assert torch.isfinite(v).all()
    valid = lab != 255
    ref = F.binary_cross_entropy_with_logits(logits[:, 0][valid],
                                             lab[valid].float())
    torch.testing.assert_close(losses['loss_mask'], ref, atol=1e-6,
                               rtol=1e-5)


def test_loss_mask_resizes_logits_to_gt():
    head = _head()
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 2, 2)
    lab = _labels()
    losses = head.loss_by_feat(logits, _samples(lab))
    up = F.interpolate(logits, size=(4, 4), mode='bilinear',
                       align_corners=False)[:, 0]
    valid = lab != 255
    ref = F.binary_cross_entropy_with_logits(up[valid], lab[valid].float())
    torch.testing.assert_close(losses['loss_mask'], ref, atol=1e-6,
                               rtol=1e-5)


def test_dice_by_hand():
    head = _head()
    logits = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    lab = torch.tensor([[[1, 0], [255, 1]]])
    losses = head.loss_by_feat(logits, _samples(lab))
    sig = [1 / (1 + math.exp(-v)) for v in (0.5, -1.0, 0.0)]  # valid pixels
    tgt = [1.0, 0.0, 1.0]
    eps = 1e-3  # mmseg DiceLoss default, V-Net (squared) form
    a = sum(p * t for p, t in zip(sig, tgt))
    b = sum(p * p for p in sig) + eps
    c = sum(t * t for t in tgt) + eps
    assert losses['loss_dice'].item() == pytest.approx(1 - 2 * a / (b + c),
                                                       abs=1e-6)
    # accuracy at threshold 0.35: predictions 1, 0, 1 vs targets 1, 0, 1
    assert losses['acc_seg'].item() == pytest.approx(100.0)
    naive = _head(loss_decode=[
        dict(type='DiceLoss', naive_dice=True, loss_name='loss_dice')
    ])
    d = naive.loss_by_feat(logits, _samples(lab))['loss_dice'].item()
    ref = 1 - (2 * a + eps) / (sum(sig) + sum(tgt) + eps)
    assert d == pytest.approx(ref, abs=1e-6)


def test_ignored_pixels_do_not_change_losses():
    head = _head()
    torch.manual_seed(3)
    logits = torch.randn(2, 1, 4, 4)
    lab = _labels()
    base = head.loss_by_feat(logits, _samples(lab))
    changed = logits.clone()
    changed[:, 0][lab == 255] = torch.tensor([50.0, -50.0, 7.0, 3.0, -2.0,
                                              9.0, 1.0])
    other = head.loss_by_feat(changed, _samples(lab))
    for key in ('loss_mask', 'loss_dice', 'acc_seg'):
        torch.testing.assert_close(other[key], base[key])
    # ... while changing a valid pixel does change them
    changed[0, 0, 0, 0] += 4.0
    moved = head.loss_by_feat(changed, _samples(lab))
    assert (moved['loss_mask'] - base['loss_mask']).abs() > 1e-4
    assert (moved['loss_dice'] - base['loss_dice']).abs() > 1e-4


def test_acc_seg_by_hand():
    head = _head(threshold=0.5)
    logits = torch.tensor([[[[3.0, 3.0], [-3.0, 0.1]]]])
    lab = torch.tensor([[[1, 0], [0, 255]]])
    acc = head.loss_by_feat(logits, _samples(lab))['acc_seg']
    assert acc.item() == pytest.approx(200.0 / 3)


def test_bad_labels_raise():
    head = _head()
    with pytest.raises(ValueError, match=r'\[2\]'):
        head.loss_by_feat(torch.zeros(1, 1, 2, 2),
                          _samples(torch.tensor([[[0, 1], [2, 255]]])))


def test_loss_and_gradients_reach_projector_decoder_and_convs():
    head = _head(num_decoder_layers=1, kernel_size=3)
    head.train()
    feats = (torch.randn(2, D, 4, 4), )
    lab = (torch.rand(2, 14, 14) > 0.5).long()
    lab[:, :2] = 255
    losses = head.loss(feats, _text(2), _samples(lab), train_cfg={})
    assert set(losses) == {'loss_mask', 'loss_dice', 'acc_seg'}
    total = losses['loss_mask'] + losses['loss_dice']
    total.backward()
    for name in ('projector.fc.weight',
                 'decoder.layers.0.self_attn.in_proj_weight',
                 'decoder.layers.0.cross_attn.k_proj_weight',
                 'decoder.layers.0.ffn.0.weight', 'decoder.norm.weight',
                 'up_convs.0.conv.weight', 'visual_proj.weight'):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not hasattr(head, 'conv_seg')


def test_predict_resizes_to_padded_input():
    head = _head().eval()
    metas = [dict(img_shape=(50, 60), pad_shape=(56, 70),
                  ori_shape=(100, 120))]
    logits = head.predict((torch.randn(1, D, 4, 5), ), _text(1), metas,
                          test_cfg={})
    assert logits.shape == (1, 1, 56, 70)
    direct = head((torch.randn(1, D, 4, 5), ), _text(1))
    assert direct.shape == (1, 1, 14, 18)


def test_sine_code_layout():
    code = sine_position_2d(2, 3, 8)
    assert code.shape == (6, 8)
    # pixel (y=1, x=2) is row 5; x half: sin/cos of 2*f, y half of 1*f
    f = torch.tensor([1.0, 10000**(-2 / 4)])
    expected = torch.tensor([
        math.sin(2 * f[0]), math.cos(2 * f[0]), math.sin(2 * f[1]),
        math.cos(2 * f[1]), math.sin(f[0]), math.cos(f[0]), math.sin(f[1]),
        math.cos(f[1])
    ])
    torch.testing.assert_close(code[5], expected)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match='out_channels'):
        _head(out_channels=2)
    with pytest.raises(ValueError, match='use_sigmoid'):
        _head(loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False))
    with pytest.raises(ValueError, match='DiceLoss'):
        _head(loss_decode=dict(type='DiceLoss', use_sigmoid=False))
    head = _head(num_decoder_layers=1).eval()
    with pytest.raises(ValueError, match='sentences'):
        head((torch.randn(2, D, 4, 4), ), _text(3))
    bad = _text(2)
    bad.tokens = torch.randn(2, L, CT + 1)
    with pytest.raises(ValueError, match='text_dims'):
        head((torch.randn(2, D, 4, 4), ), bad)


def test_registry_build_and_defaults():
    from mmseg.registry import MODELS
    import mmseg_sera.models.heads  # noqa: F401  (registers)
    head = MODELS.build(dict(type='ReferHead', in_channels=D, channels=C,
                             text_dims=CT, pooled_dims=CP))
    assert isinstance(head, ReferHead)
    assert head.num_classes == 2 and head.out_channels == 1
    assert head.threshold == 0.35 and head.ignore_index == 255
    names = [loss.loss_name for loss in head.loss_decode]
    assert names == ['loss_mask', 'loss_dice']


def test_mmseg_dice_alone_is_wrong_for_one_channel():
    """Why the head prepares Dice inputs itself: called directly on
    1-channel logits and B x H x W labels, mmseg 1.2.2's DiceLoss scores the
    *background* indicator and does not ignore 255. If this test starts to
    fail, upstream changed and the workaround in loss_by_feat can go."""
    from mmseg.models.losses import DiceLoss
    logits = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])
    lab = torch.tensor([[[1, 0], [0, 1]]])
    p, t = logits.sigmoid().flatten(), lab.flatten().float()

    def dice(target):
        return 1 - 2 * (p * target).sum() / ((p * p).sum() + 1e-3 +
                                             (target * target).sum() + 1e-3)

    direct = DiceLoss()(logits, lab)
    torch.testing.assert_close(direct, dice(1 - t))
    assert (direct - dice(t)).abs() > 1e-3
    ours = _head().loss_by_feat(logits, _samples(lab))['loss_dice']
    torch.testing.assert_close(ours, dice(t))


def test_coord_conv_gives_the_map_its_coordinates():
    """``coord_conv=True``: x + CBR(CBR([x, x-grid, y-grid])) before the
    decoder; the same features at two places of the map then differ."""
    head = _head(num_decoder_layers=0, coord_conv=True).eval()
    assert head.coord_conv[0].conv.in_channels == D + 2
    seen = []
    head.upsample = lambda x, *_: seen.append(x) or torch.zeros(
        x.shape[0], C, 12, 20)
    x = torch.randn(1, D, 1, 1).expand(1, D, 3, 5).contiguous()  # constant
    head((x, ), _text(1))
    grid = torch.stack([torch.linspace(-1, 1, 5).expand(3, 5),
                        torch.linspace(-1, 1, 3)[:, None].expand(3, 5)])
    expected = x + head.coord_conv(torch.cat([x, grid[None]], dim=1))
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0][..., 0, 0], seen[0][..., 2, 4])
    # off by default: no parameters, the map passes unchanged
    assert _head().coord_conv is None
