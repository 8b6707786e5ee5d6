"""SegVLM's parts (PEERS.md 4): SE block, DCNv2 refinement on two
backends, the refine stack in ReferHead, and the RAF loss, each against an
independent computation."""
import math

import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_sera  # noqa: F401  (registers the components)
from mmseg_sera.models.heads.refer_head import ReferHead
from mmseg_sera.models.heads.segvlm import (DeformableRefine,
                                            ModulatedDeformConv,
                                            SegVLMRefineBlock, SegVLMSEBlock,
                                            modulated_deform_conv2d)
from mmseg_sera.models.losses import RAFLoss
from mmseg_sera.models.structures import TextFeatures

BACKENDS = ['torchvision', 'mmcv']


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------
# DCNv2
# --------------------------------------------------------------------------
@pytest.mark.parametrize('backend', BACKENDS)
def test_dcn_zero_offsets_half_mask_is_half_a_conv(backend):
    """Offsets 0 and mask 0.5: DCNv2 = 0.5 * conv (bias added once); a
    fresh layer (zero-initialised offset conv) is exactly that."""
    x, w, b = _randn(2, 6, 5, 7), _randn(6, 6, 3, 3, seed=1), _randn(6)
    expected = 0.5 * F.conv2d(x, w, padding=1) + b[None, :, None, None]
    offset = torch.zeros(2, 18, 5, 7)
    mask = torch.full((2, 9, 5, 7), 0.5)
    out = modulated_deform_conv2d(x, offset, mask, w, b, padding=1,
                                  backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    layer = ModulatedDeformConv(6, backend=backend)
    with torch.no_grad():
        layer.bias.copy_(b)
    off, m = layer.offsets(x)
    assert (off == 0).all() and (m == 0.5).all()
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + b[None, :, None,
                                                              None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('k', [0, 2, 5, 7])
def test_offset_layout_interleaved_dy_dx_row_major(backend, k):
    """Channel 2k of the offset is dy and 2k + 1 is dx of kernel point
    k = i * 3 + j; mask channel k belongs to the same point. Only point k
    is on (mask one-hot), with offset (+1, -1): output(p) =
    w[:, :, i, j] . x(p + (i - 1, j - 1) + (1, -1)), zero outside the map;
    random offsets of the masked points change nothing."""
    x, w = _randn(1, 4, 6, 7), _randn(3, 4, 3, 3, seed=1)
    offset = _randn(1, 18, 6, 7, seed=2) * 3
    offset[:, 2 * k] = 1.0
    offset[:, 2 * k + 1] = -1.0
    mask = torch.zeros(1, 9, 6, 7)
    mask[:, k] = 1.0
    out = modulated_deform_conv2d(x, offset, mask, w, None, padding=1,
                                  backend=backend)
    i, j = divmod(k, 3)
    dy, dx = i - 1 + 1, j - 1 - 1
    xp = F.pad(x, (3, 3, 3, 3))  # zeros outside the map
    taps = xp[:, :, 3 + dy:3 + dy + 6, 3 + dx:3 + dx + 7]
    expected = torch.einsum('oc,bchw->bohw', w[:, :, i, j], taps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _randomise_offsets(layer, seed=3):
    g = _gen(seed)
    with torch.no_grad():
        layer.conv_offset.weight.copy_(
            torch.randn(layer.conv_offset.weight.shape, generator=g) * 0.3)
        layer.conv_offset.bias.copy_(
            torch.randn(layer.conv_offset.bias.shape, generator=g))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


@pytest.mark.parametrize('groups,extra', [(1, 0), (2, 0), (1, 5)])
def test_backends_agree_on_the_same_weights(groups, extra):
    """The same parameters give the same output and gradients under
    torchvision and mmcv, with random non-zero offsets (several pixels,
    fractional) and masks."""
    torch.manual_seed(0)
    tv = ModulatedDeformConv(8, deform_groups=groups, extra_channels=extra)
    _randomise_offsets(tv)
    mm = ModulatedDeformConv(8, deform_groups=groups, extra_channels=extra,
                             backend='mmcv')
    mm.load_state_dict(tv.state_dict())
    x = _randn(2, 8, 7, 9, seed=4)
    e = _randn(2, extra, seed=5) if extra else None
    off, mask = tv.offsets(x, e)
    assert off.abs().mean() > 0.5 and (off - off.round()).abs().max() > 0.1
    assert 0.05 < mask.mean() < 0.95
    outs, grads = [], []
    for layer in (tv, mm):
        xi = x.clone().requires_grad_()
        y = layer(xi, e)
        (y * _randn(*y.shape, seed=6)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _border_taps(H: int, W: int, K: int = 3) -> torch.Tensor:
    """Offset entries (2K^2 x H x W) whose kernel tap sits exactly on the
    top or left padding line (-1) at zero offset (padding 1), in the
    direction of that line's normal, next to a pixel of the map (a tap at
    a corner, (-1, -1), samples only padding in both directions)."""
    taps = torch.zeros(2 * K * K, H, W, dtype=torch.bool)
    for i in range(K):
        for j in range(K):
            k = i * K + j
            for oy in range(H):
                for ox in range(W):
                    y, x = oy - 1 + i, ox - 1 + j
                    taps[2 * k, oy, ox] = y == -1 and 0 <= x < W
                    taps[2 * k + 1, oy, ox] = x == -1 and 0 <= y < H
    return taps


def test_backends_differ_only_on_the_top_left_padding_line():
    """At zero offsets (every DCN at initialisation) the border taps of a
    3x3 kernel with padding 1 sample exactly on the padding lines. There the
    sampled value is not differentiable: it is 0 on the outer side and
    grows linearly on the inner side. torchvision's offset gradient is the
    one-sided derivative towards larger coordinates (its floor rule, the
    same at every integer position, on its CPU and CUDA kernels); mmcv's
    kernels return 0 for any tap at or beyond -1. The two therefore differ
    exactly on the taps of the top row and the left column (at the bottom
    and right lines, y = H and x = W, both give 0), and agree everywhere
    else; the outputs are equal."""
    H, W, C = 5, 6, 4
    x = _randn(1, C, H, W, seed=1)
    weight = _randn(3, C, 3, 3, seed=2)
    mask = torch.rand(1, 9, H, W, generator=_gen(3)) * 0.8 + 0.1
    up = _randn(1, 3, H, W, seed=4)
    outs, grads = {}, {}
    for backend in BACKENDS:
        offset = torch.zeros(1, 18, H, W, requires_grad=True)
        y = modulated_deform_conv2d(x, offset, mask, weight, None, padding=1,
                                    backend=backend)
        (y * up).sum().backward()
        outs[backend], grads[backend] = y.detach(), offset.grad[0]
    torch.testing.assert_close(outs['torchvision'], outs['mmcv'])
    taps = _border_taps(H, W)
    differ = (grads['torchvision'] - grads['mmcv']).abs() > 1e-5
    assert torch.equal(differ, taps)  # 2 x 3 x (W + H) - 4 = 62 entries
    assert int(taps.sum()) == 3 * W + 3 * H - 4
    assert torch.all(grads['mmcv'][taps] == 0)
    torch.testing.assert_close(grads['torchvision'][~taps],
                               grads['mmcv'][~taps], rtol=1e-4, atol=1e-5)

    # which side each backend takes: finite differences (float64, the
    # sampled value is linear on each side) moving all those taps inwards
    # match torchvision's sum, outwards mmcv's (0)
    def loss(offset):
        y = modulated_deform_conv2d(x.double(), offset, mask.double(),
                                    weight.double(), None, padding=1)
        return float((y * up.double()).sum())

    h = 1e-3
    zero = torch.zeros(1, 18, H, W, dtype=torch.float64)
    step = taps[None].double() * h
    inward = (loss(zero + step) - loss(zero)) / h
    outward = (loss(zero) - loss(zero - step)) / h
    assert inward == pytest.approx(float(grads['torchvision'][taps].sum()),
                                   rel=1e-4)
    assert outward == pytest.approx(0.0, abs=1e-9)


def test_mmcv_dcnv2_pack_loads_our_weights_and_agrees():
    """mmcv's own ``DCNv2`` layer (ModulatedDeformConv2dPack, which chunks
    its offset-conv output into o1, o2, mask) loads our state dict as it is
    and computes the same function: the layouts agree."""
    from mmcv.ops import ModulatedDeformConv2dPack
    torch.manual_seed(0)
    ours = ModulatedDeformConv(8, deform_groups=2)
    _randomise_offsets(ours)
    pack = ModulatedDeformConv2dPack(8, 8, 3, padding=1, deform_groups=2)
    pack.load_state_dict(ours.state_dict())
    x = _randn(2, 8, 6, 5, seed=1)
    for backend in BACKENDS:
        ours.backend = backend
        torch.testing.assert_close(ours(x), pack(x), rtol=1e-5, atol=1e-5)


def test_unknown_backend_names_the_choices():
    for make in (lambda: DeformableRefine(channels=8, backend='cuda'),
                 lambda: ModulatedDeformConv(8, backend='cuda'),
                 lambda: SegVLMRefineBlock(channels=8, backend='cuda'),
                 lambda: modulated_deform_conv2d(
                     torch.zeros(1, 1, 3, 3), torch.zeros(1, 18, 3, 3),
                     torch.zeros(1, 9, 3, 3), torch.zeros(1, 1, 3, 3),
                     None, padding=1, backend='cuda')):
        with pytest.raises(ValueError, match="'torchvision', 'mmcv'"):
            make()
    block = DeformableRefine(channels=8)
    with pytest.raises(ValueError, match='torchvision'):
        block.backend = 'dcn'
    block.backend = 'mmcv'
    assert block.dcn.backend == 'mmcv'


# --------------------------------------------------------------------------
# SE block
# --------------------------------------------------------------------------
def _se_by_hand(se, x, state=None):
    u = x.mean(dim=(2, 3))
    if state is not None:
        u = torch.cat([u, state @ se.text_proj.weight.T + se.text_proj.bias],
                      dim=1)
    hid = torch.clamp(u @ se.fc1.weight.T + se.fc1.bias, min=0)
    return torch.sigmoid(hid @ se.fc2.weight.T + se.fc2.bias)


@pytest.mark.parametrize('text_cond', [False, True])
def test_se_gate_by_hand(text_cond):
    torch.manual_seed(0)
    se = SegVLMSEBlock(channels=32, text_cond=text_cond, text_dims=7)
    assert se.hidden == 2 and se.fc1.in_features == 32 + 2 * text_cond
    x = _randn(3, 32, 4, 5)
    state = _randn(3, 7, seed=1) if text_cond else None
    e = _se_by_hand(se, x, state)
    torch.testing.assert_close(se.gate(x, state), e)
    torch.testing.assert_close(se(x, state), x * e[:, :, None, None])
    if text_cond:  # the gate depends on the sentence
        other = se.gate(x, _randn(3, 7, seed=2))
        assert not torch.allclose(other, e)
        with pytest.raises(ValueError, match='state'):
            se(x)
    se.residual = True
    torch.testing.assert_close(
        se(x, state), x + x * (2 * e[:, :, None, None] - 1))


def test_se_hidden_width_is_clamped_to_one():
    se = SegVLMSEBlock(channels=8, ratio=16)
    assert se.hidden == 1 and se.fc1.out_features == 1
    assert se(_randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_se_zero_init_gives_half_and_an_identity_residual():
    se = SegVLMSEBlock(channels=32, zero_init=True, text_cond=True,
                       text_dims=5)
    x, s = _randn(2, 32, 3, 4), _randn(2, 5, seed=1)
    assert (se.gate(x, s) == 0.5).all()
    torch.testing.assert_close(se(x, s), 0.5 * x)
    se.residual = True
    torch.testing.assert_close(se(x, s), x, rtol=0, atol=0)
    # the gate still learns: W2 gets a gradient
    se(x.requires_grad_(), s).pow(2).sum().backward()
    assert se.fc2.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------
# DeformableRefine, SegVLMRefineBlock
# --------------------------------------------------------------------------
def test_parameter_counts_equal_peers():
    """PEERS.md 4.2 / 4.3. The DCN core (main conv + offset conv) carries
    the quoted counts; the block adds W_s, BN (2C) and SE."""
    for c, n in ((256, 8_464), (512, 33_312), (768, 74_544)):
        assert _count(SegVLMSEBlock(channels=c)) == n
    plain = DeformableRefine(channels=256)
    assert _count(plain.dcn.conv_offset) == 62_235
    assert _count(plain.dcn) == 652_315
    assert _count(plain) == 652_315 + 512 + 8_464
    text = DeformableRefine(channels=256, text_cond=True, text_channels=64)
    assert _count(text.dcn) == 667_867
    assert _count(text.text_proj) == 512 * 64 + 64
    assert _count(text) == 667_867 + 32_832 + 512 + 8_464
    assert _count(DeformableRefine(channels=512).dcn) == 2_484_251
    # text-conditioned SE: W_s 512 -> 16 and 16 more inputs to W1
    se_text = DeformableRefine(channels=256, se_text_cond=True).se
    assert _count(se_text) == 8_464 + 512 * 16 + 16 + 16 * 16
    stack = SegVLMRefineBlock(channels=256, num_blocks=3)
    assert len(stack.blocks) == 3 and _count(stack) == 3 * _count(plain)
    assert _count(DeformableRefine(channels=256, se_ratio=None)) == \
        652_315 + 512


def test_deformable_refine_formula():
    """y = x + SE(BN(DCN(x))) with the offsets from Conv3x3([x; tile(W_s
    s)]), checked part by part (eval mode: BN uses running stats)."""
    torch.manual_seed(0)
    m = DeformableRefine(channels=16, text_cond=True, text_dims=6,
                         text_channels=4, se_text_cond=True).eval()
    _randomise_offsets(m.dcn)
    with torch.no_grad():
        m.norm.running_mean.normal_()
        m.norm.running_var.uniform_(0.5, 2)
    x, s = _randn(2, 16, 5, 6, seed=1), _randn(2, 6, seed=2)
    t = s @ m.text_proj.weight.T + m.text_proj.bias  # B x 4
    tiled = t[:, :, None, None].expand(2, 4, 5, 6)
    raw = F.conv2d(torch.cat([x, tiled], 1), m.dcn.conv_offset.weight,
                   m.dcn.conv_offset.bias, padding=1)
    offset, mask = raw[:, :18], raw[:, 18:].sigmoid()
    got_offset, got_mask = m.dcn.offsets(x, t)
    torch.testing.assert_close(got_offset, offset)
    torch.testing.assert_close(got_mask, mask)
    dcn = modulated_deform_conv2d(x, offset, mask, m.dcn.weight, m.dcn.bias,
                                  padding=1)
    bn = F.batch_norm(dcn, m.norm.running_mean, m.norm.running_var,
                      m.norm.weight, m.norm.bias, eps=m.norm.eps)
    e = _se_by_hand(m.se, bn, s)
    torch.testing.assert_close(m(x, s), x + bn * e[:, :, None, None],
                               rtol=1e-5, atol=1e-5)
    # the sentence moves the offsets
    assert not torch.allclose(m.dcn.offsets(x, t + 1)[0], offset)
    m.residual = False
    torch.testing.assert_close(m(x, s), bn * e[:, :, None, None],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='state'):
        m(x)


@pytest.mark.parametrize('backend', BACKENDS)
def test_gradients_reach_every_part(backend):
    """A fresh text-conditioned stack (zero offset conv) passes gradients
    to the input, the sentence (through the SE gate), the main convs and
    the offset convs, so the offsets can start to move; W_s of the offsets
    gets its gradient through the offset conv, which is 0 at the start."""
    torch.manual_seed(0)
    m = SegVLMRefineBlock(channels=16, num_blocks=2, text_cond=True,
                          text_dims=6, text_channels=4, backend=backend,
                          se_text_cond=True).train()
    x = _randn(2, 16, 5, 6).requires_grad_()
    s = _randn(2, 6, seed=1).requires_grad_()
    y = m(x, s)
    (y * _randn(*y.shape, seed=2)).sum().backward()
    assert x.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for blk in m.blocks:
        assert blk.dcn.weight.grad.abs().sum() > 0
        assert blk.dcn.conv_offset.weight.grad.abs().sum() > 0
        assert blk.se.fc2.weight.grad.abs().sum() > 0
        # zero offset-conv weights on the text channels: no signal yet
        assert blk.text_proj.weight.grad.abs().sum() == 0


# --------------------------------------------------------------------------
# ReferHead with refine blocks
# --------------------------------------------------------------------------
D, C, CT, CP = 16, 8, 12, 10


def _text(batch: int = 2, seed: int = 0) -> TextFeatures:
    g = _gen(seed)
    return TextFeatures(
        tokens=torch.randn(batch, 5, CT, generator=g),
        mask=torch.zeros(batch, 5, dtype=torch.bool),
        pooled=torch.randn(batch, CP, generator=g))


def _head(**kw) -> ReferHead:
    torch.manual_seed(0)
    cfg = dict(in_channels=D, channels=C, text_dims=CT, pooled_dims=CP,
               decoder_heads=2, num_decoder_layers=1, up_channels=(12, 6))
    cfg.update(kw)
    return ReferHead(**cfg)


REFINE = dict(num_blocks=2, text_cond=True, text_channels=4,
              se_text_cond=True)


def test_refine_off_keeps_the_head():
    """No refine attributes in the state dict when off; when on, the
    other layers start from the same weights (the blocks are built last)
    and only ``refine_*`` keys are added."""
    off, on = _head(), _head(refine_cfg=REFINE, refine_at=('neck', 'up'))
    assert off.refine_in is None and off.refine_up is None
    sd_off, sd_on = off.state_dict(), on.state_dict()
    assert not any(k.startswith('refine') for k in sd_off)
    extra = set(sd_on) - set(sd_off)
    assert extra and all(k.startswith(('refine_in.', 'refine_up.'))
                         for k in extra)
    for k, v in sd_off.items():
        torch.testing.assert_close(sd_on[k], v, rtol=0, atol=0)


@pytest.mark.parametrize('places', ['neck', 'up', ('neck', 'up')])
def test_refine_blocks_sit_where_asked_and_get_the_sentence(places):
    head = _head(refine_cfg=REFINE, refine_at=places).train()
    text = _text()
    calls = []
    blocks = []
    if 'neck' in places:
        assert isinstance(head.refine_in, SegVLMRefineBlock)
        assert head.refine_in.blocks[0].dcn.channels == D
        blocks.append(head.refine_in)
    else:
        assert head.refine_in is None
    if 'up' in places:
        assert [b.blocks[0].dcn.channels for b in head.refine_up] == [12, 6]
        blocks += list(head.refine_up)
    else:
        assert head.refine_up is None
    for b in blocks:
        assert len(b.blocks) == 2
        assert b.blocks[0].text_proj.in_features == CP  # = pooled_dims
        b.register_forward_hook(
            lambda mod, args, out: calls.append(
                (tuple(args[0].shape), args[1])))
    out = head((_randn(2, D, 4, 5), ), text)
    assert out.shape == (2, 1, 14, 18)
    shapes = [c[0] for c in calls]
    expected = ([(2, D, 4, 5)] if 'neck' in places else []) + (
        [(2, 12, 8, 10), (2, 6, 14, 18)] if 'up' in places else [])
    assert shapes == expected
    assert all(c[1] is text.pooled for c in calls)
    out.sum().backward()
    for b in blocks:
        assert all(p.grad is not None for p in b.parameters())


def test_refine_cfg_type_and_errors():
    head = _head(refine_cfg=dict(type='SegVLMSEBlock', ratio=4),
                 refine_at='up')
    assert [type(b).__name__ for b in head.refine_up] == ['SegVLMSEBlock'] * 2
    assert head((_randn(2, D, 4, 5), ), _text()).shape == (2, 1, 14, 18)
    with pytest.raises(ValueError, match='refine_at'):
        _head(refine_cfg=REFINE, refine_at='decoder')
    with pytest.raises(ValueError, match='refine_at'):
        _head(refine_cfg=REFINE, refine_at=())
    with pytest.raises(ValueError, match='channels'):
        _head(refine_cfg=dict(REFINE, channels=4))
    with pytest.raises(ValueError, match='upsampling steps'):
        _head(refine_cfg=REFINE, refine_at='up', in_stride=4,
              up_channels=None)


# --------------------------------------------------------------------------
# RAF loss
# --------------------------------------------------------------------------
IGN = 255


def _raf_batch():
    """Logits B x 1 x H x W and labels with ignored pixels; sample 0 has a
    small object, sample 1 a large one."""
    z = _randn(2, 1, 4, 5, seed=7) * 2
    y = torch.zeros(2, 4, 5, dtype=torch.long)
    y[0, 1, 1:3] = 1
    y[1, :3, :4] = 1
    y[0, 3, 4] = IGN
    y[1, 0, 0] = IGN
    y[1, 3, :2] = IGN
    return z, y


def _pixels(z, y):
    """[(sample, logit, label)] over valid pixels, python floats."""
    out = []
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                if y[b, i, j] != IGN:
                    out.append((b, float(z[b, 0, i, j]), float(y[b, i, j])))
    return out


def _sig(t):
    return 1 / (1 + math.exp(-t))


def test_raf_terms_by_hand():
    z, y = _raf_batch()
    pix = _pixels(z, y)
    n = len(pix)
    bce = sum(-(t * math.log(_sig(s)) + (1 - t) * math.log(1 - _sig(s)))
              for _, s, t in pix) / n
    a, g = 0.4, 1.5

    def focal(s, t):
        p = _sig(s)
        return (-a * t * (1 - p)**g * math.log(p)
                - (1 - a) * (1 - t) * p**g * math.log(1 - p))

    foc = sum(focal(s, t) for _, s, t in pix) / n
    gdl, plain = [], []
    for b in range(2):
        px = [(_sig(s), t) for bb, s, t in pix if bb == b]
        terms = []
        for cls in (1, 0):  # foreground, background
            pc = [p if cls else 1 - p for p, _ in px]
            yc = [t if cls else 1 - t for _, t in px]
            w = 1 / sum(yc)**2
            terms.append((w * sum(p * t for p, t in zip(pc, yc)),
                          w * (sum(pc) + sum(yc))))
        gdl.append(1 - 2 * sum(i for i, _ in terms) /
                   sum(u for _, u in terms))
        plain.append(1 - 2 * sum(p * t for p, t in px) /
                     (sum(p for p, _ in px) + sum(t for _, t in px)))
    loss = RAFLoss(alpha=a, gamma=g, lambda_focal=2.0, lambda_dice=0.5,
                   loss_weight=3.0)
    out = loss(z, y, weight=None, ignore_index=IGN)
    assert set(out) == {'loss_raf_bce', 'loss_raf_focal', 'loss_raf_dice'}
    check = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['loss_raf_bce'].item(), 3 * bce, **check)
    torch.testing.assert_close(out['loss_raf_focal'].item(), 6 * foc,
                               **check)
    torch.testing.assert_close(out['loss_raf_dice'].item(),
                               1.5 * sum(gdl) / 2, **check)
    for mode, value in (('plain', sum(plain) / 2),
                        ('log_cosh',
                         sum(math.log(math.cosh(d)) for d in plain) / 2)):
        got = RAFLoss(dice_mode=mode)(z, y)['loss_raf_dice'].item()
        torch.testing.assert_close(got, value, **check)
    # the per-sample weights matter: one set of weights for the whole
    # batch gives another value
    px = [(_sig(s), t) for _, s, t in pix]
    batch_terms = []
    for cls in (1, 0):
        pc = [p if cls else 1 - p for p, _ in px]
        yc = [t if cls else 1 - t for _, t in px]
        w = 1 / sum(yc)**2
        batch_terms.append((w * sum(p * t for p, t in zip(pc, yc)),
                            w * (sum(pc) + sum(yc))))
    batch = 1 - 2 * sum(i for i, _ in batch_terms) / sum(
        u for _, u in batch_terms)
    assert abs(batch - sum(gdl) / 2) > 1e-3
    # alpha weighs the positives: swapping it changes the focal term
    swapped = RAFLoss(alpha=1 - a, gamma=g)(z, y)['loss_raf_focal'].item()
    assert abs(swapped - foc) > 1e-3


def test_raf_default_constants():
    """alpha 0.25, gamma 2 (Lin et al.), generalised Dice, no boundary."""
    z, y = _raf_batch()
    ref = RAFLoss(alpha=0.25, gamma=2.0, dice_mode='generalised')(z, y)
    out = RAFLoss()(z, y)
    assert set(out) == set(ref) and 'loss_raf_boundary' not in out
    for k in out:
        torch.testing.assert_close(out[k], ref[k])


def test_raf_ignored_pixels_change_nothing():
    z, y = _raf_batch()
    loss = RAFLoss(lambda_boundary=1.0, boundary_kernel=3)
    for mode in ('generalised', 'plain', 'log_cosh'):
        loss.dice_mode = mode
        clean = loss(z, y)
        garbage = z.clone()
        ign = (y == IGN)[:, None]
        garbage[ign] = torch.tensor([1e4, -1e4, float('nan'),
                                     float('inf')])
        zg = garbage.requires_grad_()
        dirty = loss(zg, y)
        assert set(dirty) == set(clean)
        for k in clean:
            torch.testing.assert_close(dirty[k], clean[k], rtol=0, atol=0)
        sum(dirty.values()).backward()
        assert torch.isfinite(zg.grad).all()
        assert (zg.grad[ign] == 0).all() and zg.grad[~ign].abs().sum() > 0


def test_raf_empty_foreground_and_empty_samples():
    """Generalised Dice with no foreground in a sample: the absent class
    takes the other class's weight, so that sample scores mean(p) over its
    valid pixels; a sample without valid pixels is left out."""
    z = _randn(2, 1, 3, 3, seed=3)
    y = torch.zeros(2, 3, 3, dtype=torch.long)
    y[1] = IGN
    out = RAFLoss(lambda_bce=0, lambda_focal=0)(z, y)
    torch.testing.assert_close(out['loss_raf_dice'], z[0].sigmoid().mean(),
                               rtol=1e-5, atol=1e-6)
    all_ignored = torch.full((2, 3, 3), IGN)
    zz = z.clone().requires_grad_()
    out = RAFLoss(lambda_boundary=1.0)(zz, all_ignored)
    for k, v in out.items():
        assert v.item() == 0, k
    sum(out.values()).backward()
    assert (zz.grad == 0).all()


def _band_by_hand(y, k):
    """max minus min of y over the k x k window (inside the map)."""
    H, W = y.shape
    r = k // 2
    out = torch.zeros(H, W)
    for i in range(H):
        for j in range(W):
            win = y[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            out[i, j] = win.max() - win.min()
    return out


def test_raf_boundary_term_by_hand():
    y = torch.zeros(1, 9, 10, dtype=torch.long)
    y[0, 3:6, 2:7] = 1
    z = _randn(1, 1, 9, 10, seed=2)
    band = _band_by_hand(y[0].float(), 5)
    assert band.sum() > 0 and (band[y[0] == 1] == 1).all()
    bce = F.binary_cross_entropy_with_logits(z[0, 0], y[0].float(),
                                             reduction='none')
    beta = 3.0
    expected = ((1 + beta * band) * bce).mean() - bce.mean()
    out = RAFLoss(lambda_boundary=0.5, boundary_beta=beta)(z, y)
    torch.testing.assert_close(out['loss_raf_boundary'], 0.5 * expected)
    # an ignore region next to background draws no band
    y2 = torch.zeros(1, 9, 10, dtype=torch.long)
    y2[0, :, :4] = IGN
    out = RAFLoss(lambda_boundary=1.0)(z, y2)
    assert out['loss_raf_boundary'] == 0


def test_raf_soft_targets():
    """Fractional targets enter every term as y (here: BCE by hand)."""
    z = _randn(1, 1, 2, 3, seed=1)
    y = torch.tensor([[[0.0, 0.3, 1.0], [0.7, IGN, 0.5]]])
    valid = y != IGN
    expected = F.binary_cross_entropy_with_logits(z[:, 0][valid], y[valid])
    out = RAFLoss()(z, y)
    torch.testing.assert_close(out['loss_raf_bce'], expected)
    assert all(torch.isfinite(v) for v in out.values())


def test_raf_errors_and_registry():
    with pytest.raises(ValueError, match="'generalised', 'plain'"):
        RAFLoss(dice_mode='tversky')
    with pytest.raises(ValueError, match='loss_'):
        RAFLoss(loss_name='raf')
    with pytest.raises(ValueError, match='at least one'):
        RAFLoss(lambda_bce=0, lambda_focal=0, lambda_dice=0)
    with pytest.raises(ValueError, match='weights'):
        RAFLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2),
                  weight=torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match='1-channel'):
        RAFLoss()(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2))
    loss = MODELS.build(dict(type='RAFLoss', loss_name='loss_segvlm'))
    assert isinstance(loss, RAFLoss) and loss.loss_name == 'loss_segvlm'
    keys = set(loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 2)))
    assert keys == {'loss_segvlm_bce', 'loss_segvlm_focal',
                    'loss_segvlm_dice'}


def _samples(labels, soft=None):
    out = []
    for b, lab in enumerate(labels):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        if soft is not None:
            s.gt_soft_mask = PixelData(data=soft[b][None])
        out.append(s)
    return out


def test_head_merges_the_loss_dict_and_passes_soft_targets():
    """ReferHead with RAFLoss (+ BCE): each RAF term is its own key, equal
    to RAFLoss on the resized logits; with ``gt_soft_mask`` RAF gets the
    soft target (ignored pixels still ignored)."""
    head = _head(loss_decode=[
        dict(type='RAFLoss'),
        dict(type='CrossEntropyLoss', use_sigmoid=True, avg_non_ignore=True,
             loss_name='loss_mask')
    ])
    logits = _randn(2, 1, 3, 4)
    labels = torch.randint(0, 2, (2, 6, 8), generator=_gen(1))
    labels[0, 0, :3] = IGN
    up = F.interpolate(logits, size=(6, 8), mode='bilinear',
                       align_corners=False)
    out = head.loss_by_feat(logits, _samples(labels))
    ref = RAFLoss()(up, labels)
    assert set(out) == set(ref) | {'loss_mask', 'acc_seg'}
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])

    soft = torch.rand(2, 6, 8, generator=_gen(2))
    out = head.loss_by_feat(logits, _samples(labels, soft))
    target = soft.masked_fill(labels == IGN, IGN)
    ref = RAFLoss()(up, target)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    hard = RAFLoss()(up, labels)
    assert not torch.allclose(out['loss_raf_bce'], hard['loss_raf_bce'])
