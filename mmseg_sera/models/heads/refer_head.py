"""Text-conditioned mask head for referring segmentation.

Pipeline (B batch, d input width, C ``channels``, h x w the stride-14 grid,
H' x W' the stride-4 grid, L words)::

    feats (tuple of B x d x h x w) --select/concat--> V: B x d x h x w
    V --[refine blocks, optional ('neck')]--> B x d x h x w
    --[VL decoder layers, optional]--> B x d x h x w
        (pixels attend to words; cheap at the low resolution h x w)
    --> 2x steps (bilinear + Conv3x3-BN-ReLU [+ refine blocks, 'up']),
        last step to H' x W'
    --> Conv1x1 -> X: B x C x H' x W'
    sentence s: B x Cp --Linear--> per-sample kernel K_b (C x k x k), bias b_b
    logits_b = conv2d(X_b, K_b, padding=k//2) + b_b        -> B x 1 x H' x W'

H' = floor(h * in_stride / out_stride + 0.5) (3.5 x for DINOv2's patch 14 and
stride-4 logits: 32 -> 112).
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch import Tensor

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.losses import CrossEntropyLoss, DiceLoss
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, SampleList
from ..necks.hierarchical_align import add_coord_channels, conv_norm_act
from ..position import sine_position_1d, sine_position_2d
from ..structures import TextFeatures
from .no_target import (NoTargetScorer, check_no_target_cfg, no_target_labels,
                        no_target_loss)


class VLDecoderLayer(nn.Module):
    """One vision-language decoder layer (pre-norm, CRIS lineage).

    With v: B x N x d pixels, w: B x L x Ct words, P_v / P_t sine codes::

        v = v + Drop(LN_sa(SelfAttn(q = k = LN1(v) + P_v, val = LN1(v))))
        v = v + Drop(LN_ca(CrossAttn(q = LN2(v) + P_v, k = w + P_t, val = w,
                                     key_padding_mask = pad)))
        v = v + Drop(Lin(LN(Drop(ReLU(Lin(LN3(v)))))))

    ``Drop`` has rate ``dropout``; both attentions also drop attention
    weights at rate ``attn_dropout``.
    """

    def __init__(self, *, dims: int, text_dims: int, num_heads: int,
                 ffn_dims: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.self_attn = nn.MultiheadAttention(
            dims, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm_sa = nn.LayerNorm(dims)
        self.norm2 = nn.LayerNorm(dims)
        self.cross_attn = nn.MultiheadAttention(
            dims, num_heads, dropout=attn_dropout, kdim=text_dims,
            vdim=text_dims, batch_first=True)
        self.norm_ca = nn.LayerNorm(dims)
        self.norm3 = nn.LayerNorm(dims)
        self.ffn = nn.Sequential(
            nn.Linear(dims, ffn_dims), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.LayerNorm(ffn_dims),
            nn.Linear(ffn_dims, dims))
        self.drop = nn.Dropout(dropout)

    def forward(self, v: Tensor, pos_v: Tensor, words: Tensor,
                pos_t: Tensor, pad_mask: Tensor) -> Tensor:
        """v: B x N x d, pos_v: N x d, words: B x L x Ct, pos_t: L x Ct,
        pad_mask: B x L (True = padding) -> B x N x d."""
        q = self.norm1(v)
        q_pos = q + pos_v
        v = v + self.drop(
            self.norm_sa(self.self_attn(q_pos, q_pos, q,
                                        need_weights=False)[0]))
        q = self.norm2(v) + pos_v
        v = v + self.drop(
            self.norm_ca(
                self.cross_attn(q, words + pos_t, words,
                                key_padding_mask=pad_mask,
                                need_weights=False)[0]))
        return v + self.drop(self.ffn(self.norm3(v)))


class VLDecoder(nn.Module):
    """A stack of :class:`VLDecoderLayer` on a B x d x h x w map, then a
    final LayerNorm; returns B x d x h x w."""

    def __init__(self, *, num_layers: int, dims: int, text_dims: int,
                 num_heads: int, ffn_dims: int, dropout: float,
                 attn_dropout: float, text_pos: bool = True) -> None:
        super().__init__()
        if dims % num_heads:
            raise ValueError(f'decoder width {dims} is not divisible by '
                             f'decoder_heads={num_heads}')
        self.layers = nn.ModuleList(
            VLDecoderLayer(
                dims=dims, text_dims=text_dims, num_heads=num_heads,
                ffn_dims=ffn_dims, dropout=dropout,
                attn_dropout=attn_dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dims)
        self.text_pos = text_pos

    def forward(self, x: Tensor, text: TextFeatures) -> Tensor:
        b, d, h, w = x.shape
        v = x.flatten(2).transpose(1, 2)  # B x hw x d
        pos_v = sine_position_2d(h, w, d, device=x.device, dtype=x.dtype)
        words = text.tokens.to(x.dtype)
        if self.text_pos:
            pos_t = sine_position_1d(
                words.shape[1], words.shape[2], device=x.device,
                dtype=x.dtype)
        else:
            pos_t = words.new_zeros(words.shape[1:])
        for layer in self.layers:
            v = layer(v, pos_v, words, pos_t, text.mask)
        return self.norm(v).transpose(1, 2).reshape(b, d, h, w)


class TextDynamicProjector(nn.Module):
    """Per-sample dynamic convolution from the sentence embedding.

    ``[vec(K_b), b_b] = Linear(s_b)`` with K_b: 1 x C x k x k; the B kernels
    run as one grouped convolution (groups = B) on X: B x C x H x W, which
    equals ``conv2d(X_b, K_b, padding=k//2) + b_b`` for every b.
    Output: B x 1 x H x W.
    """

    def __init__(self, *, channels: int, text_dims: int,
                 kernel_size: int = 1) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f'kernel_size must be a positive odd int, got {kernel_size}')
        self.channels = channels
        self.kernel_size = kernel_size
        self.fc = nn.Linear(text_dims, channels * kernel_size**2 + 1)

    def kernels(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        """B x Cp -> (weights B x C x k x k, biases B)."""
        params = self.fc(pooled)
        k = self.kernel_size
        weight = params[:, :-1].reshape(-1, self.channels, k, k)
        return weight, params[:, -1]

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        b, c, h, w = x.shape
        weight, bias = self.kernels(pooled.to(x.dtype))
        out = F.conv2d(
            x.reshape(1, b * c, h, w), weight, bias,
            padding=self.kernel_size // 2, groups=b)  # 1 x B x H x W
        return out.reshape(b, 1, h, w)


def upsample_steps(x: Tensor, convs: Sequence[nn.Module],
                   sizes: Sequence[Tuple[int, int]], *,
                   align_corners: bool,
                   refine: Optional[Sequence[nn.Module]] = None,
                   state: Optional[Tensor] = None) -> Tensor:
    """The 2x path of the mask heads: for each step i,
    ``x = conv_i(bilinear_resize(x, sizes[i]))``, then
    ``x = refine_i(x, state)`` when ``refine`` is given (one block per
    step; ``state`` the pooled sentence).

    x: B x C x h x w -> B x C' x sizes[-1] (``x`` itself with no steps).
    """
    for i, (conv, size) in enumerate(zip(convs, sizes)):
        x = conv(
            F.interpolate(
                x, size=tuple(size), mode='bilinear',
                align_corners=align_corners))
        if refine is not None:
            x = refine[i](x, state)
    return x


DEFAULT_LOSSES = (
    dict(type='CrossEntropyLoss', use_sigmoid=True, avg_non_ignore=True,
         loss_name='loss_mask', loss_weight=1.0),
    dict(type='DiceLoss', use_sigmoid=True, loss_name='loss_dice',
         loss_weight=1.0),
)

_LOSS_AT = ('gt', 'logits')
_REFINE_AT = ('neck', 'up')

#: data-sample field of the optional soft target (float 1 x H x W in [0, 1];
#: ``ReferResizePad(mask_interp='bilinear')`` writes it)
SOFT_TARGET_KEY = 'gt_soft_mask'


class BaseReferHead(BaseDecodeHead):
    """The contract every referring mask head of mmseg_sera keeps: maps +
    sentence -> B x 1 x h' x w' logits, trained as one binary mask.

    Subclasses (:class:`ReferHead`, ``CRISHead``) build their layers after
    ``super().__init__`` and implement ``forward(inputs, text)``. This class
    holds what they share:

    - mmseg's binary convention: ``num_classes=2, out_channels=1``,
      prediction ``sigmoid(logits) > threshold``; mmseg's static classifier
      ``conv_seg`` is removed (the heads end in a dynamic projector);
    - input selection (``in_index`` / ``input_transform``) and the checks of
      ``TextFeatures`` against ``text_dims`` / ``pooled_dims``;
    - ``loss`` / ``predict`` with ``text`` added to mmseg's signatures, and
      :meth:`loss_by_feat` (see :class:`ReferHead` for the loss details);
    - the optional no-target output of generalized referring segmentation
      (``no_target_cfg``, :mod:`.no_target`).

    A subclass implements two steps, which :meth:`forward` chains::

        vl_features(inputs, text) -> V: B x d x h x w   (text-conditioned,
                                                         input grid)
        mask_logits(V, text)      -> B x 1 x h' x w'

    and calls :meth:`_build_no_target` at the end of its ``__init__``
    (built last, the scorer leaves the initial weights of every other
    layer as they are without it, for a given seed).

    Args (beyond :class:`BaseDecodeHead`'s):
        text_dims: width Ct of ``text.tokens``.
        pooled_dims: width Cp of ``text.pooled``.
        loss_at: where the losses are computed. ``'gt'``: logits bilinearly
            resized to the ground truth. ``'logits'``: the ground truth
            nearest-resized to the logit grid (CRIS/ETRIS/DETRIS).
        no_target_cfg: None (default) for a head that always answers with
            a mask, exactly as before the option existed (same parameters,
            same outputs). A dict turns on the no-target scorer
            (:class:`~.no_target.NoTargetScorer` on V and the pooled
            sentence) and its loss ``loss_no_target``; keys (defaults):
            ``hidden_channels`` (256), ``loss_weight`` (1.0),
            ``threshold`` (0.5, on sigmoid(score)), ``zero_mask`` (True:
            a "no target" answer empties the predicted mask).
    """

    def __init__(self,
                 *,
                 in_channels: Union[int, Sequence[int]],
                 channels: int,
                 text_dims: int,
                 pooled_dims: int,
                 num_classes: int,
                 out_channels: int,
                 threshold: float,
                 dropout_ratio: float,
                 norm_cfg: Optional[ConfigType],
                 act_cfg: ConfigType,
                 in_index: Union[int, Sequence[int]],
                 input_transform: Optional[str],
                 loss_decode: Union[ConfigType, Sequence[ConfigType]],
                 ignore_index: int,
                 align_corners: bool,
                 loss_at: str = 'gt',
                 no_target_cfg: Optional[dict] = None,
                 init_cfg: Optional[ConfigType] = None) -> None:
        self._check_binary(num_classes, out_channels)
        no_target_cfg = check_no_target_cfg(no_target_cfg,
                                            type(self).__name__)
        if loss_at not in _LOSS_AT:
            raise ValueError(f'{type(self).__name__}: loss_at must be one of '
                             f'{_LOSS_AT}, got {loss_at!r}')
        if isinstance(loss_decode, tuple):
            loss_decode = list(loss_decode)
        super().__init__(
            in_channels,
            channels,
            num_classes=num_classes,
            out_channels=out_channels,
            threshold=threshold,
            dropout_ratio=dropout_ratio,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            in_index=in_index,
            input_transform=input_transform,
            loss_decode=loss_decode,
            ignore_index=ignore_index,
            align_corners=align_corners,
            init_cfg=init_cfg)
        # The dynamic projector replaces mmseg's static classifier.
        del self.conv_seg
        self._check_losses()
        self.text_dims = text_dims
        self.pooled_dims = pooled_dims
        self.loss_at = loss_at
        self.no_target_cfg = no_target_cfg
        self.no_target = None

    @classmethod
    def _check_binary(cls, num_classes: int, out_channels: int) -> None:
        if out_channels != 1 or num_classes != 2:
            raise ValueError(
                f'{cls.__name__} predicts one binary mask: num_classes=2 and '
                f'out_channels=1, got num_classes={num_classes}, '
                f'out_channels={out_channels}')

    def _check_losses(self) -> None:
        """Reject loss configs that cannot work on 1-channel logits."""
        name = type(self).__name__
        losses = self.loss_decode if isinstance(
            self.loss_decode, nn.ModuleList) else [self.loss_decode]
        for loss in losses:
            if isinstance(loss, CrossEntropyLoss) and not loss.use_sigmoid:
                raise ValueError(
                    f'{name}: CrossEntropyLoss needs use_sigmoid=True for '
                    '1-channel logits')
            if isinstance(loss, DiceLoss) and not (loss.use_sigmoid
                                                   and loss.activate):
                raise ValueError(
                    f'{name}: DiceLoss needs use_sigmoid=True and '
                    'activate=True (the head outputs raw logits)')
            if isinstance(loss, DiceLoss) and loss.ignore_index == 0:
                raise ValueError(
                    f'{name}: DiceLoss(ignore_index=0) would drop the only '
                    'channel; pixels are ignored via the head\'s '
                    'ignore_index')

    # ------------------------------------------------------------------
    def _select(self, inputs: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if isinstance(inputs, Tensor):
            inputs = (inputs, )
        return self._transform_inputs(list(inputs))

    def _check_text(self, x: Tensor, text: TextFeatures, *,
                    tokens: bool) -> None:
        """Batch sizes agree; ``text.pooled`` (and ``text.tokens`` when
        ``tokens``) have the configured widths."""
        name = type(self).__name__
        if x.shape[0] != text.pooled.shape[0]:
            raise ValueError(
                f'{name}: {x.shape[0]} images but {text.pooled.shape[0]} '
                'sentences')
        if text.pooled.shape[-1] != self.pooled_dims:
            raise ValueError(
                f'{name}: text.pooled has width {text.pooled.shape[-1]}, '
                f'pooled_dims={self.pooled_dims}')
        if tokens and text.tokens.shape[-1] != self.text_dims:
            raise ValueError(
                f'{name}: text.tokens has width '
                f'{text.tokens.shape[-1]}, text_dims={self.text_dims}')

    def _build_no_target(self, in_channels: int) -> None:
        """The no-target scorer on V (width ``in_channels``), when
        ``no_target_cfg`` asks for it; a subclass calls this last."""
        if self.no_target_cfg is not None:
            self.no_target = NoTargetScorer(
                in_channels=in_channels, text_dims=self.pooled_dims,
                hidden_channels=int(self.no_target_cfg['hidden_channels']))

    @property
    def predicts_no_target(self) -> bool:
        """Whether the head has the no-target scorer."""
        return self.no_target is not None

    @property
    def no_target_threshold(self) -> float:
        """The decision ``sigmoid(score) > threshold``."""
        if self.no_target_cfg is None:
            # not AttributeError: nn.Module.__getattr__ would hide it
            raise RuntimeError(f'{type(self).__name__} has no no-target '
                               'scorer (no_target_cfg is None)')
        return float(self.no_target_cfg['threshold'])

    def vl_features(self, inputs: Union[Tensor, Sequence[Tensor]],
                    text: TextFeatures) -> Tensor:
        """inputs, text -> V: B x d x h x w, the text-conditioned map."""
        raise NotImplementedError

    def mask_logits(self, x: Tensor, text: TextFeatures) -> Tensor:
        """V: B x d x h x w, text -> logits B x 1 x h' x w'."""
        raise NotImplementedError

    def forward(self, inputs: Union[Tensor, Sequence[Tensor]],
                text: TextFeatures) -> Tensor:
        """inputs, text -> mask logits B x 1 x h' x w' (tensor mode; the
        no-target score is not computed)."""
        return self.mask_logits(self.vl_features(inputs, text), text)

    def forward_with_no_target(
            self, inputs: Union[Tensor, Sequence[Tensor]],
            text: TextFeatures) -> Tuple[Tensor, Optional[Tensor]]:
        """(mask logits B x 1 x h' x w', no-target logits B or None
        without the scorer), from one pass through the head."""
        x = self.vl_features(inputs, text)
        logits = self.mask_logits(x, text)
        if self.no_target is None:
            return logits, None
        return logits, self.no_target(x, text.pooled)

    def loss(self, inputs: Union[Tensor, Sequence[Tensor]],
             text: TextFeatures, batch_data_samples: SampleList,
             train_cfg: ConfigType) -> dict:
        """forward -> loss_by_feat; returns ``loss_*`` and ``acc_seg``,
        with the scorer also ``loss_no_target`` and ``acc_no_target``
        (:meth:`loss_no_target_by_feat`)."""
        if self.no_target is None:  # the call path of a plain RES head
            return self.loss_by_feat(self.forward(inputs, text),
                                     batch_data_samples)
        logits, score = self.forward_with_no_target(inputs, text)
        losses = self.loss_by_feat(logits, batch_data_samples)
        losses.update(self.loss_no_target_by_feat(score, batch_data_samples))
        return losses

    def loss_no_target_by_feat(self, scores: Tensor,
                               batch_data_samples: SampleList) -> dict:
        """No-target logits B and data samples -> ``loss_no_target``
        (weighted BCE, :func:`~.no_target.no_target_loss`) and
        ``acc_no_target``; targets from metainfo ``no_target``, else from
        an empty ground truth (:func:`~.no_target.no_target_labels`)."""
        labels = no_target_labels(
            batch_data_samples, self._stack_batch_gt(batch_data_samples),
            self.ignore_index)
        return no_target_loss(
            scores, labels,
            loss_weight=float(self.no_target_cfg['loss_weight']))

    def predict(self, inputs: Union[Tensor, Sequence[Tensor]],
                text: TextFeatures, batch_img_metas: List[dict],
                test_cfg: ConfigType) -> Tensor:
        """forward -> logits B x 1 x H x W resized (bilinear) to the padded
        input size (mmseg's ``predict_by_feat``)."""
        return self.predict_by_feat(self.forward(inputs, text),
                                    batch_img_metas)

    def predict_with_no_target(
            self, inputs: Union[Tensor, Sequence[Tensor]],
            text: TextFeatures, batch_img_metas: List[dict],
            test_cfg: ConfigType) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`predict`'s logits and the no-target logits B (None
        without the scorer), from one pass through the head."""
        logits, score = self.forward_with_no_target(inputs, text)
        return self.predict_by_feat(logits, batch_img_metas), score

    def _stack_batch_soft(self, batch_data_samples: SampleList,
                          size: Tuple[int, int]) -> Optional[Tensor]:
        """The samples' ``gt_soft_mask`` maps as B x 1 x H x W float, or
        None when no sample has one.

        mmseg's ``stack_batch`` pads only ``gt_sem_seg`` (bottom / right,
        with the ignore label) when it pads the batch, so a smaller soft map
        is padded the same way, with 0; those pixels are ignored through
        ``gt_sem_seg`` anyway.

        Raises:
            ValueError: only some samples have a soft target, a soft map is
                larger than ``size`` or holds values outside [0, 1].
        """
        name = type(self).__name__
        has = [SOFT_TARGET_KEY in s for s in batch_data_samples]
        if not any(has):
            return None
        if not all(has):
            raise ValueError(
                f'{name}: {sum(has)} of {len(has)} samples have '
                f'{SOFT_TARGET_KEY}; soft targets need all or none')
        maps = []
        for sample in batch_data_samples:
            soft = sample.get(SOFT_TARGET_KEY).data.float()
            if soft.dim() == 2:
                soft = soft[None]
            dh, dw = size[0] - soft.shape[-2], size[1] - soft.shape[-1]
            if dh < 0 or dw < 0:
                raise ValueError(
                    f'{name}: {SOFT_TARGET_KEY} of size '
                    f'{tuple(soft.shape[-2:])} is larger than gt_sem_seg '
                    f'{tuple(size)}')
            if dh or dw:
                soft = F.pad(soft, (0, dw, 0, dh), value=0.)
            maps.append(soft)
        soft = torch.stack(maps)  # B x 1 x H x W
        if bool(((soft < 0) | (soft > 1)).any()):
            raise ValueError(
                f'{name}: {SOFT_TARGET_KEY} must lie in [0, 1], found '
                f'[{soft.min().item()}, {soft.max().item()}]')
        return soft

    def loss_by_feat(self, seg_logits: Tensor,
                     batch_data_samples: SampleList) -> dict:
        """Logits B x 1 x h x w and data samples with ``gt_sem_seg``
        (1 x H x W, {0, 1, ignore_index}) -> dict of losses + ``acc_seg``.

        With ``loss_at='gt'`` the logits are bilinearly resized to H x W;
        with ``'logits'`` the labels are nearest-resized to h x w.

        Soft targets: when the samples carry ``gt_soft_mask`` (float
        1 x H x W in [0, 1], ``ReferResizePad(mask_interp='bilinear')``),
        it is resized like the labels and becomes the target y of the
        ``CrossEntropyLoss`` terms (sigmoid BCE with fractional targets,
        ``-[y log p + (1 - y) log(1 - p)]``, p = sigmoid(logit)) and of the
        ``DiceLoss`` terms (soft Dice), and of every loss whose class sets
        ``accepts_soft_targets = True`` (``RAFLoss``: the float target with
        ``ignore_index`` at ignored pixels). Pixels where ``gt_sem_seg`` is
        ``ignore_index`` stay ignored; other loss types and ``acc_seg``
        keep the binary labels.

        A loss may return a dict of terms (``RAFLoss``): its keys go into
        the result as they are (summed with equal keys), so each term is
        logged and mmengine adds every ``loss_*`` key to the total.

        Raises:
            ValueError: a valid label is not 0 or 1; see also
                :meth:`_stack_batch_soft`.
        """
        seg_label = self._stack_batch_gt(batch_data_samples)  # B x 1 x H x W
        invalid = ((seg_label != 0) & (seg_label != 1)
                   & (seg_label != self.ignore_index))
        if bool(invalid.any()):
            bad = seg_label[invalid].unique().tolist()
            raise ValueError(
                f'{type(self).__name__}: gt_sem_seg must hold 0, 1 or '
                f'{self.ignore_index} (ignore), found {bad}')
        soft = self._stack_batch_soft(batch_data_samples,
                                      tuple(seg_label.shape[2:]))
        if self.loss_at == 'logits':
            seg_label = F.interpolate(
                seg_label.float(), size=seg_logits.shape[2:],
                mode='nearest')
            if soft is not None:
                soft = F.interpolate(
                    soft, size=seg_logits.shape[2:], mode='nearest')
        else:
            seg_logits = resize(
                input=seg_logits,
                size=seg_label.shape[2:],
                mode='bilinear',
                align_corners=self.align_corners)
        seg_label = seg_label.squeeze(1).long()  # B x H x W
        valid = seg_label != self.ignore_index
        binary_target = (seg_label * valid)[:, None]  # B x 1 x H x W
        masked_logits = seg_logits.masked_fill(~valid[:, None],
                                               float('-inf'))
        bce_label, dice_target = seg_label, binary_target
        if soft is not None:
            soft = soft.squeeze(1) * valid  # B x H x W, 0 where ignored
            # the ignore label marks the same pixels in the float target
            bce_label = soft.masked_fill(~valid, float(self.ignore_index))
            dice_target = soft[:, None]

        losses = self.loss_decode if isinstance(
            self.loss_decode, nn.ModuleList) else [self.loss_decode]
        out = dict()
        for loss_decode in losses:
            if isinstance(loss_decode, DiceLoss):
                value = loss_decode(
                    masked_logits, dice_target, weight=None,
                    ignore_index=self.ignore_index)
            elif isinstance(loss_decode, CrossEntropyLoss) or getattr(
                    loss_decode, 'accepts_soft_targets', False):
                value = loss_decode(
                    seg_logits, bce_label, weight=None,
                    ignore_index=self.ignore_index)
            else:
                value = loss_decode(
                    seg_logits, seg_label, weight=None,
                    ignore_index=self.ignore_index)
            if not isinstance(value, dict):  # one term, named by the loss
                value = {loss_decode.loss_name: value}
            for name, term in value.items():
                out[name] = out[name] + term if name in out else term

        with torch.no_grad():
            pred = seg_logits.squeeze(1).sigmoid() > self.threshold
            correct = (pred == seg_label.bool()) & valid
            out['acc_seg'] = correct.sum().float() * 100.0 / valid.sum(
            ).clamp(min=1).float()
        return out


@MODELS.register_module()
class ReferHead(BaseReferHead):
    """Text-conditioned referring mask head: stride-14 maps + sentence ->
    B x 1 x H' x W' logits at stride ``out_stride``.

    See the module docstring for the pipeline. Binary convention of mmseg:
    ``num_classes=2, out_channels=1``; the prediction is
    ``sigmoid(logits) > threshold``.

    Inputs ``feats`` follow mmseg's ``in_index`` / ``input_transform``: the
    default takes the last map of the tuple (a neck returns a 1-tuple);
    ``input_transform='resize_concat'`` with lists of ``in_channels`` /
    ``in_index`` concatenates several maps along channels.

    Losses (``loss_decode``, mmseg's loss registry) see logits bilinearly
    resized to the ground truth (B x H x W in {0, 1, 255 = ignore}). mmseg's
    ``DiceLoss`` cannot do the 1-channel binary case itself (its one-hot
    expansion clamps 255 into class 1 and takes the background channel, and
    its ``ignore_index`` drops a class channel, not pixels), so for it the
    head passes a B x 1 x H x W 0/1 target and logits set to -inf at ignored
    pixels: both then contribute 0 to every Dice sum, i.e.
    ``dice = 1 - 2 sum(p t) / (sum p^2 + sum t^2)`` over valid pixels
    (V-Net form; ``naive_dice=True`` gives the first-power form). Other losses
    get ``(logits, labels, ignore_index)`` as in mmseg. ``acc_seg`` is the
    binary pixel accuracy (x100) over valid pixels (mmseg's ``accuracy``
    uses top-1 over channels, meaningless for one channel).

    Args:
        in_channels: width d of the input map(s) (a list with
            ``input_transform``).
        channels: C, width of the stride-4 map the dynamic kernel sees.
        text_dims: width Ct of ``text.tokens`` (decoder keys/values).
        pooled_dims: width Cp of ``text.pooled`` (projector input).
        num_decoder_layers: VL decoder layers at the input resolution;
            0 disables the decoder.
        decoder_heads / decoder_ffn_channels / decoder_dropout: decoder
            attention heads, FFN width (``None``: d) and dropout (residual
            branches and FFN).
        decoder_attn_dropout: dropout on the decoder's attention weights
            (``None``: ``decoder_dropout``, as in CRIS/ETRIS).  Any rate
            above 0 makes PyTorch materialise the N x N self-attention map
            instead of running its fused kernel: at 448 px (N = 1024) that
            costs 0.64 s per CPU training step at batch 2, about 14 % of a
            frozen DINOv2-B forward (docs/benchmarks.md).
        decoder_text_pos: add a 1-D sine code to the word keys.
        coord_conv: before the decoder, ``x = x + CBR_3x3(CBR_3x3([x,
            x-grid, y-grid]))`` with grids ``linspace(-1, 1)`` over the map
            (the CoordConv of the CRIS-lineage neck, residual as in DETRIS),
            so the stride-14 map carries its own coordinates. Off by
            default.
        refine_cfg: SegVLM refinement (PEERS.md 4.5), off with ``None``:
            the config of a map block ``(x: B x c x h x w, state = pooled
            sentence) -> B x c x h x w`` built once per place in
            ``refine_at`` with ``channels`` = c of that map; ``type``
            defaults to ``SegVLMRefineBlock`` (N = ``num_blocks``
            DeformableRefine + SE + residual), ``text_dims`` to
            ``pooled_dims``. Every block gets ``text.pooled``; blocks
            without text conditioning ignore it.
        refine_at: where the refine blocks go, one or both of
            ``'neck'`` (on the input map, after ``coord_conv`` and before
            the decoder, c = d) and ``'up'`` (after each upsampling conv,
            c = that step's width: strides 7 and 4 by default).
        in_stride / out_stride: input map stride (patch 14) and logit
            stride (4); upsampling factor r = in_stride / out_stride.
        up_channels: widths of the upsampling steps' convs, one per step
            (``ceil(log2 r)`` steps: 2 for 14 -> 4); ``None`` = ``channels``
            for every step.  Narrowing as the map grows (FPN decoders do the
            same) makes the stride-4 convs cheap: ``(128, 64)`` costs about
            a fifth of ``(256, 256)`` at 448 px.
        kernel_size: k of the dynamic kernel (1 here, 3 in ETRIS/DETRIS).
        num_classes / out_channels / threshold: mmseg binary convention;
            ``out_channels`` must be 1.
        dropout_ratio: Dropout2d before the projector (0 = none).
        norm_cfg / act_cfg: of the upsampling convs.
        in_index / input_transform: mmseg's input selection.
        loss_decode: loss config(s); default BCE ``loss_mask`` + Dice
            ``loss_dice``.
        ignore_index: label value ignored by the losses (255).
        align_corners: of every bilinear resize.
        no_target_cfg: the no-target scorer (generalized referring
            segmentation), off with None; see :class:`BaseReferHead`. It
            reads V after coord_conv, the 'neck' refine blocks and the
            decoder (the stride-14 map, before upsampling).
        init_cfg: mmengine init config (PyTorch default init otherwise).
    """

    def __init__(self,
                 *,
                 in_channels: Union[int, Sequence[int]] = 512,
                 channels: int = 256,
                 text_dims: int = 512,
                 pooled_dims: int = 512,
                 num_decoder_layers: int = 0,
                 decoder_heads: int = 8,
                 decoder_ffn_channels: Optional[int] = None,
                 decoder_dropout: float = 0.1,
                 decoder_attn_dropout: Optional[float] = None,
                 decoder_text_pos: bool = True,
                 coord_conv: bool = False,
                 refine_cfg: Optional[ConfigType] = None,
                 refine_at: Union[str, Sequence[str]] = 'neck',
                 in_stride: int = 14,
                 out_stride: int = 4,
                 up_channels: Optional[Sequence[int]] = None,
                 kernel_size: int = 1,
                 num_classes: int = 2,
                 out_channels: int = 1,
                 threshold: float = 0.35,
                 dropout_ratio: float = 0.0,
                 norm_cfg: Optional[ConfigType] = dict(
                     type='BN', requires_grad=True),
                 act_cfg: ConfigType = dict(type='ReLU'),
                 in_index: Union[int, Sequence[int]] = -1,
                 input_transform: Optional[str] = None,
                 loss_decode: Union[ConfigType,
                                    Sequence[ConfigType]] = DEFAULT_LOSSES,
                 ignore_index: int = 255,
                 align_corners: bool = False,
                 no_target_cfg: Optional[dict] = None,
                 init_cfg: Optional[ConfigType] = None) -> None:
        self._check_binary(num_classes, out_channels)
        if in_stride < out_stride:
            raise ValueError(f'in_stride={in_stride} must be >= '
                             f'out_stride={out_stride}')
        super().__init__(
            in_channels=in_channels,
            channels=channels,
            text_dims=text_dims,
            pooled_dims=pooled_dims,
            num_classes=num_classes,
            out_channels=out_channels,
            threshold=threshold,
            dropout_ratio=dropout_ratio,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            in_index=in_index,
            input_transform=input_transform,
            loss_decode=loss_decode,
            ignore_index=ignore_index,
            align_corners=align_corners,
            no_target_cfg=no_target_cfg,
            init_cfg=init_cfg)

        d = self.in_channels
        self.in_stride = in_stride
        self.out_stride = out_stride
        self.coord_conv = None
        if coord_conv:
            self.coord_conv = nn.Sequential(
                conv_norm_act(d + 2, d, 3, norm_cfg=norm_cfg,
                              act_cfg=act_cfg),
                conv_norm_act(d, d, 3, norm_cfg=norm_cfg, act_cfg=act_cfg))
        self.decoder = None
        if num_decoder_layers > 0:
            self.decoder = VLDecoder(
                num_layers=num_decoder_layers, dims=d, text_dims=text_dims,
                num_heads=decoder_heads,
                ffn_dims=decoder_ffn_channels or d, dropout=decoder_dropout,
                attn_dropout=(decoder_dropout if decoder_attn_dropout is None
                              else decoder_attn_dropout),
                text_pos=decoder_text_pos)

        ratio = in_stride / out_stride
        num_steps = math.ceil(math.log2(ratio) - 1e-9) if ratio > 1 else 0
        widths = [channels] * num_steps if up_channels is None else [
            int(c) for c in up_channels
        ]
        if len(widths) != num_steps or any(c < 1 for c in widths):
            raise ValueError(
                f'ReferHead: up_channels needs {num_steps} positive widths '
                f'(one per 2x step from stride {in_stride} to {out_stride}), '
                f'got {up_channels}')
        self.up_convs = nn.ModuleList(
            ConvModule(
                c_in, c_out, 3, padding=1, norm_cfg=norm_cfg,
                act_cfg=act_cfg)
            for c_in, c_out in zip([d] + widths[:-1], widths))
        self.visual_proj = nn.Conv2d(
            widths[-1] if num_steps else d, channels, kernel_size=1)
        self.projector = TextDynamicProjector(
            channels=channels, text_dims=pooled_dims,
            kernel_size=kernel_size)
        # built last: with or without them, the layers above draw the same
        # initial weights for a given seed
        self.refine_in = self.refine_up = None
        if refine_cfg is not None:
            places = ((refine_at, ) if isinstance(refine_at, str) else
                      tuple(refine_at))
            unknown = set(places) - set(_REFINE_AT)
            if not places or unknown:
                raise ValueError(
                    f'ReferHead: refine_at must name one or more of '
                    f'{_REFINE_AT}, got {refine_at!r}')
            if 'neck' in places:
                self.refine_in = self._build_refine(refine_cfg, d)
            if 'up' in places:
                if not num_steps:
                    raise ValueError(
                        "ReferHead: refine_at='up' needs upsampling steps "
                        f'(in_stride={in_stride}, out_stride={out_stride})')
                self.refine_up = nn.ModuleList(
                    self._build_refine(refine_cfg, c) for c in widths)
        self._build_no_target(d)

    def _build_refine(self, cfg: ConfigType, channels: int) -> nn.Module:
        cfg = dict(cfg)
        if 'channels' in cfg:
            raise ValueError('ReferHead: refine_cfg must not set channels '
                             '(each block takes the width of its map)')
        cfg.setdefault('type', 'SegVLMRefineBlock')
        cfg.setdefault('text_dims', self.pooled_dims)
        return MODELS.build(dict(cfg, channels=channels))

    # ------------------------------------------------------------------
    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Stride-``in_stride`` grid h x w -> logit grid H' x W',
        ``H' = floor(h * in_stride / out_stride + 0.5)``."""
        ratio = self.in_stride / self.out_stride
        return (int(math.floor(height * ratio + 0.5)),
                int(math.floor(width * ratio + 0.5)))

    def upsample(self, x: Tensor, pooled: Optional[Tensor] = None) -> Tensor:
        """B x d x h x w -> B x C x H' x W': 2x bilinear + Conv3x3-BN-ReLU
        steps (each followed by its refine block with ``refine_at='up'``,
        which gets ``pooled``), the last one resizing to exactly H' x W',
        then Conv1x1."""
        h, w = x.shape[-2:]
        n = len(self.up_convs)
        sizes = [(h * 2**(i + 1), w * 2**(i + 1)) for i in range(n - 1)]
        if n:
            sizes.append(self.output_size(h, w))
        return self.visual_proj(
            upsample_steps(x, self.up_convs, sizes,
                           align_corners=self.align_corners,
                           refine=self.refine_up, state=pooled))

    def vl_features(self, inputs: Union[Tensor, Sequence[Tensor]],
                    text: TextFeatures) -> Tensor:
        """inputs: tuple of B x d x h x w maps (stride ``in_stride``),
        text: TextFeatures (tokens B x L x Ct, mask B x L, pooled B x Cp)
        -> V: B x d x h x w after coord_conv, the 'neck' refine blocks and
        the decoder (each when configured)."""
        x = self._select(inputs)
        self._check_text(x, text, tokens=self.decoder is not None)
        if self.coord_conv is not None:
            x = x + self.coord_conv(add_coord_channels(x))
        if self.refine_in is not None:
            x = self.refine_in(x, text.pooled)
        if self.decoder is not None:
            x = self.decoder(x, text)
        return x

    def mask_logits(self, x: Tensor, text: TextFeatures) -> Tensor:
        """V: B x d x h x w -> logits B x 1 x H' x W' (stride
        ``out_stride``): upsampling, dropout, dynamic projector."""
        x = self.upsample(x, text.pooled)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.projector(x, text.pooled)
