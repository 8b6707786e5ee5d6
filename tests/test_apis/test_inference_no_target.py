"""What a user sees when a model says that a sentence names nothing:
inference_model's flag and empty mask, "no target" in the picture of
show_refer_result and of ReferSegVisualizer, and in demo/image_demo.py's
output (a tiny model with a no-target scorer, its score forced)."""
import importlib.util
import os.path as osp

import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData

from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg_sera.apis import inference_model, init_model, show_refer_result
from mmseg_sera.visualization import (ReferSegVisualizer, draw_refer_panels,
                                      no_target_caption, text_band)
from mmseg_sera.visualization.refer_visualizer import _font
from ..conftest import REPO, TINY_CONFIG

SENTS = ['the purple star', 'all red shapes']


def _checkpoint(tmp_path, bias: float) -> tuple:
    """A config inheriting the tiny one with a no-target scorer, and a
    checkpoint whose scorer answers sigmoid(bias) for every input."""
    cfg_path = str(tmp_path / f'tiny_no_target_{bias:+g}.py')
    with open(cfg_path, 'w') as f:
        f.write(f"_base_ = ['{TINY_CONFIG}']\n"
                'model = dict(decode_head=dict(no_target_cfg=dict('
                'hidden_channels=8)))\n')
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(cfg_path).model)
    with torch.no_grad():
        model.decode_head.no_target.mlp[-1].weight.zero_()
        model.decode_head.no_target.mlp[-1].bias.fill_(bias)
    ckpt = str(tmp_path / f'tiny_no_target_{bias:+g}.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    return cfg_path, ckpt


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('no_target_inference')
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    img = str(tmp / 'scene.png')
    mmcv.imwrite(bgr, img)
    return tmp, img, bgr


@pytest.mark.parametrize('bias', [6.0, -6.0])
def test_inference_reports_no_target(setup, bias, capsys):
    tmp, img, bgr = setup
    cfg_path, ckpt = _checkpoint(tmp, bias)
    model = init_model(cfg_path, ckpt)
    results = inference_model(model, img, SENTS)
    score = float(torch.sigmoid(torch.tensor(bias)))
    for r in results:
        assert r.pred_no_target is (bias > 0)
        assert r.no_target_score == pytest.approx(score, abs=1e-6)
        assert r.pred_sem_seg.data.shape == (1, 90, 130)
        if bias > 0:
            assert not r.pred_sem_seg.data.any()
    captions = [no_target_caption(r.metainfo) for r in results]
    assert captions == ([f'no target (score {score:.2f})'] * 2 if bias > 0
                        else [None, None])

    # the picture: the sentence, then "no target (score p)" in the band
    drawn = show_refer_result(img, results, out_file=str(tmp / 'out.png'))
    rgb = mmcv.bgr2rgb(bgr)
    masks = [r.pred_sem_seg.data[0].numpy() > 0 for r in results]
    texts = [[r.text, c] if c else r.text
             for r, c in zip(results, captions)]
    np.testing.assert_array_equal(drawn, draw_refer_panels(rgb, masks,
                                                           texts))
    plain = draw_refer_panels(rgb, masks, [r.text for r in results])
    assert (drawn.shape[0] > plain.shape[0]) == (bias > 0)

    # the demo prints it
    spec = importlib.util.spec_from_file_location(
        'image_demo', osp.join(REPO, 'demo', 'image_demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.main([img, SENTS[0], cfg_path, ckpt, '--sentence', SENTS[1],
               '--out', str(tmp / 'demo.png')])
    out = capsys.readouterr().out
    for s in SENTS:
        line = f'"{s}": no target (score {score:.2f})'
        assert (line in out) == (bias > 0), out
        assert f'"{s}": ' in out


def test_visualizer_writes_no_target():
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3),
                                              dtype=np.uint8)
    sample = SegDataSample()
    sample.gt_sem_seg = PixelData(data=torch.zeros(1, 40, 50,
                                                   dtype=torch.long))
    sample.pred_sem_seg = PixelData(data=torch.zeros(1, 40, 50))
    sample.set_metainfo(dict(text='the purple star', no_target=True,
                             pred_no_target=True, no_target_score=0.875))
    vis = ReferSegVisualizer(name='no_target_vis')
    drawn = vis.draw_sample(image, sample)
    row = np.concatenate([image, image], axis=1)  # nothing to overlay
    band = text_band(100, [
        'the purple star', 'ground truth: no target',
        'prediction: no target (score 0.88)',
        'left: ground truth, right: prediction'
    ], font_scale=_font(50)[0])
    np.testing.assert_array_equal(drawn, np.concatenate([band, row]))
    # without the flags the band has two lines fewer
    sample.set_metainfo(dict(no_target=False, pred_no_target=False))
    assert vis.draw_sample(image, sample).shape[0] < drawn.shape[0]
