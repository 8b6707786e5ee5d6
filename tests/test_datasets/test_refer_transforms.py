import copy

import numpy as np
import pytest
import torch

from mmseg.registry import DATASETS
from mmseg.structures import SegDataSample
from mmseg_sera.datasets.transforms import (PackReferSegInputs,
                                            RandomReferFlip, ReferResizePad,
                                            SelectSentence, clean_sentence,
                                            decode_refer_mask,
                                            swap_left_right)


def _results(h=30, w=60):
    rng = np.random.default_rng(1)
    img = rng.integers(1, 255, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[5:20, 10:25] = 1
    return dict(img=img, img_shape=(h, w), ori_shape=(h, w), gt_seg_map=mask,
                seg_fields=['gt_seg_map'], text='the dog on the left',
                sentences=['the dog on the left', 'left dog'])


def test_clean_sentence_and_swap():
    assert clean_sentence('  The  LEFT\tman\n') == 'the left man'
    assert clean_sentence('\t \n') == ''
    assert swap_left_right('left dog right of the Left cat, leftover') == \
        'right dog left of the Right cat, leftover'
    assert swap_left_right('LEFTMOST guy, rightmost one') == \
        'RIGHTMOST guy, leftmost one'
    assert swap_left_right('bright lefty') == 'bright lefty'


def test_resize_pad_letterbox_geometry():
    t = ReferResizePad(size=32, pad_val=(7, 8, 9), seg_pad_val=255)
    r = t(_results(30, 60))
    # scale = min(32/30, 32/60) = 32/60 -> 16 x 32, padded 8 top / 8 bottom
    assert r['img'].shape == (32, 32, 3)
    assert r['resized_shape'] == (16, 32)
    assert r['padding_size'] == [0, 0, 8, 8]
    assert r['img_shape'] == r['pad_shape'] == (32, 32)
    assert r['scale_factor'] == pytest.approx((32 / 60, 16 / 30))
    assert (r['img'][:8] == np.array([7, 8, 9])).all()
    assert (r['img'][24:] == np.array([7, 8, 9])).all()
    assert (r['img'][8:24] != np.array([7, 8, 9])).any(axis=-1).mean() > 0.9
    seg = r['gt_seg_map']
    assert seg.shape == (32, 32)
    assert (seg[:8] == 255).all() and (seg[24:] == 255).all()
    assert set(np.unique(seg[8:24])) == {0, 1}
    ys, xs = np.nonzero(seg == 1)  # rows 5..19 * 16/30, cols 10..24 * 32/60
    assert ys.min() == 8 + 3 and ys.max() == 8 + 10
    assert xs.min() == 6 and xs.max() == 13  # floor(x * 60 / 32) in 10..24
    assert r['ori_shape'] == (30, 60)
    # top-left placement
    r2 = ReferResizePad(size=(32, 32), center=False)(_results(60, 30))
    assert r2['padding_size'] == [0, 16, 0, 0]
    assert (r2['img'][:, 16:] == 0).all()


def test_flip_swaps_words_and_pixels():
    base = _results()
    np.random.seed(0)
    off = RandomReferFlip()(copy.deepcopy(base))  # prob 0 by default
    assert off['flip'] is False and off['text'] == base['text']
    np.testing.assert_array_equal(off['img'], base['img'])
    r = RandomReferFlip(prob=1.0)(
        ReferResizePad(size=(30, 80), center=False)(copy.deepcopy(base)))
    assert r['flip'] is True and r['flip_direction'] == 'horizontal'
    assert r['text'] == 'the dog on the right'
    assert r['sentences'] == ['the dog on the right', 'right dog']
    assert r['padding_size'] == [20, 0, 0, 0]  # padding moved to the left
    np.testing.assert_array_equal(r['img'][:, 20:], base['img'][:, ::-1])
    np.testing.assert_array_equal(r['gt_seg_map'][:, 20:],
                                  base['gt_seg_map'][:, ::-1])
    with pytest.raises(ValueError):
        RandomReferFlip(prob=1.5)


def test_select_sentence_modes():
    r = dict(sentences=['a', 'b', 'c'], sent_ids=[4, 5, 6],
             sentence_kinds=['x', 'y', 'z'])
    first = SelectSentence(mode='first')(dict(r))
    assert (first['text'], first['sent_id'], first['kind']) == ('a', 4, 'x')
    np.random.seed(3)
    seen = {SelectSentence()(dict(r))['sent_id'] for _ in range(50)}
    assert seen == {4, 5, 6}
    picked = SelectSentence()(dict(r))
    assert r['sent_ids'][r['sentences'].index(picked['text'])] == \
        picked['sent_id']
    # inference: a user-given text passes through
    assert SelectSentence()(dict(text='hello'))['text'] == 'hello'
    with pytest.raises(KeyError, match='sentences'):
        SelectSentence()(dict(img=None))
    with pytest.raises(ValueError):
        SelectSentence(mode='last')
    # text-blind control: the text is fixed, id and kind are the drawn ones
    blind = SelectSentence(mode='first', fixed_text='the shape')(dict(r))
    assert (blind['text'], blind['sent_id'], blind['kind']) == (
        'the shape', 4, 'x')
    with pytest.raises(ValueError, match='fixed_text'):
        SelectSentence(fixed_text='  ')


def test_pack_refer_seg_inputs():
    r = ReferResizePad(size=32)(_results())
    r.update(ref_id=3, sent_id=9, ann_id=7, image_id=2, img_path='x.jpg',
             kind='relation')
    packed = PackReferSegInputs()(r)
    inputs, sample = packed['inputs'], packed['data_samples']
    assert inputs.dtype == torch.uint8 and inputs.shape == (3, 32, 32)
    assert torch.equal(inputs, torch.from_numpy(r['img']).permute(2, 0, 1))
    assert isinstance(sample, SegDataSample)
    gt = sample.gt_sem_seg.data
    assert gt.shape == (1, 32, 32) and gt.dtype == torch.int64
    assert torch.equal(gt[0], torch.from_numpy(r['gt_seg_map']).long())
    meta = sample.metainfo
    assert meta['text'] == 'the dog on the left'
    for key, value in dict(ref_id=3, sent_id=9, ann_id=7, image_id=2,
                           img_path='x.jpg', kind='relation',
                           ori_shape=(30, 60), img_shape=(32, 32),
                           padding_size=[0, 0, 8, 8]).items():
        assert meta[key] == value
    with pytest.raises(KeyError, match='SelectSentence'):
        PackReferSegInputs()(dict(img=r['img']))


def test_decode_refer_mask_errors():
    with pytest.raises(ValueError, match='RLE size'):
        decode_refer_mask(dict(size=[3, 3], counts=[9]), 4, 4)
    with pytest.raises(ValueError, match='polygons'):
        decode_refer_mask('nope', 4, 4)
    full = decode_refer_mask(dict(size=[2, 3], counts=[0, 6]), 2, 3)
    np.testing.assert_array_equal(full, np.ones((2, 3), np.uint8))


def _pipeline_cfg(crop):
    train = [
        dict(type='LoadReferImageFromFile'),
        dict(type='LoadReferringMask'),
        dict(type='SelectSentence'),
        dict(type='ReferResizePad', size=crop),
        dict(type='RandomReferFlip', prob=0.5),
        dict(type='PhotoMetricDistortion', hue_delta=0),
        dict(type='PackReferSegInputs'),
    ]
    test = [
        dict(type='LoadReferImageFromFile'),
        dict(type='ReferResizePad', size=crop),
        dict(type='LoadReferringMask'),
        dict(type='SelectSentence', mode='first'),
        dict(type='PackReferSegInputs'),
    ]
    return train, test


def test_pipeline_end_to_end_from_config(refer_root):
    train_pipe, test_pipe = _pipeline_cfg((28, 28))
    common = dict(type='RefCocoDataset', data_root=refer_root['root'],
                  dataset='refcoco', split_by='unc')
    train = DATASETS.build(dict(common, split='train', pipeline=train_pipe))
    np.random.seed(0)
    item = train[0]
    assert item['inputs'].shape == (3, 28, 28)
    assert item['inputs'].dtype == torch.uint8
    sample = item['data_samples']
    assert sample.gt_sem_seg.data.shape == (1, 28, 28)
    assert sample.text in ('the left triangle', 'triangle at top', 'big one',
                           'the right triangle')
    assert sample.ref_id == 0 and sample.ann_id == 101
    assert sample.image_id == 11 and sample.ori_shape == (40, 60)
    assert set(sample.gt_sem_seg.data.unique().tolist()) <= {0, 1}

    test = DATASETS.build(dict(common, split='val', test_mode=True,
                               pipeline=test_pipe))
    assert len(test) == 4
    item = test[3]
    sample = item['data_samples']
    assert item['inputs'].shape == (3, 28, 28)
    # ground truth kept at the original size for the metric
    assert sample.gt_sem_seg.data.shape == (1, 50, 50)
    assert (sample.text, sample.ref_id, sample.sent_id) == ('round thing', 4,
                                                            9)
    assert sample.padding_size == [0, 0, 0, 0]


class _Head:
    threshold = 0.5


def _postprocess():
    """mmseg's own BaseSegmentor.postprocess_result on a stub segmentor."""
    from mmseg.models.segmentors.base import BaseSegmentor

    class Stub(BaseSegmentor):
        align_corners = False
        decode_head = _Head()

        def extract_feat(self, inputs):
            pass

        def encode_decode(self, inputs, batch_data_samples):
            pass

        def loss(self, inputs, data_samples):
            pass

        def predict(self, inputs, data_samples=None):
            pass

        def _forward(self, inputs, data_samples=None):
            pass

        def aug_test(self, batch_inputs, batch_img_metas):
            pass

    return Stub().postprocess_result


def test_letterbox_metainfo_maps_predictions_back(refer_root):
    """Logits on the padded input, through mmseg's postprocess_result, land
    on the original-size ground truth."""
    _, test_pipe = _pipeline_cfg((64, 64))
    test = DATASETS.build(dict(
        type='RefCocoDataset', data_root=refer_root['root'], split='testA',
        test_mode=True, pipeline=test_pipe))
    item = test[0]  # 40 x 60 image -> 43 x 64 plus 21 rows of padding
    sample = item['data_samples']
    assert sample.padding_size == [0, 0, 10, 11]
    gt = sample.gt_sem_seg.data
    # a perfect prediction at input size: the letterboxed ground truth
    seg = ReferResizePad(size=64)(dict(
        img=np.zeros((40, 60, 3), np.uint8),
        gt_seg_map=gt[0].numpy().astype(np.uint8),
        seg_fields=['gt_seg_map']))['gt_seg_map']
    logits = torch.from_numpy(seg).float()[None, None] * 20 - 10

    def iou_after_postprocess(meta):
        s = SegDataSample(metainfo=meta)
        pred = _postprocess()(logits.clone(), [s])[0].pred_sem_seg.data
        assert pred.shape == (1, 40, 60) == gt.shape
        return float((pred.bool() & gt.bool()).sum() /
                     (pred.bool() | gt.bool()).sum())

    good = iou_after_postprocess(sample.metainfo)
    assert good > 0.9
    # control: without the padding information the mask lands elsewhere
    wrong = dict(sample.metainfo, padding_size=[0, 0, 0, 0])
    assert iou_after_postprocess(wrong) < good - 0.2
