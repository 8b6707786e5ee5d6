"""ReferringEncoderDecoder end to end on the tiny config: losses, predict
(letterbox and batch padding removed, resized to ``ori_shape``), agreement
of predict with tensor mode, per-sample sentences, and the paper's freezing
(which parameters get gradients)."""
import math
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_sera  # noqa: F401  (registers the components)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY_CONFIG = osp.join(
    REPO,
    'configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
LOSS_KEYS = ('loss_mask', 'loss_dice', 'loss_moe_z', 'loss_moe_balance',
             'loss_moe_token')


def build_tiny(**overrides: Dict) -> nn.Module:
    """The tiny config's model, random weights; ``overrides`` update the
    sub-dicts (``backbone=dict(trainable='ln_bias')``)."""
    cfg = Config.fromfile(TINY_CONFIG)
    model_cfg = cfg.model.to_dict()
    assert model_cfg['text_encoder']['pretrained'] is None
    assert model_cfg['backbone']['init_cfg'] is None
    for part, kw in overrides.items():
        model_cfg[part].update(kw)
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    return model


@pytest.fixture(scope='module')
def model() -> nn.Module:
    return build_tiny()


def letterbox(ori: Tuple[int, int], frame: Tuple[int, int]
              ) -> Tuple[Tuple[int, int], List[int]]:
    """Size of an ``ori`` image scaled to fit ``frame`` and its centred
    padding ``[left, right, top, bottom]``."""
    scale = min(frame[0] / ori[0], frame[1] / ori[1])
    h, w = round(ori[0] * scale), round(ori[1] * scale)
    top, left = (frame[0] - h) // 2, (frame[1] - w) // 2
    return (h, w), [left, frame[1] - w - left, top, frame[0] - h - top]


def make_batch(texts: Sequence[Optional[str]],
               ori_shapes: Sequence[Tuple[int, int]],
               frame: Tuple[int, int] = (112, 112),
               seed: int = 0,
               same_image: bool = False) -> dict:
    """Raw batch as the pipeline packs it: uint8 3 x H x W images (the
    letterboxed ``ori`` content, zeros around), gt 1 x H x W in {0, 1} on
    the content and 255 on the letterbox, metainfo with the sentence
    (omitted where ``None``)."""
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i, (text, ori) in enumerate(zip(texts, ori_shapes)):
        _, (l, r, t, b) = letterbox(ori, frame)
        H, W = frame
        if not (same_image and inputs):
            img = torch.zeros(3, H, W, dtype=torch.uint8)
            img[:, t:H - b, l:W - r] = torch.randint(
                0, 256, (3, H - t - b, W - l - r), generator=g,
                dtype=torch.uint8)
        else:
            img = inputs[0].clone()
        gt = torch.full((1, H, W), 255, dtype=torch.long)
        gt[:, t:H - b, l:W - r] = torch.randint(
            0, 2, (1, H - t - b, W - l - r), generator=g)
        meta = dict(ori_shape=ori, img_shape=frame, pad_shape=frame,
                    padding_size=[l, r, t, b])
        if text is not None:
            meta['text'] = text
        sample = SegDataSample(metainfo=meta)
        sample.gt_sem_seg = PixelData(data=gt)
        inputs.append(img)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def test_letterbox_helper():
    assert letterbox((70, 112), (112, 112)) == ((70, 112), [0, 0, 21, 21])
    assert letterbox((140, 84), (112, 112)) == ((112, 67), [22, 23, 0, 0])


# --------------------------------------------------------------------------
def test_loss_keys_and_values(model):
    model.train()
    data = model.data_preprocessor(
        make_batch(['the red circle', 'a blue square on the left'],
                   [(70, 112), (140, 84)]), training=True)
    assert data['inputs'].shape == (2, 3, 112, 112)
    losses = model(**data, mode='loss')
    for key in LOSS_KEYS:
        assert key in losses, key
        v = losses[key]
        assert v.ndim == 0 and torch.isfinite(v) and v.requires_grad, key
        assert v >= 0, key
    assert losses['loss_mask'] > 0.1 and losses['loss_dice'] > 0.1
    # every loss term is reported under a loss_ key (acc_seg is a metric)
    assert set(losses) == set(LOSS_KEYS) | {'acc_seg'}
    assert not losses['acc_seg'].requires_grad
    assert 0 <= float(losses['acc_seg']) <= 100


def _reference_probs(logits: torch.Tensor, input_hw: Tuple[int, int],
                     metas: List[dict]) -> List[torch.Tensor]:
    """Independent post-processing of tensor-mode logits: upsample to the
    (padded) input, cut the batch padding (``img_padding_size``) then the
    letterbox (``padding_size``), resize to ``ori_shape``, sigmoid."""
    up = F.interpolate(logits, size=input_hw, mode='bilinear',
                       align_corners=False)
    out = []
    for i, meta in enumerate(metas):
        x = up[i:i + 1]
        for key in ('img_padding_size', 'padding_size'):
            l, r, t, b = (int(v) for v in meta.get(key, (0, 0, 0, 0)))
            x = x[..., t:x.shape[-2] - b, l:x.shape[-1] - r]
        x = F.interpolate(x, size=tuple(meta['ori_shape']), mode='bilinear',
                          align_corners=False)
        out.append(x[0].sigmoid())
    return out


@pytest.mark.parametrize(
    'frame,ori_shapes',
    [
        # 112 x 112 letterbox: top/bottom bars, then left/right bars
        ((112, 112), [(70, 112), (140, 84)]),
        # 100 x 98 frame: the preprocessor pads 12 rows more (size_divisor
        # 14), recorded as img_padding_size, cut before the letterbox
        ((100, 98), [(60, 98), (100, 49)]),
    ])
def test_predict_matches_tensor_mode(model, frame, ori_shapes):
    model.eval()
    raw = make_batch(['the red circle', 'the big square at the bottom'],
                     ori_shapes, frame=frame)
    data = model.data_preprocessor(raw, training=False)
    input_hw = tuple(data['inputs'].shape[-2:])
    assert input_hw == tuple(-(-s // 14) * 14 for s in frame)
    # the reference reads the metainfo as it is before predict runs
    metas = [dict(s.metainfo) for s in data['data_samples']]
    with torch.no_grad():
        logits = model(**data, mode='tensor')
        results = model(**data, mode='predict')
    # tensor mode: raw stride-4 logits
    grid = [s // 14 for s in input_hw]
    assert logits.shape == (2, 1) + tuple(
        math.floor(g * 3.5 + 0.5) for g in grid)
    if frame != (112, 112):
        assert tuple(int(v) for v in metas[0]['img_padding_size']) == (
            0, 0, 0, input_hw[0] - frame[0])
    reference = _reference_probs(logits, input_hw, metas)
    threshold = model.decode_head.threshold
    assert threshold == 0.5
    for res, ori, ref in zip(results, ori_shapes, reference):
        probs = res.seg_logits.data
        pred = res.pred_sem_seg.data
        assert probs.shape == (1, ) + ori and pred.shape == (1, ) + ori
        assert ((probs >= 0) & (probs <= 1)).all()
        torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(pred.bool(), probs > threshold)
        assert set(pred.unique().tolist()) <= {0, 1}


def test_sentence_decides_the_logits(model):
    model.eval()
    texts = ['the red circle on the left', 'the blue square at the top',
             'the red circle on the left']
    data = model.data_preprocessor(
        make_batch(texts, [(112, 112)] * 3, same_image=True),
        training=False)
    assert torch.equal(data['inputs'][0], data['inputs'][1])
    with torch.no_grad():
        logits = model(**data, mode='tensor')
        # each sample is predicted on its own (eval mode): the first sample
        # alone gives the same logits as inside the batch
        alone = model(data['inputs'][:1], data['data_samples'][:1],
                      mode='tensor')
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    torch.testing.assert_close(logits[0], logits[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mode', ['loss', 'predict', 'tensor'])
def test_missing_text_raises(model, mode):
    model.train(mode == 'loss')
    data = model.data_preprocessor(
        make_batch(['the red circle', None], [(112, 112)] * 2),
        training=mode == 'loss')
    with pytest.raises(KeyError, match='text'):
        model(**data, mode=mode)


def test_predict_needs_data_samples(model):
    model.eval()
    x = torch.zeros(1, 3, 28, 28)
    with pytest.raises(ValueError, match='text'):
        model.predict(x, None)
    with pytest.raises(ValueError, match='text'):
        model._forward(x, None)


# --------------------------------------------------------------------------
def _backbone_ln_bias(backbone: nn.Module) -> set:
    """LayerNorm parameters and ``*bias`` parameters of the backbone's own
    modules (adapters excluded), derived from module types."""
    names = set()
    for mname, m in backbone.named_modules():
        if mname.startswith('adapters'):
            continue
        for pname, _ in m.named_parameters(recurse=False):
            if isinstance(m, nn.LayerNorm) or pname.endswith('bias'):
                names.add(f'{mname}.{pname}')
    return names


def test_paper_freezing_gradients():
    model = build_tiny(
        backbone=dict(trainable='ln_bias'),
        text_encoder=dict(trainable='frozen'))
    model.train()
    # frozen parts stay in eval mode, the adapters and the rest train
    assert not model.text_encoder.training
    assert not model.backbone.blocks.training
    assert not model.backbone.norm.training
    assert all(a.training for a in model.backbone.adapters.values())
    assert model.neck.training and model.decode_head.training

    data = model.data_preprocessor(
        make_batch(['the red circle', 'a blue square on the left'],
                   [(70, 112), (140, 84)]), training=True)
    losses = model(**data, mode='loss')
    total = sum(v for k, v in losses.items() if k.startswith('loss'))
    total.backward()

    def with_grad(module):
        return {n for n, p in module.named_parameters() if p.grad is not None}

    def names(module, skip=None):
        return {
            n
            for n, _ in module.named_parameters()
            if skip is None or not n.startswith(skip)
        }

    # text encoder: nothing
    assert with_grad(model.text_encoder) == set()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())

    # backbone: LayerNorm + bias of its own modules, and every adapter param
    bb = model.backbone
    own_expected = _backbone_ln_bias(bb)
    adapter_names = {n for n in names(bb) if n.startswith('adapters.')}
    assert with_grad(bb) == own_expected | adapter_names
    # the policy picks what it should (spot checks), and few parameters
    for n in ('blocks.0.norm1.weight', 'blocks.0.norm1.bias',
              'blocks.3.attn.qkv.bias', 'blocks.2.mlp.fc2.bias',
              'patch_embed.proj.bias', 'norm.weight'):
        assert n in own_expected, n
    for n in ('blocks.0.attn.qkv.weight', 'blocks.1.mlp.fc1.weight',
              'blocks.0.ls1.gamma', 'pos_embed', 'cls_token',
              'patch_embed.proj.weight'):
        assert n not in with_grad(bb), n
    own = {n: p for n, p in bb.named_parameters()
           if not n.startswith('adapters.')}
    share = sum(own[n].numel() for n in own_expected) / sum(
        p.numel() for p in own.values())
    assert 0 < share < 0.05
    # the zero-initialised up-projections get real gradients
    for a in bb.adapters.values():
        assert a.up_proj.weight.grad.abs().sum() > 0

    # neck (top_k=4: every expert routed) and head: every parameter.
    assert model.neck.top_k == model.neck.num_experts == 4
    assert with_grad(model.neck) == names(model.neck)
    assert with_grad(model.decode_head) == names(model.decode_head)

    # nothing without requires_grad has a gradient, and vice versa
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
