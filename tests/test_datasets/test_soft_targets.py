"""Soft mask targets (the CRIS/ETRIS/DETRIS recipe, PEERS.md 1.1): the mask
is resized bilinearly, so the target is fractional at the object's edges.

``ReferResizePad(mask_interp='bilinear')`` writes ``gt_soft_mask``,
``PackReferSegInputs`` packs it, ``BaseReferHead.loss_by_feat`` trains on
it; the default (``'nearest'``) path is unchanged."""
import copy
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData

from mmseg.registry import DATASETS, MODELS
from mmseg.structures import SegDataSample
from mmseg_sera.datasets.transforms import (SOFT_MASK_KEY,
                                            PackReferSegInputs,
                                            RandomReferFlip, ReferResizePad)
from mmseg_sera.models.heads import CRISHead, ReferHead
from mmseg_sera.models.heads.refer_head import SOFT_TARGET_KEY

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DETRIS_REFCOCO = osp.join(
    REPO, 'configs', 'detris',
    'detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py')
DETRIS_TINY = osp.join(
    REPO, 'configs', 'detris',
    'detris_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')


def _toy(h=9, w=14):
    """A toy sample: a 4 x 6 object with a one-pixel ignored border."""
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w), np.uint8)
    mask[2:6, 3:9] = 1
    mask[0] = 255  # ignored row
    return dict(img=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                img_shape=(h, w), ori_shape=(h, w), gt_seg_map=mask,
                seg_fields=['gt_seg_map'], text='the box')


def _bilinear_by_hand(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize written out: half-pixel centres, source coordinate
    ``(i + 0.5) * in / out - 0.5`` clamped to the image, no antialiasing
    (OpenCV's INTER_LINEAR, PyTorch's ``align_corners=False``)."""
    in_h, in_w = src.shape

    def taps(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x = np.clip(x, 0, n_in - 1)
        x0 = np.floor(x).astype(int)
        x1 = np.minimum(x0 + 1, n_in - 1)
        return x0, x1, x - x0

    y0, y1, fy = taps(out_h, in_h)
    x0, x1, fx = taps(out_w, in_w)
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


# --------------------------------------------------------------------------
# transform and packing
# --------------------------------------------------------------------------
@pytest.mark.parametrize('size', [(32, 32), (6, 8)])  # up- and downsampling
def test_soft_target_is_a_bilinear_resize_of_the_mask(size):
    base = _toy()
    out = ReferResizePad(size=size, mask_interp='bilinear')(
        copy.deepcopy(base))
    new_h, new_w = out['resized_shape']
    left, right, top, bottom = out['padding_size']
    binary = (base['gt_seg_map'] == 1).astype(np.float64)
    ref = np.pad(_bilinear_by_hand(binary, new_h, new_w),
                 ((top, bottom), (left, right)))
    soft = out[SOFT_MASK_KEY]
    assert soft.dtype == np.float32 and soft.shape == size
    np.testing.assert_allclose(soft, ref, atol=1e-5)
    if size == (32, 32):  # upsampled: fractional along the edges
        edge = (soft > 0) & (soft < 1)
        assert edge.any() and (soft == 1).any()
    # the binary map is what the default transform gives
    hard = ReferResizePad(size=size)(copy.deepcopy(base))
    np.testing.assert_array_equal(out['gt_seg_map'], hard['gt_seg_map'])
    np.testing.assert_array_equal(out['img'], hard['img'])
    assert out['seg_fields'] == ['gt_seg_map', SOFT_MASK_KEY]
    # the same as torch's bilinear resize
    torch_ref = F.interpolate(
        torch.from_numpy(binary)[None, None], size=(new_h, new_w),
        mode='bilinear', align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(
        soft[top:top + new_h, left:left + new_w], torch_ref, atol=1e-5)


def test_default_transform_writes_no_soft_target():
    base = _toy()
    default = ReferResizePad(size=(32, 32))
    assert default.mask_interp == 'nearest'
    out = default(copy.deepcopy(base))
    assert SOFT_MASK_KEY not in out and out['seg_fields'] == ['gt_seg_map']
    assert set(np.unique(out['gt_seg_map'])) == {0, 1, 255}
    packed = PackReferSegInputs()(out)['data_samples']
    assert SOFT_MASK_KEY not in packed
    assert packed.gt_sem_seg.data.dtype == torch.int64
    assert "mask_interp='nearest'" in repr(default)
    with pytest.raises(ValueError, match='mask_interp'):
        ReferResizePad(mask_interp='bicubic')


def test_soft_target_is_packed_and_flipped_with_the_mask():
    assert SOFT_MASK_KEY == SOFT_TARGET_KEY  # the transform feeds the head
    np.random.seed(0)
    r = ReferResizePad(size=(16, 24), mask_interp='bilinear')(_toy())
    soft = r[SOFT_MASK_KEY].copy()
    r = RandomReferFlip(prob=1.0)(r)
    np.testing.assert_array_equal(r[SOFT_MASK_KEY], soft[:, ::-1])
    sample = PackReferSegInputs()(r)['data_samples']
    data = sample.get(SOFT_MASK_KEY).data
    assert data.dtype == torch.float32 and data.shape == (1, 16, 24)
    np.testing.assert_array_equal(data[0].numpy(), soft[:, ::-1])
    assert sample.gt_sem_seg.data.dtype == torch.int64  # still binary


def test_detris_config_pipeline_gives_soft_targets(refer_root):
    """The DETRIS recipe's training pipeline on a real refer-format set:
    soft targets in training, binary masks at the original size in
    testing."""
    init_default_scope('mmseg')
    cfg = Config.fromfile(DETRIS_REFCOCO)
    steps = cfg.train_dataloader.dataset.pipeline
    resize, = [t for t in steps if t['type'] == 'ReferResizePad']
    assert resize['mask_interp'] == 'bilinear'
    for split in ('val', 'test'):
        test_steps = cfg[f'{split}_dataloader'].dataset.pipeline
        assert all(t.get('mask_interp', 'nearest') == 'nearest'
                   for t in test_steps)
    train = DATASETS.build(dict(
        type='RefCocoDataset', data_root=refer_root['root'],
        dataset='refcoco', split_by='unc', split='train', pipeline=steps))
    sample = train[0]['data_samples']
    soft = sample.get(SOFT_MASK_KEY).data
    assert soft.shape == sample.gt_sem_seg.data.shape == (1, 448, 448)
    assert ((soft > 0) & (soft < 1)).any()
    assert soft.min() >= 0 and soft.max() <= 1


# --------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------
def _samples(labels: torch.Tensor, soft=None) -> list:
    """labels: B x H x W (and soft: B x h x w) -> SegDataSamples."""
    out = []
    for i, lab in enumerate(labels):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        if soft is not None:
            s.set_field(PixelData(data=soft[i][None].float()),
                        SOFT_TARGET_KEY)
        out.append(s)
    return out


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(h=12, w=20, seed=0):
    """Labels with ignored rows and a soft map that agrees with them."""
    labels = torch.randint(0, 2, (2, h, w), generator=_gen(seed))
    labels[0, :3] = 255
    soft = torch.rand(2, h, w, generator=_gen(seed + 1))
    return labels, soft


def _cris(**kw):
    torch.manual_seed(0)
    cfg = dict(in_channels=16, channels=6, text_dims=12, pooled_dims=10,
               num_decoder_layers=1, decoder_heads=2,
               decoder_ffn_channels=16, up_channels=(12, 8))
    cfg.update(kw)
    return CRISHead(**cfg)


def test_soft_bce_on_the_logit_grid_equals_torch():
    """CRISHead (``loss_at='logits'``): the soft map is nearest-resized to
    the logits like the labels, the BCE takes it as the target and
    ignored pixels stay out of the mean."""
    head = _cris()
    logits = torch.randn(2, 1, 6, 10, generator=_gen(3))
    labels, soft = _case(12, 20)
    losses = head.loss_by_feat(logits, _samples(labels, soft))
    small_lab = F.interpolate(labels[:, None].float(), size=(6, 10),
                              mode='nearest')[:, 0]
    small_soft = F.interpolate(soft[:, None], size=(6, 10),
                               mode='nearest')[:, 0]
    valid = small_lab != 255
    ref = F.binary_cross_entropy_with_logits(logits[:, 0][valid],
                                             small_soft[valid])
    torch.testing.assert_close(losses['loss_mask'], ref)
    # acc_seg keeps the binary labels
    acc = ((logits[:, 0].sigmoid() > 0.35) == small_lab.bool())[valid]
    torch.testing.assert_close(losses['acc_seg'], acc.float().mean() * 100)


def test_soft_bce_at_the_gt_size_equals_torch():
    """``loss_at='gt'`` (ReferHead's default): logits bilinearly resized to
    the ground truth, the soft map used as it is."""
    head = ReferHead(
        in_channels=16, channels=8, text_dims=12, pooled_dims=10,
        decoder_heads=2,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True,
                         avg_non_ignore=True, loss_name='loss_mask'))
    logits = torch.randn(2, 1, 6, 10, generator=_gen(4))
    labels, soft = _case(12, 20, seed=5)
    loss = head.loss_by_feat(logits, _samples(labels, soft))['loss_mask']
    big = F.interpolate(logits, size=(12, 20), mode='bilinear',
                        align_corners=False)[:, 0]
    valid = labels != 255
    ref = F.binary_cross_entropy_with_logits(big[valid], soft[valid])
    torch.testing.assert_close(loss, ref)


def test_default_path_unchanged_and_hard_soft_target_agrees():
    """Without ``gt_soft_mask`` the loss is the binary BCE (by hand); a
    soft map equal to the binary mask gives the same BCE and Dice."""
    labels, _ = _case(12, 20, seed=7)
    logits = torch.randn(2, 1, 12, 20, generator=_gen(8))
    valid = labels != 255
    hard = _cris().loss_by_feat(logits, _samples(labels))
    ref = F.binary_cross_entropy_with_logits(
        logits[:, 0][valid], labels[valid].float())
    torch.testing.assert_close(hard['loss_mask'], ref)
    as_soft = (labels == 1).float()
    soft = _cris().loss_by_feat(logits, _samples(labels, as_soft))
    torch.testing.assert_close(soft['loss_mask'], hard['loss_mask'])
    # ReferHead's default BCE + Dice
    head = ReferHead(in_channels=16, channels=8, text_dims=12,
                     pooled_dims=10, decoder_heads=2)
    a = head.loss_by_feat(logits, _samples(labels))
    b = head.loss_by_feat(logits, _samples(labels, as_soft))
    assert set(a) == set(b) == {'loss_mask', 'loss_dice', 'acc_seg'}
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # and a truly soft target changes both terms
    c = head.loss_by_feat(logits, _samples(labels, as_soft * 0.8 + 0.1))
    assert not torch.allclose(c['loss_mask'], a['loss_mask'])
    assert not torch.allclose(c['loss_dice'], a['loss_dice'])


def test_soft_target_errors_and_batch_padding():
    head = _cris(loss_at='gt')
    labels, soft = _case(12, 20)
    logits = torch.randn(2, 1, 12, 20, generator=_gen(9))
    mixed = _samples(labels, soft)
    mixed[1] = _samples(labels[1:])[0]
    with pytest.raises(ValueError, match='all or none'):
        head.loss_by_feat(logits, mixed)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        head.loss_by_feat(logits, _samples(labels, soft * 2))
    with pytest.raises(ValueError, match='larger'):
        head.loss_by_feat(logits[..., :10], _samples(labels[..., :10],
                                                     soft))
    # the batch was padded (bottom / right, ignore label) after packing:
    # the smaller soft map is padded with 0 and the padding stays ignored
    padded = labels.clone()
    padded[:, :, 16:] = 255
    small = soft[:, :, :16]
    loss = head.loss_by_feat(logits, _samples(padded, small))['loss_mask']
    valid = padded != 255
    ref = F.binary_cross_entropy_with_logits(
        logits[:, 0][valid], F.pad(small, (0, 4))[valid])
    torch.testing.assert_close(loss, ref)


def test_tiny_detris_model_trains_on_soft_targets(refer_root):
    """Dataset -> PackReferSegInputs -> SegDataPreProcessor -> the tiny
    DETRIS model: the soft targets reach the loss and give gradients."""
    init_default_scope('mmseg')
    cfg = Config.fromfile(DETRIS_TINY)
    pipeline = [
        dict(type='LoadReferImageFromFile'),
        dict(type='LoadReferringMask'),
        dict(type='SelectSentence', mode='first'),
        dict(type='ReferResizePad', size=(112, 112), mask_interp='bilinear'),
        dict(type='PackReferSegInputs'),
    ]
    data = DATASETS.build(dict(
        type='RefCocoDataset', data_root=refer_root['root'],
        dataset='refcoco', split_by='unc', split='train', pipeline=pipeline))
    items = [data[i] for i in range(2)]
    batch = dict(inputs=[it['inputs'] for it in items],
                 data_samples=[it['data_samples'] for it in items])
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).train()
    packed = model.data_preprocessor(copy.deepcopy(batch), training=True)
    assert all(SOFT_TARGET_KEY in s for s in packed['data_samples'])
    soft_losses = model(**packed, mode='loss')
    assert torch.isfinite(soft_losses['loss_mask'])
    soft_losses['loss_mask'].backward()
    assert any(p.grad is not None
               for p in model.backbone.adapters.parameters())
    # without the soft maps the same batch gives the binary loss
    for s in packed['data_samples']:
        del s.gt_soft_mask
    model.eval()  # no dropout, so that only the target differs
    with torch.no_grad():
        hard = model(**packed, mode='loss')['loss_mask']
        for s, it in zip(packed['data_samples'], items):
            s.set_field(it['data_samples'].get(SOFT_TARGET_KEY),
                        SOFT_TARGET_KEY)
        soft = model(**packed, mode='loss')['loss_mask']
    assert torch.isfinite(hard) and not torch.allclose(hard, soft)
