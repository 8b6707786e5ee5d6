"""The second-modality plumbing (DINOv2 ``block_context`` -> post_block
``second=``, ``DINOv2.block_tokens``), ``DualStreamDINOv2`` and
``BackboneAuxLossHead`` in mmseg's stock ``EncoderDecoder``.

The adapters here are a recording stand-in defined in this file (the real
``SpectralMoEAdapter`` has its own tests): it stores every ``second`` it
receives, so the tests can check which tokens reach which block."""
import importlib.util
import os.path as osp
from typing import List, Optional

import pytest
import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.registry import DefaultScope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import Tensor

import mmseg_sera  # noqa: F401  (registers the components)
from mmseg_sera.models.backbones import (BackboneFeatures, DualStreamDINOv2,
                                         resolve_block_map)
from mmseg_sera.models.backbones.slots import AdapterSlots
from mmseg_sera.models.heads import BackboneAuxLossHead
from mmseg_sera.models.structures import AdapterOutput

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RECORDER = '_TestSecondRecordingAdapter'


@MODELS.register_module(name=RECORDER, force=True)
class SecondRecordingAdapter(nn.Module):
    """post_block stand-in: ``x + lin(x)``; records ``second`` (None when
    the argument was not passed); aux loss ``loss_moe_balance = mean(W^2)
    + 0.1 mean(second)`` (so the tests can tell what it was given)."""
    slot_kind = 'post_block'

    def __init__(self, embed_dims: int, second_dims: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(embed_dims, embed_dims)
        self.seen: List[Optional[Tensor]] = []

    def forward(self, x: Tensor, *, hw, text=None,
                second: Optional[Tensor] = None) -> AdapterOutput:
        self.seen.append(second)
        loss = self.lin.weight.pow(2).mean()
        if second is not None:
            loss = loss + 0.1 * second.mean()
        return AdapterOutput(x + self.lin(x),
                             aux_losses=dict(loss_moe_balance=loss))


class NoSecondAdapter(nn.Module):
    """An adapter with the pre-existing signature (no ``second``)."""

    def forward(self, x: Tensor, *, hw, text=None) -> AdapterOutput:
        return AdapterOutput(x * 2)


def _tiny(dims: int = 32, layers: int = 3) -> dict:
    return dict(embed_dims=dims, num_layers=layers, num_heads=2, mlp_ratio=2)


def _dinov2(**kw) -> dict:
    cfg = dict(type='DINOv2', arch=_tiny(), patch_size=7, img_size=28,
               in_channels=3)
    cfg.update(kw)
    return cfg


def _dual(main: Optional[dict] = None, second: Optional[dict] = None,
          **kw) -> DualStreamDINOv2:
    main = main or _dinov2(in_channels=6, out_indices=(0, 1, 2),
                           adapters=[dict(type=RECORDER, insert=(0, 1, 2))],
                           trainable='full')
    second = second or _dinov2(arch=_tiny(16))
    cfg = dict(type='DualStreamDINOv2', backbone=main, second=second,
               second_bands=(2, 1, 0))
    cfg.update(kw)
    return MODELS.build(cfg)


# --------------------------------------------------------------------------
# plumbing: slots and the DINOv2 block loop
# --------------------------------------------------------------------------
def test_run_post_block_passes_second_only_when_given():
    slots = AdapterSlots(owner='t', kinds=('post_block', ), num_layers=2,
                         embed_dims=8)
    slots.add('post_block', 0, NoSecondAdapter())
    slots.add('post_block', 1, MODELS.build(dict(type=RECORDER,
                                                 embed_dims=8)))
    tokens = torch.randn(2, 1 + 4, 8)
    # an adapter without `second` keeps working when none is given
    out, res = slots.run_post_block(0, tokens, num_prefix=1, hw=(2, 2),
                                    text=None)
    assert torch.equal(out[:, :1], tokens[:, :1])
    assert torch.equal(out[:, 1:], 2 * tokens[:, 1:])
    g = torch.randn(2, 9, 5)
    slots.run_post_block(1, tokens, num_prefix=1, hw=(2, 2), text=None)
    slots.run_post_block(1, tokens, num_prefix=1, hw=(2, 2), text=None,
                         second=g)
    seen = slots.adapter('post_block', 1).seen
    assert seen[0] is None and seen[1] is g
    # and an adapter that has no `second` refuses one it would ignore
    with pytest.raises(TypeError, match='second'):
        slots.run_post_block(0, tokens, num_prefix=1, hw=(2, 2), text=None,
                             second=g)


def _marked(B: int, value: float) -> Tensor:
    return torch.full((B, 3, 5), float(value))


def test_block_context_reaches_the_adapter_of_its_block():
    m = MODELS.build(
        _dinov2(out_indices=(3, ), arch=_tiny(layers=4),
                adapters=[dict(type=RECORDER, insert=(0, 2))]))
    x = torch.randn(2, 3, 28, 28)
    a0, a2 = m.adapters.adapter('post_block', 0), m.adapters.adapter(
        'post_block', 2)
    forms = {
        'sequence': [_marked(2, i) for i in range(4)],
        'mapping': {0: _marked(2, 0), 2: _marked(2, 2), 3: _marked(2, 3)},
        'callable': lambda i: _marked(2, i),
    }
    for name, ctx in forms.items():
        m.forward_features(x, block_context=ctx)
        assert a0.seen[-1].unique().tolist() == [0.], name
        assert a2.seen[-1].unique().tolist() == [2.], name
    # None entries and absent keys: the adapter is called without it
    m.forward_features(x, block_context=[None, None, _marked(2, 7), None])
    assert a0.seen[-1] is None and a2.seen[-1].unique().tolist() == [7.]
    m.forward_features(x)
    assert a0.seen[-1] is None and a2.seen[-1] is None
    with pytest.raises(ValueError, match='3 entries, the backbone 4 blocks'):
        m.forward_features(x, block_context=[None] * 3)
    with pytest.raises(ValueError, match='block_context must be'):
        m.forward_features(x, block_context=_marked(2, 0))


def test_block_context_leaves_adapters_without_second_unchanged():
    """SERAAdapter (no ``second`` argument): the same output with and
    without the new argument left at its default."""
    cfg = _dinov2(arch=_tiny(), adapter_indices=(1, ),
                  adapter_cfg=dict(type='SERAAdapter', text_dims=16,
                                   hidden_dims=8, num_heads=2),
                  out_indices=(2, ))
    torch.manual_seed(0)
    m = MODELS.build(cfg).eval()
    from mmseg_sera.models.structures import TextFeatures
    text = TextFeatures(tokens=torch.randn(2, 4, 16),
                        mask=torch.zeros(2, 4, dtype=torch.bool),
                        pooled=torch.randn(2, 16))
    x = torch.randn(2, 3, 28, 28)
    a = m.forward_features(x, text)
    b = m.forward_features(x, text, block_context=None)
    assert torch.equal(a.feats[0], b.feats[0])


@pytest.mark.parametrize('trainable', ['frozen', 'full'])
def test_block_tokens_are_the_bare_blocks(trainable):
    m = MODELS.build(
        _dinov2(num_register_tokens=2, out_indices=(0, 1, 2),
                out_norm='none', trainable=trainable,
                adapters=[dict(type=RECORDER, insert=(1, ))]))
    x = torch.randn(2, 3, 28, 28)
    toks = m.block_tokens(x)
    assert [t.shape for t in toks] == [torch.Size([2, 16, 32])] * 3
    assert all(t.requires_grad == (trainable == 'full') for t in toks)
    assert m.adapters.adapter('post_block', 1).seen == []  # no adapter ran
    # the same as the loop without adapters
    bare = MODELS.build(
        _dinov2(num_register_tokens=2, out_indices=(0, 1, 2),
                out_norm='none'))
    bare.load_state_dict(
        {k: v for k, v in m.state_dict().items()
         if not k.startswith('adapters.')})
    maps = bare.forward_features(x).feats
    for t, f in zip(toks, maps):
        torch.testing.assert_close(t, f.flatten(2).transpose(1, 2))
    normed = m.block_tokens(x, num_blocks=2, norm=True)
    assert len(normed) == 2
    torch.testing.assert_close(normed[1], m.norm(toks[1]))
    with pytest.raises(ValueError, match='num_blocks'):
        m.block_tokens(x, num_blocks=4)


# --------------------------------------------------------------------------
# DualStreamDINOv2
# --------------------------------------------------------------------------
def test_resolve_block_map():
    assert resolve_block_map(None, 3, 3) == {0: 0, 1: 1, 2: 2}
    assert resolve_block_map('proportional', 4, 8) == {
        0: 1, 1: 3, 2: 5, 3: 7}
    assert resolve_block_map('proportional', 4, 2) == {
        0: 0, 1: 0, 2: 0, 3: 1}
    assert resolve_block_map({0: -1, -1: 0}, 3, 5) == {0: 4, 2: 0}
    assert resolve_block_map([None, 2, 0], 3, 3) == {1: 2, 2: 0}
    with pytest.raises(ValueError, match='3 blocks and the second'):
        resolve_block_map(None, 3, 4)
    with pytest.raises(ValueError,
                       match=r'block_map\[0\]: second-backbone block 5 is '
                       'out of range'):
        resolve_block_map({0: 5}, 3, 5)
    with pytest.raises(ValueError, match='block_map: backbone block 3'):
        resolve_block_map({3: 0}, 3, 5)
    with pytest.raises(ValueError, match='2 entries'):
        resolve_block_map([0, 1], 3, 3)
    with pytest.raises(ValueError, match="'proportional'"):
        resolve_block_map('linear', 3, 3)


def _count_calls(blocks: nn.ModuleList) -> List[int]:
    counts = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_hook(
            lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize('depth2,block_map,expected', [
    (3, None, {0: 0, 1: 1, 2: 2}),
    (5, {0: 4, 2: 1}, {0: 4, 2: 1}),
    (6, 'proportional', {0: 1, 1: 3, 2: 5}),
])
def test_dual_stream_hands_each_block_its_second_tokens(
        depth2, block_map, expected):
    torch.manual_seed(0)
    m = _dual(second=_dinov2(arch=_tiny(16, depth2)), block_map=block_map)
    assert m.block_map == expected
    calls = _count_calls(m.second.blocks)
    x = torch.randn(2, 6, 28, 28)
    feats = m(x)
    assert isinstance(feats, BackboneFeatures) and isinstance(feats, tuple)
    assert [f.shape for f in feats] == [torch.Size([2, 32, 4, 4])] * 3
    # the second backbone runs once, up to the last block it must give
    last = max(expected.values())
    assert calls == [1] * (last + 1) + [0] * (depth2 - last - 1)
    ref = m.second.block_tokens(x[:, [2, 1, 0]])
    for i in range(3):
        seen = m.backbone.adapters.adapter('post_block', i).seen[-1]
        if i in expected:
            assert seen.shape == (2, 16, 16)
            torch.testing.assert_close(seen, ref[expected[i]])
        else:
            assert seen is None
    # the aux loss is the adapters' sum, as a value on the tuple
    want = sum(
        m.backbone.adapters.adapter('post_block', i).lin.weight.pow(2).mean()
        + (0.1 * ref[expected[i]].mean() if i in expected else 0.)
        for i in range(3))
    torch.testing.assert_close(feats.aux_losses['loss_moe_balance'], want)


def test_frozen_parts_get_no_gradients():
    main = _dinov2(in_channels=6, out_indices=(1, 2),
                   adapters=[dict(type=RECORDER, insert=(0, 1, 2))],
                   trainable='frozen')
    m = _dual(main=main)
    m.train()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {
        f'backbone.adapters.{i}.lin.{w}' for i in range(3)
        for w in ('weight', 'bias')}
    assert not m.second.blocks.training and not m.backbone.blocks.training
    feats = m(torch.randn(2, 6, 28, 28))
    for i in range(3):
        assert not m.backbone.adapters.adapter('post_block',
                                               i).seen[-1].requires_grad
    (sum(f.sum() for f in feats) +
     feats.aux_losses['loss_moe_balance']).backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got == trainable


def test_out_scales_make_a_pyramid():
    m = _dual(out_scales=(4, 1, 0.5))
    feats = m(torch.randn(1, 6, 28, 28))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match='one positive scale per returned'):
        _dual(out_scales=(2, 1))
    with pytest.raises(ValueError, match='must be 1 / k'):
        _dual(out_scales=(2, 1, 0.4))


def test_band_count_errors():
    m = _dual()
    with pytest.raises(ValueError, match='expects 6-band input.*got 5 bands'):
        m(torch.randn(1, 5, 28, 28))
    with pytest.raises(ValueError,
                       match=r'second_bands selects 2 bands \(0, 1\), but '
                       'the second has in_channels=3'):
        _dual(second_bands=(0, 1))
    with pytest.raises(ValueError,
                       match=r'bands \[6\] do not exist in a 6-band input'):
        _dual(second_bands=(0, 1, 6))
    with pytest.raises(ValueError,
                       match='second takes 3 bands and the input has 6'):
        _dual(second_bands=None)
    # a 3-band backbone fed from a 6-band input needs in_channels
    rgb = _dinov2(out_indices=(0, 1, 2),
                  adapters=[dict(type=RECORDER, insert=(0, 1, 2))])
    with pytest.raises(ValueError, match='set in_channels'):
        _dual(main=rgb, backbone_bands=(2, 1, 0))
    with pytest.raises(ValueError,
                       match='backbone_bands selects 4 bands .* '
                       'in_channels=3'):
        _dual(main=rgb, backbone_bands=(3, 2, 1, 0), in_channels=6)
    m = _dual(main=rgb, backbone_bands=(2, 1, 0), in_channels=6)
    assert len(m(torch.randn(1, 6, 28, 28))) == 3
    # and DINOv2 itself names the expected band count
    with pytest.raises(ValueError, match='expects B x 6 x H x W'):
        _dual().backbone.prepare_tokens(torch.randn(1, 3, 28, 28))


def test_dual_stream_structure_errors():
    with pytest.raises(ValueError, match='no post_block adapter'):
        _dual(main=_dinov2(in_channels=6))
    with pytest.raises(ValueError, match='second backbone must have no'):
        _dual(second=_dinov2(arch=_tiny(16),
                             adapters=[dict(type=RECORDER, insert=0)]))


def test_three_band_checkpoint_into_six_band_backbone_is_refused(tmp_path):
    rgb = MODELS.build(_dinov2())
    path = str(tmp_path / 'rgb.pth')
    torch.save(dict(rgb.backbone_named_parameters()), path)
    six = MODELS.build(_dinov2(in_channels=6))
    with pytest.raises(ValueError,
                       match='patch embedding takes 3 input bands, this '
                       'backbone has in_channels=6'):
        six.load_pretrained(path)


def _converter():
    path = osp.join(REPO, 'tools', 'model_converters', 'dinov2_to_sera.py')
    spec = importlib.util.spec_from_file_location('_dinov2_to_sera', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_second_backbone_loads_a_converted_official_checkpoint(tmp_path):
    """An official-layout DINOv2 file (mask_token, chunked blocks) is
    converted by the repository's converter and loaded into the second
    backbone by its own init_cfg; the main backbone is left alone."""
    torch.manual_seed(1)
    src = MODELS.build(_dinov2(arch=_tiny(16)))
    official = {}
    for k, v in src.backbone_named_parameters():
        if k.startswith('blocks.'):  # block_chunks=1: blocks.0.<i>.*
            k = 'blocks.0.' + k[len('blocks.'):]
        official[k] = v.detach().clone()
    official['mask_token'] = torch.zeros(1, 16)
    raw = str(tmp_path / 'dinov2_official.pth')
    torch.save(official, raw)
    converted = str(tmp_path / 'dinov2_sera.pth')
    assert _converter().main([raw, converted]) == 0

    second = _dinov2(arch=_tiny(16),
                     init_cfg=dict(type='Pretrained', checkpoint=converted))
    torch.manual_seed(2)
    m = _dual(second=second)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    m.init_weights()
    for k, v in src.backbone_named_parameters():
        torch.testing.assert_close(dict(m.second.named_parameters())[k], v)
    # official, no registers: the recorded resampling mode is applied
    assert m.second.pos_resampling.tolist() == [1000, 0]
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in m.second.parameters())


# --------------------------------------------------------------------------
# BackboneAuxLossHead in the stock EncoderDecoder
# --------------------------------------------------------------------------
def test_aux_head_returns_the_carried_losses():
    loss = torch.tensor(0.25)
    feats = BackboneFeatures([torch.zeros(1)], aux_losses=dict(
        loss_moe_balance=loss, loss_other=2 * loss))
    head = BackboneAuxLossHead(loss_weight=2.)
    assert head.loss(feats, [], None) == dict(loss_moe_balance=2 * loss,
                                              loss_other=4 * loss)
    only = BackboneAuxLossHead(keys=['loss_other'])
    assert set(only.loss(feats, [], None)) == {'loss_other'}
    with pytest.raises(KeyError, match='loss_missing'):
        BackboneAuxLossHead(keys=['loss_missing']).loss(feats, [], None)
    with pytest.raises(ValueError, match='start with "loss"'):
        BackboneAuxLossHead(keys=['balance'])
    with pytest.raises(ValueError, match='no neck'):
        head.loss((torch.zeros(1), ), [], None)
    with pytest.raises(RuntimeError, match='no prediction'):
        head.predict(feats, [], None)
    assert not list(head.parameters())


def _segmentor(decode_head: dict) -> nn.Module:
    cfg = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[0.] * 6,
                               std=[1.] * 6, size=(28, 28)),
        backbone=dict(
            type='DualStreamDINOv2',
            backbone=_dinov2(in_channels=6, out_indices=(0, 1, 2),
                             adapters=[dict(type=RECORDER,
                                            insert=(0, 1, 2))],
                             trainable='frozen'),
            second=_dinov2(arch=_tiny(16)),
            second_bands=(2, 1, 0),
            out_scales=(2, 1, 0.5)),
        decode_head=decode_head,
        auxiliary_head=dict(type='BackboneAuxLossHead'),
        train_cfg=dict(),
        test_cfg=dict(mode='whole'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(ConfigDict(cfg))  # attribute access, as a config


def _batch(B: int = 2, size: int = 28):
    samples = []
    for _ in range(B):
        shape = (size, size)
        s = SegDataSample(metainfo=dict(ori_shape=shape, img_shape=shape,
                                        pad_shape=shape))
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 4, (1, *shape), dtype=torch.long))
        samples.append(s)
    inputs = [torch.randn(6, size, size) for _ in samples]
    return dict(inputs=inputs, data_samples=samples)


UPER = dict(type='UPerHead', in_channels=[32] * 3, in_index=[0, 1, 2],
            pool_scales=(1, 2), channels=16, num_classes=4,
            norm_cfg=dict(type='BN', requires_grad=True),
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0))
FCN = dict(type='FCNHead', in_channels=32, in_index=2, channels=16,
           num_convs=1, num_classes=4, align_corners=False,
           norm_cfg=dict(type='BN', requires_grad=True),
           loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0))


@pytest.mark.parametrize('head', [UPER, FCN], ids=['uperhead', 'fcnhead'])
def test_aux_losses_reach_the_stock_encoder_decoder(head):
    from mmseg.models.segmentors import EncoderDecoder
    torch.manual_seed(0)
    model = _segmentor(head)
    assert type(model) is EncoderDecoder
    model.train()
    data = model.data_preprocessor(_batch(), training=True)
    losses = model(**data, mode='loss')
    assert set(losses) >= {'decode.loss_ce', 'aux.loss_moe_balance'}
    # the value is the adapters' own: recompute it from the adapters
    adapters = [model.backbone.backbone.adapters.adapter('post_block', i)
                for i in range(3)]
    want = sum(a.lin.weight.pow(2).mean() + 0.1 * a.seen[-1].mean()
               for a in adapters)
    torch.testing.assert_close(losses['aux.loss_moe_balance'], want)
    total, log = model.parse_losses(losses)
    torch.testing.assert_close(
        total, losses['decode.loss_ce'] + losses['aux.loss_moe_balance'])
    assert 'aux.loss_moe_balance' in log
    total.backward()
    # the frozen towers get nothing; adapters and the head train
    for n, p in model.backbone.named_parameters():
        assert (p.grad is not None) == ('.adapters.' in n), n
    assert all(p.grad is not None for p in model.decode_head.parameters())
    # prediction does not call the auxiliary head
    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(_batch(), training=False),
                    mode='predict')
    assert out[0].pred_sem_seg.data.shape == (1, 28, 28)
