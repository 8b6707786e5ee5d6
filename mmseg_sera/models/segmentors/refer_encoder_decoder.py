"""Segmentor for referring image segmentation: one image + one sentence ->
one binary mask."""
import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, OptConfigType, OptMultiConfig, SampleList
from torch import Tensor

from ..heads.no_target import NO_TARGET_SCORE_KEY, PRED_NO_TARGET_KEY
from ..structures import BackboneOutput, NeckOutput, TextFeatures, merge_losses


def _takes_text(module: nn.Module) -> bool:
    """Whether ``module.forward`` has a ``text`` parameter (our components do;
    stock mmseg necks and backbones do not)."""
    return 'text' in inspect.signature(module.forward).parameters


def _has_bridge(backbone: nn.Module) -> bool:
    """Whether the backbone has a ``bridge`` adapter (ETRIS), i.e. needs a
    lock-step text stream."""
    slots = getattr(backbone, 'adapters', None)
    return getattr(slots, 'bridge_adapter', None) is not None


@MODELS.register_module()
class ReferringEncoderDecoder(BaseSegmentor):
    """Text encoder + backbone (+ neck) + head, per-sample sentences.

    The sentence of each sample is read from ``data_sample.metainfo['text']``
    and travels through the model as an argument (:class:`TextFeatures`).
    Auxiliary losses (MoE regularisers) come back as values from the
    backbone's adapters and the neck and are added in :meth:`loss` only.

    Call graph::

        loss(inputs, data_samples)                  training
         ├─ extract_feat(inputs, texts)
         │   ├─ text_encoder(texts)          -> TextFeatures
         │   ├─ backbone.forward_features()  -> BackboneOutput (maps, routing,
         │   │                                  aux losses)
         │   │  (bridge mode: text_encoder.begin(texts) -> stream;
         │   │   backbone.forward_features(x, text_stream=stream) runs the
         │   │   text blocks beside its own; TextFeatures = its .text)
         │   └─ neck(feats, text)            -> NeckOutput (maps, aux losses,
         │                                      routing)
         └─ decode_head.loss(feats, text, data_samples)  loss_mask, loss_dice
            │                               (+ loss_no_target with the
            │                                head's no-target scorer)
            + backbone/neck aux losses                    loss_moe_*

        predict(inputs, data_samples)               validation / test
         ├─ encode_decode(inputs, metas)  -> B x 1 x H x W logits at the
         │                                   (padded) input size
         │  (a head with a no-target scorer:
         │   decode_head.predict_with_no_target() -> the same logits and
         │   B no-target logits)
         ├─ postprocess_result()          -> seg_logits (sigmoid) and
         │                                   pred_sem_seg (> threshold) at
         │                                   ori_shape, padding removed
         └─ mark_no_target()              -> metainfo pred_no_target,
                                             no_target_score; pred_sem_seg
                                             all 0 where pred_no_target

        _forward(inputs, data_samples)              tensor mode
         └─ extract_feat() -> decode_head.forward()  raw B x 1 x h' x w'
                                                      logits (stride 4)

    ``predict`` and ``_forward`` run the same network; ``predict`` only adds
    resizing and thresholding (``decode_head.threshold``) and, with a
    no-target scorer in the head (``no_target_cfg``), the no-target
    decision (:meth:`mark_no_target`).

    Bridge mode (a backbone with a ``bridge`` adapter, e.g.
    ``ETRISBridger``): the text tower runs inside the backbone's block loop,
    so the text encoder must offer the stream API (``begin`` / ``step`` /
    ``end``), and the neck and head get the text features of the
    bridge-modified stream (``BackboneOutput.text``). Otherwise the text
    encoder runs first, as above.

    Args:
        backbone: image encoder config; ``forward_features(x, text)`` is
            used when present (our ``DINOv2``), else ``forward(x)``.
        text_encoder: sentence encoder config (``OpenCLIPTextEncoder``).
        decode_head: head config with ``forward(feats, text)``,
            ``loss(...)`` and ``predict(...)`` (``ReferHead``).
        neck: optional neck; text-aware necks return :class:`NeckOutput`,
            stock mmseg necks a tuple of maps.
        train_cfg, test_cfg: passed to the head.
        data_preprocessor: usually ``SegDataPreProcessor`` with CLIP
            mean/std and ``size_divisor=14``.
    """

    def __init__(self,
                 backbone: ConfigType,
                 text_encoder: ConfigType,
                 decode_head: ConfigType,
                 neck: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 data_preprocessor: OptConfigType = None,
                 pretrained: Optional[str] = None,
                 init_cfg: OptMultiConfig = None):
        super().__init__(
            data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if pretrained is not None:
            backbone = dict(backbone)
            backbone['init_cfg'] = dict(
                type='Pretrained', checkpoint=pretrained)
        self.text_encoder = MODELS.build(text_encoder)
        self.backbone = MODELS.build(backbone)
        self.neck = MODELS.build(neck) if neck is not None else None
        self.decode_head = MODELS.build(decode_head)
        self.align_corners = getattr(self.decode_head, 'align_corners', False)
        self.num_classes = getattr(self.decode_head, 'num_classes', 2)
        self.out_channels = getattr(self.decode_head, 'out_channels', 1)
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg
        self._backbone_takes_text = _takes_text(self.backbone)
        self._neck_takes_text = self.neck is not None and _takes_text(
            self.neck)
        self.bridge_mode = _has_bridge(self.backbone)
        if self.bridge_mode:
            lacks = [
                name for name in ('begin', 'step', 'end')
                if not callable(getattr(self.text_encoder, name, None))
            ]
            if lacks:
                raise ValueError(
                    f'the backbone ({type(self.backbone).__name__}) has a '
                    "'bridge' adapter, which runs the text tower in "
                    'lock-step, but the text encoder '
                    f'({type(self.text_encoder).__name__}) has no stream API '
                    f'({", ".join(lacks)} missing); use OpenCLIPTextEncoder')
            if 'text_stream' not in inspect.signature(
                    self.backbone.forward_features).parameters:
                raise ValueError(
                    f'{type(self.backbone).__name__}.forward_features takes '
                    "no text_stream, so its 'bridge' adapter cannot run")

    # ------------------------------------------------------------------
    @staticmethod
    def texts_of(metas: Sequence) -> List[str]:
        """Sentences of a batch, from data samples or metainfo dicts."""
        texts = []
        for i, meta in enumerate(metas):
            meta = meta.metainfo if hasattr(meta, 'metainfo') else meta
            if 'text' not in meta:
                raise KeyError(
                    f'sample {i} has no "text" in its metainfo: a referring '
                    'segmentor needs the sentence (PackReferSegInputs puts it '
                    'there)')
            texts.append(meta['text'])
        return texts

    def extract_feat(self, inputs: Tensor, texts: Sequence[str]
                     ) -> Tuple[TextFeatures, BackboneOutput, NeckOutput]:
        """Encode the sentences and the images and fuse them.

        Args:
            inputs: B x 3 x H x W normalised images.
            texts: B sentences.
        """
        if self.bridge_mode:
            stream = self.text_encoder.begin(list(texts))
            bb = self.backbone.forward_features(inputs, text_stream=stream)
            text = bb.text
            if text is None:
                raise RuntimeError(
                    f'{type(self.backbone).__name__}.forward_features '
                    'returned no text features in bridge mode')
            return text, bb, self._neck(bb, text)
        text = self.text_encoder(list(texts))
        if hasattr(self.backbone, 'forward_features'):
            bb = self.backbone.forward_features(inputs, text=text)
        else:
            feats = (self.backbone(inputs, text=text)
                     if self._backbone_takes_text else self.backbone(inputs))
            bb = BackboneOutput(feats=tuple(feats))
        return text, bb, self._neck(bb, text)

    def _neck(self, bb: BackboneOutput, text: TextFeatures) -> NeckOutput:
        """The neck on the backbone's maps (identity without a neck)."""
        if self.neck is None:
            return NeckOutput(feats=bb.feats)
        out = (self.neck(bb.feats, text=text)
               if self._neck_takes_text else self.neck(bb.feats))
        return out if isinstance(out, NeckOutput) else NeckOutput(
            feats=tuple(out))

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]
                      ) -> Tensor:
        """B x 1 x H x W logits at the size of ``inputs``."""
        text, _, neck_out = self.extract_feat(inputs,
                                              self.texts_of(batch_img_metas))
        return self.decode_head.predict(neck_out.feats, text, batch_img_metas,
                                        self.test_cfg)

    def loss(self, inputs: Tensor, data_samples: SampleList) -> Dict[str,
                                                                     Tensor]:
        text, bb, neck_out = self.extract_feat(inputs,
                                               self.texts_of(data_samples))
        losses = self.decode_head.loss(neck_out.feats, text, data_samples,
                                       self.train_cfg)
        aux = merge_losses(bb.aux_losses, neck_out.aux_losses)
        clash = set(aux) & set(losses)
        if clash:
            raise KeyError(f'auxiliary losses clash with head losses: {clash}')
        losses.update(aux)
        return losses

    def predict(self, inputs: Tensor,
                data_samples: Optional[SampleList] = None) -> SampleList:
        if data_samples is None:
            raise ValueError('predict needs data samples carrying the '
                             'sentences (metainfo["text"])')
        metas = [ds.metainfo for ds in data_samples]
        if not getattr(self.decode_head, 'predicts_no_target', False):
            logits = self.encode_decode(inputs, metas)
            return self.postprocess_result(logits, data_samples)
        text, _, neck_out = self.extract_feat(inputs, self.texts_of(metas))
        logits, scores = self.decode_head.predict_with_no_target(
            neck_out.feats, text, metas, self.test_cfg)
        return self.mark_no_target(
            self.postprocess_result(logits, data_samples), scores)

    def mark_no_target(self, data_samples: SampleList,
                       scores: Tensor) -> SampleList:
        """The head's no-target decision on the predicted samples.

        With p_b = sigmoid(scores_b) (``scores``: B logits), every sample
        gets metainfo ``no_target_score`` = p_b (float) and
        ``pred_no_target`` = p_b > ``decode_head.no_target_threshold``
        (bool, what ``ReferSegMetric`` reads); where it is true,
        ``pred_sem_seg`` becomes all zeros ("no target" shows no mask;
        unless the head's ``no_target_cfg.zero_mask`` is False, as ReLA),
        while ``seg_logits`` keep the mask probabilities.
        """
        threshold = self.decode_head.no_target_threshold
        zero_mask = bool(self.decode_head.no_target_cfg['zero_mask'])
        probs = scores.detach().float().sigmoid()
        flags = probs > threshold
        # one host read for the whole batch
        values = torch.stack([probs, flags.float()], dim=1).cpu().tolist()
        for sample, (p, flag) in zip(data_samples, values):
            flag = bool(flag)
            sample.set_metainfo({NO_TARGET_SCORE_KEY: float(p),
                                 PRED_NO_TARGET_KEY: flag})
            if flag and zero_mask:
                pred = sample.pred_sem_seg.data
                sample.pred_sem_seg = PixelData(data=torch.zeros_like(pred))
        return data_samples

    def _forward(self, inputs: Tensor,
                 data_samples: Optional[SampleList] = None) -> Tensor:
        if data_samples is None:
            raise ValueError('tensor mode needs data samples carrying the '
                             'sentences (metainfo["text"])')
        text, _, neck_out = self.extract_feat(inputs,
                                              self.texts_of(data_samples))
        return self.decode_head.forward(neck_out.feats, text)

    def postprocess_result(self, seg_logits: Tensor,
                           data_samples: SampleList) -> SampleList:
        """Remove the padding, resize to ``ori_shape``, then ``seg_logits`` =
        sigmoid and ``pred_sem_seg`` = sigmoid > ``decode_head.threshold``.

        Two paddings may surround the image, both (left, right, top, bottom)
        in the metainfo: ``img_padding_size``, added around the batch by the
        data preprocessor in test mode, and ``padding_size``, the letterbox
        of the pipeline's ``ReferResizePad``.  The outer one is cut first.
        """
        threshold = self.decode_head.threshold
        for i, sample in enumerate(data_samples):
            meta = sample.metainfo
            logits = seg_logits[i:i + 1]
            for key in ('img_padding_size', 'padding_size'):
                if key in meta:
                    left, right, top, bottom = meta[key]
                    h, w = logits.shape[-2:]
                    logits = logits[..., top:h - bottom, left:w - right]
            if meta.get('flip', False):
                dims = (3, ) if meta.get('flip_direction',
                                         'horizontal') == 'horizontal' else (
                                             2, )
                logits = logits.flip(dims=dims)
            logits = resize(logits, size=meta['ori_shape'], mode='bilinear',
                            align_corners=self.align_corners,
                            warning=False).squeeze(0)
            probs = logits.sigmoid()
            sample.set_data({
                'seg_logits': PixelData(data=probs),
                'pred_sem_seg': PixelData(data=(probs > threshold).to(
                    probs.dtype)),
            })
        return data_samples
