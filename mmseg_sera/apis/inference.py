"""High-level inference: build a referring segmentor from a config and a
checkpoint, segment what a sentence names in an image, draw the result.

Mirrors ``mmseg.apis`` (``init_model``, ``inference_model``,
``show_result_pyplot``), with a sentence next to the image::

    model = init_model(CONFIG, CHECKPOINT, device='cpu')
    sample = inference_model(model, 'street.jpg', 'the man on the left')
    mask = sample.pred_sem_seg.data[0]        # H x W, 1 = referred object
    probs = sample.seg_logits.data[0]         # H x W, sigmoid probabilities
    sample.metainfo.get('pred_no_target')     # True: names nothing here
    show_refer_result('street.jpg', sample, out_file='street_mask.png')

(``pred_no_target`` exists when the model's head has a no-target scorer,
``decode_head.no_target_cfg``; see docs/gres.md.)
"""
import copy
import os.path as osp
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import mmcv
import numpy as np
import torch
import torch.nn as nn
from mmcv.transforms import Compose
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from mmseg.registry import TRANSFORMS
from mmseg.structures import SegDataSample
from ..datasets.transforms.text_transforms import clean_sentence
from ..engine.checkpoint import read_checkpoint
from ..visualization.refer_visualizer import (draw_refer_panels,
                                              no_target_caption)
from .config import build_model, load_config

__all__ = [
    'init_model', 'inference_model', 'build_inference_pipeline',
    'show_refer_result', 'DEFAULT_DATASET_META'
]

ImageInput = Union[str, Path, np.ndarray]

#: Meta used when a checkpoint carries none (RefCocoDataset's METAINFO).
DEFAULT_DATASET_META = dict(
    classes=('background', 'object'), palette=[[0, 0, 0], [255, 255, 255]])

# Transforms that read the ground truth: an inference input has none.
_GT_LOADERS = ('LoadReferringMask', 'LoadAnnotations')
# Transforms that read the image from ``img_path``.
_FILE_LOADERS = ('LoadReferImageFromFile', 'LoadImageFromFile')


def _strip_pretrained(model_cfg) -> None:
    """Drop every pretrained-weight reference from a model config, so that
    building (or a later ``init_weights``) never looks for weight files that
    an inference user need not have; the checkpoint holds all weights."""
    model_cfg['pretrained'] = None
    for value in model_cfg.values():
        if isinstance(value, dict):
            if 'init_cfg' in value:
                value['init_cfg'] = None
            if 'pretrained' in value:
                value['pretrained'] = None


def _by_module(keys: Sequence[str]) -> str:
    """``'neck: 12, decode_head.decoder: 40'``: counts per module, named by
    the first two parts of the key (three under ``*.adapters``)."""
    counts: Dict[str, int] = {}
    for key in keys:
        parts = key.split('.')
        depth = 3 if len(parts) > 3 and parts[1] == 'adapters' else 2
        name = '.'.join(parts[:min(depth, len(parts) - 1)]) or key
        counts[name] = counts.get(name, 0) + 1
    return ', '.join(f'{k}: {v}' for k, v in counts.items())


def load_summary(model_state: Dict, ckpt_state: Dict) -> str:
    """What a (partial) load took: tensors loaded, the model's tensors the
    checkpoint lacks (they keep their initial values) and the checkpoint's
    tensors the model does not use, per module. Shapes that differ count as
    not loaded (MMEngine skips them)."""
    ckpt_state = {(k[len('module.'):] if k.startswith('module.') else k): v
                  for k, v in ckpt_state.items()}
    loaded = [k for k, v in model_state.items()
              if k in ckpt_state and getattr(ckpt_state[k], 'shape', None)
              == v.shape]
    kept = [k for k in model_state if k not in set(loaded)]
    unused = [k for k in ckpt_state if k not in model_state]
    text = f'loaded {len(loaded)} of the model\'s {len(model_state)} tensors'
    if kept:
        text += f'; not in the checkpoint, initial values kept: ' \
                f'{_by_module(kept)}'
    if unused:
        text += f'; in the checkpoint, not used: {_by_module(unused)}'
    return text


def init_model(config: Union[str, Path, Config],
               checkpoint: Optional[str] = None,
               device: str = 'cpu',
               cfg_options: Optional[dict] = None,
               strict: bool = False) -> nn.Module:
    """Build a referring segmentor from a config and load a checkpoint.

    ``init_weights`` is never called: with a checkpoint every weight comes
    from it (pretrained DINOv2/CLIP files named in the config need not
    exist); without one the weights are the random ones of the constructors
    (a warning says so), for smoke tests.

    Args:
        config: config file path or :class:`mmengine.Config`.
        checkpoint: checkpoint file (an MMEngine ``.pth`` with
            ``state_dict`` and ``meta``); None for random weights.
        device: device of the returned model, e.g. ``'cpu'``, ``'cuda:0'``.
        cfg_options: overrides merged into the config (``--cfg-options``).
        strict: fail on missing/unexpected keys (as MMEngine's
            ``load_checkpoint``; off by default, as in ``mmseg.apis``:
            mismatches are then logged).

    Returns:
        The segmentor in eval mode on ``device``, with ``model.cfg`` (the
        config) and ``model.dataset_meta`` (the checkpoint's
        ``meta['dataset_meta']``, else :data:`DEFAULT_DATASET_META`).

    Raises:
        FileNotFoundError: the config or the checkpoint file is missing.
        CheckpointError: the checkpoint file cannot be read (truncated,
            not a checkpoint); the one-line message names it.
    """
    if checkpoint is not None:
        checkpoint = osp.expanduser(str(checkpoint))
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint file not found: {checkpoint}')
    if isinstance(config, Config):  # leave the caller's config untouched
        config = copy.deepcopy(config)
    config = load_config(config, cfg_options)
    _strip_pretrained(config.model)
    model = build_model(config)
    dataset_meta: Dict = dict(DEFAULT_DATASET_META)
    if checkpoint is None:
        warnings.warn('init_model: no checkpoint given, the model keeps its '
                      'random initial weights (its predictions mean nothing)')
    else:
        ckpt = read_checkpoint(checkpoint)
        _load_checkpoint_to_model(model, ckpt, strict=strict)
        print_log(
            f'init_model: {checkpoint}: ' +
            load_summary(model.state_dict(), ckpt.get('state_dict', ckpt)),
            logger='current')
        meta = ckpt.get('meta')
        if isinstance(meta, dict) and meta.get('dataset_meta'):
            dataset_meta = dict(meta['dataset_meta'])
    model.dataset_meta = dataset_meta
    model.cfg = config
    model.to(device)
    model.eval()
    return model


def _type_name(transform_cfg) -> str:
    kind = transform_cfg.get('type', '')
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
    return name.split('.')[-1]  # 'mmseg.LoadImageFromFile' -> bare name


def build_inference_pipeline(cfg: Config, from_array: bool = False
                             ) -> Compose:
    """The test pipeline of ``cfg`` for images without annotations.

    Starts from ``cfg.test_dataloader.dataset.pipeline`` (or
    ``cfg.test_pipeline``), drops the ground-truth loaders
    (``LoadReferringMask``, ``LoadAnnotations``) and, when ``from_array``,
    replaces the file loader with mmseg's ``LoadImageFromNDArray`` (the
    image is then ``results['img']``, BGR H x W x 3).

    Raises:
        ValueError: the config has no test pipeline, or no image loader to
            replace.
    """
    test_dl = cfg.get('test_dataloader') or {}
    dataset = test_dl.get('dataset', {}) if isinstance(test_dl, dict) else {}
    pipeline = dataset.get('pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        raise ValueError('the config has no test pipeline '
                         '(test_dataloader.dataset.pipeline or test_pipeline)')
    steps: List[dict] = []
    replaced = False
    for t in pipeline:
        t = dict(t)
        name = _type_name(t)
        if name in _GT_LOADERS:
            continue
        if from_array and name in _FILE_LOADERS:
            to_float32 = t.get('to_float32', False)
            t = dict(type='LoadImageFromNDArray', to_float32=to_float32)
            replaced = True
        steps.append(t)
    if from_array and not replaced:
        raise ValueError(
            'cannot feed an array: the test pipeline has no image file '
            f'loader ({" or ".join(_FILE_LOADERS)}) to replace')
    return Compose([TRANSFORMS.build(t) for t in steps])


def _check_sentences(sentences: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(sentences, str):
        sentences = [sentences]
    elif not isinstance(sentences, (list, tuple)):
        raise TypeError('sentences must be a str or a list of str, got '
                        f'{type(sentences).__name__}')
    if len(sentences) == 0:
        raise ValueError('sentences is an empty list: give at least one '
                         'sentence')
    cleaned = []
    for i, sent in enumerate(sentences):
        if not isinstance(sent, str):
            raise TypeError(f'sentence {i} must be a str, got '
                            f'{type(sent).__name__}')
        text = clean_sentence(sent)
        if not text:
            raise ValueError(f'sentence {i} ({sent!r}) is empty: a referring '
                             'segmentor needs words naming the object')
        cleaned.append(text)
    return cleaned


def _check_image(img: ImageInput) -> Union[str, np.ndarray]:
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
            raise ValueError('img must be an H x W x 3 (BGR) array, got '
                             f'shape {img.shape}')
        if img.dtype != np.uint8:
            raise ValueError(f'img must be uint8, got {img.dtype}')
        return img
    if isinstance(img, (str, Path)):
        path = osp.expanduser(str(img))
        if not osp.isfile(path):
            raise FileNotFoundError(f'image file not found: {path}')
        return path
    raise TypeError('img must be a file path or an H x W x 3 BGR uint8 '
                    f'array, got {type(img).__name__}')


def inference_model(model: nn.Module, img: ImageInput,
                    sentences: Union[str, Sequence[str]]
                    ) -> Union[SegDataSample, List[SegDataSample]]:
    """Segment the object each sentence names in one image.

    The sentences are cleaned as the dataset cleans them
    (:func:`~mmseg_sera.datasets.transforms.clean_sentence`), each runs
    through the config's test pipeline with the image (letterbox resize +
    pad), and all go through the network in ONE batch of
    ``len(sentences)`` samples.

    Args:
        model: a segmentor from :func:`init_model` (needs ``model.cfg``).
        img: image file path, or an H x W x 3 uint8 array in BGR order
            (``mmcv.imread``'s default), as in ``mmseg.apis``.
        sentences: one sentence, or a list of sentences for this image.

    Returns:
        One :class:`SegDataSample` for a str, a list (one per sentence, in
        order) for a list.  Each holds, at the image's original size
        H x W (the letterbox padding removed):

        - ``pred_sem_seg.data``: 1 x H x W, 1.0 where
          ``sigmoid(logit) > model.decode_head.threshold``, else 0.0;
        - ``seg_logits.data``: 1 x H x W sigmoid probabilities in [0, 1];
        - metainfo ``text`` (the cleaned sentence), ``sent_id`` (its index
          in ``sentences``), ``img_path`` (None for an array),
          ``ori_shape``, ``padding_size``, ...
        - when the model's head has a no-target scorer
          (``decode_head.no_target_cfg``, generalized referring
          segmentation): metainfo ``pred_no_target`` (bool, "the sentence
          names nothing in this image"; then ``pred_sem_seg`` is all
          zeros) and ``no_target_score`` (its probability). A mask may
          cover several objects ("all red shapes").

    Raises:
        ValueError: an empty sentence (after cleaning), an empty list, or
            an array that is not H x W x 3 uint8.
        FileNotFoundError: ``img`` is a path that does not exist.
    """
    single = isinstance(sentences, str)
    texts = _check_sentences(sentences)
    img = _check_image(img)
    if getattr(model, 'cfg', None) is None:
        raise ValueError('model has no .cfg: build it with init_model() or '
                         'set model.cfg to its config')
    from_array = isinstance(img, np.ndarray)
    pipeline = build_inference_pipeline(model.cfg, from_array=from_array)
    inputs, samples = [], []
    for i, text in enumerate(texts):
        results = dict(text=text, sent_id=i)
        if from_array:
            results['img'] = img.copy()
        else:
            results['img_path'] = img
        packed = pipeline(results)
        inputs.append(packed['inputs'])
        samples.append(packed['data_samples'])
    with torch.no_grad():
        data = model.data_preprocessor(
            dict(inputs=inputs, data_samples=samples), False)
        outputs = model.predict(data['inputs'], data['data_samples'])
    return outputs[0] if single else list(outputs)


def show_refer_result(img: ImageInput,
                      result: Union[SegDataSample, Sequence[SegDataSample]],
                      opacity: float = 0.5,
                      color=(255, 64, 64),
                      out_file: Optional[str] = None,
                      show: bool = False,
                      wait_time: float = 0) -> np.ndarray:
    """Draw predictions of :func:`inference_model` on the image.

    One panel per sample, side by side: the image with the predicted mask
    as a translucent overlay (``opacity``) and its contour, under a white
    band with the sample's sentence, and ``no target (score p)`` on a
    second line where the model said the sentence names nothing
    (metainfo ``pred_no_target``).  See
    :func:`~mmseg_sera.visualization.draw_refer_panels`.

    Args:
        img: the image given to :func:`inference_model` (path or BGR array).
        result: one sample or a list of samples.
        opacity: weight of ``color`` inside the mask, in [0, 1].
        color: RGB overlay colour.
        out_file: write the picture there (PNG/JPEG by extension).
        show: open a window (needs a display).
        wait_time: seconds the window stays (0: until a key is pressed).

    Returns:
        The drawn RGB picture, (band + H) x (n * W) x 3 uint8.
    """
    img = _check_image(img)
    image = (mmcv.imread(img, channel_order='rgb') if isinstance(img, str)
             else mmcv.bgr2rgb(img))
    samples = [result] if isinstance(result, SegDataSample) else list(result)
    if not samples:
        raise ValueError('result is an empty list: nothing to draw')
    masks, texts = [], []
    for i, sample in enumerate(samples):
        if 'pred_sem_seg' not in sample:
            raise ValueError(f'sample {i} has no pred_sem_seg: pass the '
                             'output of inference_model')
        masks.append(sample.pred_sem_seg.data[0].cpu().numpy() > 0)
        caption = no_target_caption(sample.metainfo)
        text = sample.metainfo.get('text', '')
        texts.append(text if caption is None else [text, caption])
    drawn = draw_refer_panels(image, masks, texts, color=color,
                              alpha=opacity)
    if out_file is not None:  # mmcv creates the missing folders
        if not mmcv.imwrite(mmcv.rgb2bgr(drawn), out_file):
            raise ValueError(f'could not write {out_file} (unknown image '
                             'extension?)')
    if show:
        mmcv.imshow(mmcv.rgb2bgr(drawn), win_name='referring segmentation',
                    wait_time=int(wait_time * 1000))
    return drawn
