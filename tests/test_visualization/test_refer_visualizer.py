"""Overlay drawing, text band and ReferSegVisualizer (also through mmseg's
SegVisualizationHook)."""
import os
import os.path as osp
import uuid
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.structures import PixelData
from PIL import Image

from mmseg.engine.hooks import SegVisualizationHook
from mmseg.registry import VISUALIZERS
from mmseg.structures import SegDataSample
from mmseg_sera.visualization import (ReferSegVisualizer, draw_mask_overlay,
                                      draw_refer_overlay, draw_refer_panels,
                                      text_band, wrap_text)
from ..conftest import TINY_CONFIG

H, W = 40, 60
LONG = ('the small red circle just left of the big blue square that sits at '
        'the very bottom of the picture')


def gradient_image() -> np.ndarray:
    """H x W x 3 uint8 whose brightness grows along x (and differs per
    channel), so distinct pixels have distinct values."""
    x = np.linspace(20, 230, W)[None, :, None]
    y = np.linspace(0, 20, H)[:, None, None]
    img = x + y + np.array([0, 10, -10])[None, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def box_mask() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[10:30, 10:50] = True
    return mask


def make_sample(pred=None, gt=None, **meta) -> SegDataSample:
    sample = SegDataSample(metainfo=dict(text='the red circle', **meta))
    if pred is not None:
        sample.pred_sem_seg = PixelData(
            data=torch.from_numpy(pred[None].astype(np.float32)))
    if gt is not None:
        sample.gt_sem_seg = PixelData(
            data=torch.from_numpy(gt[None].astype(np.int64)))
    return sample


def new_visualizer(save_dir=None, **kwargs) -> ReferSegVisualizer:
    return ReferSegVisualizer.get_instance(
        f'refer_vis_{uuid.uuid4().hex}', save_dir=save_dir,
        vis_backends=[dict(type='LocalVisBackend')] if save_dir else None,
        **kwargs)


def test_overlay_blending_formula_and_untouched_outside():
    img, mask = gradient_image(), box_mask()
    color, alpha = (200, 10, 50), 0.3
    out = draw_mask_overlay(img, mask, color=color, alpha=alpha)
    assert out.shape == img.shape and out.dtype == np.uint8
    y, x = 20, 25  # deep inside the box (not on the contour)
    expected = np.floor((1 - alpha) * img[y, x].astype(np.float64) +
                        alpha * np.array(color) + 0.5)
    assert np.array_equal(out[y, x], expected.astype(np.uint8))
    # the same formula over the whole interior (every rounding case)
    inner = (slice(12, 28), slice(12, 48))
    expected = np.floor((1 - alpha) * img[inner].astype(np.float64) +
                        alpha * np.array(color) + 0.5).astype(np.uint8)
    assert np.array_equal(out[inner], expected)
    assert np.array_equal(out[~mask], img[~mask])
    # contour: the mask's border pixels in the opaque colour
    assert np.array_equal(out[10, 25], np.array(color, np.uint8))
    assert np.array_equal(out[20, 49], np.array(color, np.uint8))
    # the image shows through: pixels of different brightness under the
    # mask stay different and keep their order
    dark, bright = out[20, 15].astype(int), out[20, 45].astype(int)
    assert img[20, 15].sum() < img[20, 45].sum()
    assert dark.sum() < bright.sum()
    assert not np.array_equal(out[20, 15], img[20, 15])


def test_refer_overlay_puts_text_in_a_band_above():
    img, mask = gradient_image(), box_mask()
    out = draw_refer_overlay(img, mask, 'the red one', alpha=0.5)
    band = out.shape[0] - H
    assert band > 0 and out.shape[1:] == (W, 3)
    assert np.array_equal(out[band:], draw_mask_overlay(img, mask))
    assert (out[:band] < 128).any() and (out[:band] == 255).any()
    # no text: no band
    assert np.array_equal(draw_refer_overlay(img, mask, None),
                          draw_mask_overlay(img, mask))


def test_wrap_text_fits_and_keeps_words():
    scale = 0.4
    lines = wrap_text(LONG, 112, scale)
    assert len(lines) > 2
    assert ' '.join(lines) == LONG
    for line in lines:
        assert cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale,
                               1)[0][0] <= 112
    cut = wrap_text('a' * 60, 50, scale)
    assert ''.join(cut) == 'a' * 60 and len(cut) > 1
    # more lines, taller band
    assert text_band(112, LONG).shape[0] > text_band(112, 'short').shape[0]


def test_panels_share_one_band_height():
    img, mask = gradient_image(), box_mask()
    out = draw_refer_panels(img, [mask, ~mask], ['short', LONG])
    band = out.shape[0] - H
    assert out.shape[1] == 2 * W
    assert band == text_band(W, LONG).shape[0]
    assert np.array_equal(out[band:, :W], draw_mask_overlay(img, mask))
    assert np.array_equal(out[band:, W:], draw_mask_overlay(img, ~mask))


def test_bad_inputs_are_reported():
    img = gradient_image()
    with pytest.raises(ValueError, match='does not match'):
        draw_mask_overlay(img, np.ones((H + 1, W), bool))
    with pytest.raises(ValueError, match='alpha'):
        draw_mask_overlay(img, box_mask(), alpha=1.5)
    with pytest.raises(ValueError, match='as many masks'):
        draw_refer_panels(img, [box_mask()], ['a', 'b'])


def test_add_datasample_writes_gt_and_prediction_panels(tmp_path):
    img, pred = gradient_image(), box_mask()
    gt = np.zeros((H, W), np.int64)
    gt[5:20, 5:30] = 1
    gt[0, :] = 255  # ignored pixels are not the object
    vis = new_visualizer(alpha=0.5)
    out_file = str(tmp_path / 'pair.png')
    vis.add_datasample('pair', img, make_sample(pred, gt), out_file=out_file)
    saved = np.asarray(Image.open(out_file).convert('RGB'))
    band = saved.shape[0] - H
    assert saved.shape == (band + H, 2 * W, 3) and band > 0
    assert np.array_equal(saved, vis.get_image())
    gt_panel, pred_panel = saved[band:, :W], saved[band:, W:]
    # left: ground truth (value 1 only) in the gt colour
    assert np.array_equal(gt_panel, draw_mask_overlay(
        img, gt == 1, color=vis.gt_color, alpha=0.5))
    # right: prediction, tinted inside, untouched outside
    assert np.array_equal(pred_panel[~pred], img[~pred])
    assert not np.array_equal(pred_panel[20, 25], img[20, 25])
    assert pred_panel[20, 15].sum() < pred_panel[20, 45].sum()
    # the text band holds writing (dark pixels) on white
    assert (saved[:band] < 128).any() and (saved[:band] == 255).mean() > 0.5


def test_add_datasample_prediction_only(tmp_path):
    img, pred = gradient_image(), box_mask()
    vis = new_visualizer()
    out_file = str(tmp_path / 'pred.png')
    vis.add_datasample('pred', img, make_sample(pred), out_file=out_file)
    saved = np.asarray(Image.open(out_file).convert('RGB'))
    band = saved.shape[0] - H
    assert saved.shape == (band + H, W, 3) and band > 0
    assert np.array_equal(saved[band:], draw_mask_overlay(
        img, pred, color=vis.pred_color, alpha=vis.alpha))
    with pytest.raises(ValueError, match='does not match'):
        vis.add_datasample('bad', img[:-1], make_sample(pred),
                           out_file=str(tmp_path / 'bad.png'))


def test_hook_saves_one_picture_per_sentence(tmp_path):
    """mmseg's SegVisualizationHook names pictures after the image file; two
    sentences of one image must still give two files."""
    img_path = str(tmp_path / 'img.png')
    Image.fromarray(gradient_image()).save(img_path)
    save_dir = str(tmp_path / 'show')
    new_visualizer(save_dir=save_dir)  # the hook takes the latest instance
    hook = SegVisualizationHook(draw=True, interval=1)
    outputs = [
        make_sample(box_mask(), img_path=img_path, ref_id=7, sent_id=s)
        for s in (11, 12)
    ]
    outputs[1].pred_sem_seg = PixelData(data=torch.zeros(1, H, W))
    hook.after_test_iter(SimpleNamespace(iter=3), 0, {}, outputs)
    vis_dir = osp.join(save_dir, 'vis_data', 'vis_image')
    assert sorted(os.listdir(vis_dir)) == [
        'test_img.png_ref7_sent11_3.png', 'test_img.png_ref7_sent12_3.png']
    a, b = (np.asarray(Image.open(osp.join(vis_dir, f)))
            for f in sorted(os.listdir(vis_dir)))
    assert not np.array_equal(a, b)


def test_default_runtime_uses_refer_visualizer(tmp_path):
    cfg = Config.fromfile(TINY_CONFIG)
    assert cfg.visualizer.type == 'ReferSegVisualizer'
    vis_cfg = dict(cfg.visualizer, name=f'runtime_{uuid.uuid4().hex}',
                   save_dir=str(tmp_path))
    vis = VISUALIZERS.build(vis_cfg)
    assert isinstance(vis, ReferSegVisualizer)
    assert vis.dataset_meta['classes'] == ['background', 'object']


def test_small_images_are_enlarged_to_min_size():
    img, pred = gradient_image(), box_mask()  # 40 x 60
    gt = np.zeros((H, W), np.int64)
    gt[5:20, 5:30] = 1
    plain = new_visualizer().draw_sample(img, make_sample(pred, gt))
    big = new_visualizer(min_size=100).draw_sample(img, make_sample(pred, gt))
    k = 3  # the smallest integer factor taking 40 px to >= 100
    band = big.shape[0] - k * H
    assert big.shape == (band + k * H, 2 * k * W, 3)
    # every pixel of the panels becomes a k x k block of the same colour
    small = plain[plain.shape[0] - H:]
    assert np.array_equal(big[band:], small.repeat(k, 0).repeat(k, 1))
    # the sentence band is written for the enlarged width, with the font
    # of an enlarged panel
    from mmseg_sera.visualization.refer_visualizer import _font
    texts = ['the red circle', 'left: ground truth, right: prediction']
    assert np.array_equal(big[:band], text_band(
        2 * k * W, texts, font_scale=_font(k * W)[0]))
    # already large enough: unchanged
    same = new_visualizer(min_size=40).draw_sample(img, make_sample(pred, gt))
    assert np.array_equal(same, plain)
    with pytest.raises(ValueError, match='min_size'):
        new_visualizer(min_size=-1)
