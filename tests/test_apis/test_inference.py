"""init_model / inference_model / show_refer_result and demo/image_demo.py
on a tiny random-weight checkpoint written by the test."""
import copy
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from PIL import Image

from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg_sera.apis import (DEFAULT_DATASET_META, build_inference_pipeline,
                             inference_model, init_model, show_refer_result)
from mmseg_sera.datasets.synthetic import generate_refer_set
from mmseg_sera.engine import CheckpointError
from ..conftest import REPO, TINY_CONFIG

H, W = 90, 130  # not square: the letterbox pads 17 rows above and below
META = dict(classes=('background', 'referent'), palette=[[0, 0, 0],
                                                         [0, 255, 0]])
SENT_A = 'the red circle'
SENT_B = 'the big blue square on the left'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(config, checkpoint path, non-square image path, its RGB pixels)."""
    tmp = tmp_path_factory.mktemp('tiny_inference')
    root = str(tmp / 'synthetic')
    generate_refer_set(root, num_images=8, seed=0, progress=False)
    cfg = Config.fromfile(TINY_CONFIG)
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = root
    init_default_scope('mmseg')
    # a real synthetic picture, resized to a non-square size, saved
    # losslessly so that path and array inputs hold the same pixels
    img_dir = osp.join(root, 'images/mscoco/images/train2014')
    first = sorted(f for f in __import__('os').listdir(img_dir))[0]
    rgb = np.asarray(Image.open(osp.join(img_dir, first)).convert('RGB')
                     .resize((W, H), Image.BILINEAR))
    img_path = str(tmp / 'shapes_90x130.png')
    Image.fromarray(rgb).save(img_path)
    # random weights whose masks for both sentences hold foreground and
    # background pixels, so that the picture tests compare both
    ckpt = str(tmp / 'tiny.pth')
    for seed in range(20):
        torch.manual_seed(seed)
        model = MODELS.build(cfg.model)
        torch.save({'state_dict': model.state_dict(),
                    'meta': {'dataset_meta': META}}, ckpt)
        masks = [s.pred_sem_seg.data for s in inference_model(
            init_model(cfg, ckpt, device='cpu'), img_path, [SENT_A, SENT_B])]
        if all(0 < m.float().mean() < 1 for m in masks):
            break
    else:
        raise AssertionError('no seed < 20 gives mixed masks')
    return dict(cfg=cfg, ckpt=ckpt, img=img_path, rgb=rgb,
                state_dict=model.state_dict())


@pytest.fixture(scope='module')
def model(tiny):
    return init_model(tiny['cfg'], tiny['ckpt'], device='cpu')


def test_init_model_loads_checkpoint_and_meta(tiny, model):
    assert not model.training
    assert model.dataset_meta['classes'] == META['classes']
    assert isinstance(model.cfg, Config)
    state = model.state_dict()
    assert state.keys() == tiny['state_dict'].keys()
    for key, value in tiny['state_dict'].items():
        assert torch.equal(state[key], value), key
    # the caller's config is not modified
    assert tiny['cfg'].model.text_encoder.get('pretrained') is None


def test_init_model_without_meta_and_with_missing_pretrained(tiny, tmp_path):
    ckpt = str(tmp_path / 'bare.pth')
    torch.save({'state_dict': tiny['state_dict']}, ckpt)
    cfg = copy.deepcopy(tiny['cfg'])
    # pretrained files named in the config need not exist with a checkpoint
    cfg.model.text_encoder.pretrained = str(tmp_path / 'no_clip.bin')
    cfg.model.backbone.init_cfg = dict(
        type='Pretrained', checkpoint=str(tmp_path / 'no_dinov2.pth'))
    model = init_model(cfg, ckpt)
    assert model.dataset_meta == DEFAULT_DATASET_META
    name, param = next(iter(model.state_dict().items()))
    assert torch.equal(param, tiny['state_dict'][name])


def test_init_model_random_weights_warns(tiny):
    torch.manual_seed(1000)  # not one of the fixture's seeds (< 20)
    with pytest.warns(UserWarning, match='random'):
        model = init_model(tiny['cfg'], None)
    differs = [not torch.equal(v, tiny['state_dict'][k])
               for k, v in model.state_dict().items()
               if v.is_floating_point() and v.numel() > 1]
    assert any(differs)


def test_missing_checkpoint_is_named(tiny, tmp_path):
    path = str(tmp_path / 'nowhere' / 'missing.pth')
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        init_model(tiny['cfg'], path)


def test_damaged_checkpoint_is_named_in_one_line(tiny, tmp_path):
    path = tmp_path / 'cut.pth'
    with open(tiny['ckpt'], 'rb') as f:
        path.write_bytes(f.read()[:2000])  # a write that stopped early
    with pytest.raises(CheckpointError) as info:
        init_model(tiny['cfg'], str(path))
    assert str(info.value).startswith(f'cannot read checkpoint {path}: ')
    assert '\n' not in str(info.value)


def test_pipeline_drops_mask_loader_and_reads_arrays(model):
    names = [type(t).__name__ for t in
             build_inference_pipeline(model.cfg, from_array=True).transforms]
    assert names == ['LoadImageFromNDArray', 'ReferResizePad',
                     'SelectSentence', 'PackReferSegInputs']
    names = [type(t).__name__ for t in
             build_inference_pipeline(model.cfg).transforms]
    assert names[0] == 'LoadReferImageFromFile'
    assert 'LoadReferringMask' not in names


def test_mask_at_original_size_letterbox_undone(tiny, model):
    sample = inference_model(model, tiny['img'], '  The  RED\tcircle ')
    assert isinstance(sample, SegDataSample)
    assert sample.metainfo['text'] == SENT_A  # cleaned like the dataset
    assert sample.metainfo['padding_size'] == [0, 0, 17, 17]
    pred = sample.pred_sem_seg.data
    probs = sample.seg_logits.data
    assert pred.shape == (1, H, W) and probs.shape == (1, H, W)
    assert set(pred.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    assert torch.equal(pred, (probs > model.decode_head.threshold).float())
    # reference: the network on the 112 x 112 letterbox built by hand (BGR
    # bicubic resize to 78 x 112, 17 black rows above and below), the
    # padding rows cut from its logits, resized back to 90 x 130
    small = cv2.resize(tiny['rgb'][..., ::-1], (112, 78),
                       interpolation=cv2.INTER_CUBIC)
    boxed = np.zeros((112, 112, 3), np.uint8)
    boxed[17:95] = small
    meta = dict(text=SENT_A, img_shape=(112, 112))
    data = model.data_preprocessor(
        dict(inputs=[torch.from_numpy(boxed.transpose(2, 0, 1).copy())],
             data_samples=[SegDataSample(metainfo=meta)]), False)
    inputs = data['inputs']
    with torch.no_grad():
        logits = model.encode_decode(inputs, [meta])
    ref = F.interpolate(logits[..., 17:95, :], size=(H, W), mode='bilinear',
                        align_corners=False).sigmoid()[0]
    assert torch.allclose(probs, ref, atol=1e-4)


def test_two_sentences_one_batch(tiny, model):
    both = inference_model(model, tiny['img'], [SENT_A, SENT_B])
    assert isinstance(both, list) and len(both) == 2
    assert [s.metainfo['sent_id'] for s in both] == [0, 1]
    assert [s.metainfo['text'] for s in both] == [SENT_A, SENT_B]
    for sample, sent in zip(both, (SENT_A, SENT_B)):
        alone = inference_model(model, tiny['img'], sent)
        assert torch.allclose(sample.seg_logits.data, alone.seg_logits.data,
                              atol=1e-5)
        assert torch.equal(sample.pred_sem_seg.data, alone.pred_sem_seg.data)
    # the sentence changes the prediction for the same image
    diff = (both[0].seg_logits.data - both[1].seg_logits.data).abs().max()
    assert diff > 1e-2
    # a one-element list still gives a list
    assert isinstance(inference_model(model, tiny['img'], [SENT_A]), list)


def test_different_sentences_give_different_masks(tiny, model, monkeypatch):
    """Random weights may leave both masks empty at the config threshold:
    put the threshold at the median probability of sentence A, so that A's
    mask covers about half the image, and check B's mask is not the same."""
    probs_a = inference_model(model, tiny['img'], SENT_A).seg_logits.data
    monkeypatch.setattr(model.decode_head, 'threshold',
                        float(probs_a.median()))
    mask_a, mask_b = (s.pred_sem_seg.data for s in inference_model(
        model, tiny['img'], [SENT_A, SENT_B]))
    assert 0.3 < mask_a.mean() < 0.7
    assert (mask_a != mask_b).float().mean() > 0.01


def test_array_input_equals_path_input(tiny, model):
    from_path = inference_model(model, tiny['img'], SENT_B)
    bgr = cv2.imread(tiny['img'])
    from_array = inference_model(model, bgr, SENT_B)
    assert from_array.metainfo['img_path'] is None
    assert from_path.metainfo['img_path'] == tiny['img']
    assert torch.equal(from_array.seg_logits.data, from_path.seg_logits.data)


@pytest.mark.parametrize('sentences', ['', '   \t', [SENT_A, ' '], []])
def test_empty_sentence_is_rejected(tiny, model, sentences):
    with pytest.raises(ValueError, match='empty'):
        inference_model(model, tiny['img'], sentences)


def test_bad_images_are_named(tiny, model, tmp_path):
    with pytest.raises(FileNotFoundError, match='no_such.jpg'):
        inference_model(model, str(tmp_path / 'no_such.jpg'), SENT_A)
    with pytest.raises(ValueError, match='H x W x 3'):
        inference_model(model, np.zeros((H, W), np.uint8), SENT_A)


def test_show_refer_result_panels(tiny, model, tmp_path):
    samples = inference_model(model, tiny['img'], [SENT_A, SENT_B])
    out = str(tmp_path / 'sub' / 'result.png')
    drawn = show_refer_result(tiny['img'], samples, out_file=out)
    saved = np.asarray(Image.open(out).convert('RGB'))
    assert np.array_equal(saved, drawn)
    band = drawn.shape[0] - H
    assert drawn.shape == (band + H, 2 * W, 3) and band > 0
    for k, sample in enumerate(samples):
        panel = drawn[band:, k * W:(k + 1) * W]
        outside = sample.pred_sem_seg.data[0].numpy() == 0
        assert np.array_equal(panel[outside], tiny['rgb'][outside])


def test_demo_script_writes_picture(tiny, model, tmp_path):
    out = str(tmp_path / 'demo.png')
    # The masks are compared with this process's below: the same number of
    # threads in both, so that rounding (and a pixel at the threshold)
    # cannot differ between them.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, 'demo/image_demo.py', tiny['img'], SENT_A,
         TINY_CONFIG, tiny['ckpt'], '--out', out, '--sentence', SENT_B,
         '--opacity', '0.6'],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'saved {out}' in proc.stdout
    picture = np.asarray(Image.open(out).convert('RGB'))
    band = picture.shape[0] - H
    assert picture.shape == (band + H, 2 * W, 3) and band > 0
    # same model, same masks: outside them the panels show the image as is
    samples = inference_model(model, tiny['img'], [SENT_A, SENT_B])
    for k, sample in enumerate(samples):
        panel = picture[band:, k * W:(k + 1) * W]
        outside = sample.pred_sem_seg.data[0].numpy() == 0
        assert outside.any()
        assert np.array_equal(panel[outside], tiny['rgb'][outside])
