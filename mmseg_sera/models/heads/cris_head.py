"""The CRIS-lineage head shared by ETRIS and DETRIS (PEERS.md 1.4-1.6).

Pipeline (B batch, d = 512, h x w the neck's grid, L words)::

    V: B x d x h x w  (HierarchicalAlignNeck)
    --VLGlobalAlignDecoder (3 pre-norm layers; pixels attend to pixels,
      then to the words)--> B x d x h x w
    --TextDynamicConvProjector--> B x 1 x 4h x 4w logits:
        X = Conv1x1(CBR_3x3(Up2(CBR_3x3(Up2(V)))))     B x 256 x 4h x 4w
        [vec(K_b), b_b] = Linear(s_b)                  K_b: 256 x 3 x 3
        logit_b = conv2d(X_b, K_b, padding 1) + b_b

The logits are 4x the neck's grid (stride 3.5 px for DINOv2's patch 14,
stride 4 for CLIP's 16). Loss: BCE on the logits, the ground truth
nearest-resized to the logit grid (``loss_at='logits'``).
"""
from typing import Optional, Sequence, Union

from mmseg.registry import MODELS
from mmseg.utils import ConfigType
from torch import Tensor, nn

from ..necks.hierarchical_align import conv_norm_act
from ..structures import TextFeatures
from .refer_head import (BaseReferHead, TextDynamicProjector, VLDecoder,
                         upsample_steps)

__all__ = ['VLGlobalAlignDecoder', 'TextDynamicConvProjector', 'CRISHead']

CRIS_LOSS = dict(
    type='CrossEntropyLoss', use_sigmoid=True, avg_non_ignore=True,
    loss_name='loss_mask', loss_weight=1.0)


@MODELS.register_module()
class VLGlobalAlignDecoder(VLDecoder):
    """Vision-language decoder of ETRIS ("GA") and DETRIS ("Decoder"):
    :class:`VLDecoder` with the peers' defaults, registered.

    Each layer (v: B x hw x d pixels, w: B x L x Ct words, P_v the fixed
    2-D sine code: first d/2 channels x, last d/2 y, sin on even / cos on
    odd channels, frequencies ``exp(-ln(1e4) 2i / (d/2))``; P_t the 1-D
    sine code)::

        v = v + Drop(LN_sa(SelfAttn(q = k = LN1(v) + P_v, val = LN1(v))))
        v = v + Drop(LN_ca(CrossAttn(q = LN2(v) + P_v, k = w + P_t, val = w,
                                     key_padding_mask = text.mask)))
        v = v + Drop(Lin(LN(Drop(ReLU(Lin(LN3(v)))))))

    then a final LayerNorm. ``forward(x, text)``: B x d x h x w ->
    B x d x h x w (any h x w). At the peer widths: 2,632,704 parameters per
    layer + 1,024 = 7,899,136.

    Args:
        num_layers, dims, num_heads, ffn_dims: 3, 512, 8, 512.
        text_dims: Ct, width of ``text.tokens`` (512).
        dropout: on the residual branches and inside the FFN (0.1).
        attn_dropout: on the attention weights; ``None`` = ``dropout``
            (the peers).
        text_pos: add the 1-D sine code to the word keys (the peers).
    """

    def __init__(self,
                 *,
                 num_layers: int = 3,
                 dims: int = 512,
                 text_dims: int = 512,
                 num_heads: int = 8,
                 ffn_dims: int = 512,
                 dropout: float = 0.1,
                 attn_dropout: Optional[float] = None,
                 text_pos: bool = True) -> None:
        if num_layers < 1:
            raise ValueError('VLGlobalAlignDecoder: num_layers must be >= 1,'
                             f' got {num_layers}')
        super().__init__(
            num_layers=num_layers, dims=dims, text_dims=text_dims,
            num_heads=num_heads, ffn_dims=ffn_dims, dropout=dropout,
            attn_dropout=dropout if attn_dropout is None else attn_dropout,
            text_pos=text_pos)


@MODELS.register_module()
class TextDynamicConvProjector(nn.Module):
    """Upsampling path + per-sample dynamic convolution of the CRIS lineage.

    With n = ``len(up_channels)`` steps (2 in the peers)::

        X   = Conv1x1(CBR_3x3(Up2(... CBR_3x3(Up2(V)))))   B x C x 2^n h x
                                                             2^n w
        [vec(K_b), b_b] = Linear(s_b): Cp -> C k^2 + 1      K_b: C x k x k
        logit_b = conv2d(X_b, K_b, padding = k // 2) + b_b  B x 1 x 2^n h x
                                                             2^n w

    Up2 is bilinear x2 (``align_corners``), CBR_3x3 a 3x3 conv without
    bias + BN + ReLU, Conv1x1 has a bias. The dynamic part is
    :class:`TextDynamicProjector` (run as one grouped conv). Parameters at
    the peer widths (512 -> (512, 256), C = 256, Cp = 512, k = 3):
    4,788,737 = 3,606,272 visual + 1,182,465 text Linear.

    Args:
        in_channels: d, width of V.
        up_channels: output width of each Up2 + CBR step.
        channels: C, width of X (output of the Conv1x1).
        text_dims: Cp, width of ``text.pooled``.
        kernel_size: k, odd.
        norm_cfg, act_cfg: of the CBR steps.
        align_corners: of the bilinear upsampling (``False`` in the peers).
    """

    def __init__(self,
                 *,
                 in_channels: int = 512,
                 up_channels: Sequence[int] = (512, 256),
                 channels: int = 256,
                 text_dims: int = 512,
                 kernel_size: int = 3,
                 norm_cfg: Optional[dict] = dict(type='BN'),
                 act_cfg: Optional[dict] = dict(type='ReLU'),
                 align_corners: bool = False) -> None:
        super().__init__()
        widths = [int(c) for c in up_channels]
        if any(c < 1 for c in widths):
            raise ValueError('TextDynamicConvProjector: up_channels must be '
                             f'positive, got {up_channels}')
        self.align_corners = align_corners
        self.up_convs = nn.ModuleList(
            conv_norm_act(c_in, c_out, 3, norm_cfg=norm_cfg, act_cfg=act_cfg)
            for c_in, c_out in zip([in_channels] + widths[:-1], widths))
        self.visual_proj = nn.Conv2d(
            widths[-1] if widths else in_channels, channels, kernel_size=1)
        self.dynamic = TextDynamicProjector(
            channels=channels, text_dims=text_dims, kernel_size=kernel_size)

    @property
    def scale(self) -> int:
        """Output grid / input grid: 2^n."""
        return 2**len(self.up_convs)

    def visual(self, x: Tensor) -> Tensor:
        """V: B x d x h x w -> X: B x C x 2^n h x 2^n w."""
        h, w = x.shape[-2:]
        sizes = [(h * 2**(i + 1), w * 2**(i + 1))
                 for i in range(len(self.up_convs))]
        return self.visual_proj(
            upsample_steps(x, self.up_convs, sizes,
                           align_corners=self.align_corners))

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        """V: B x d x h x w, pooled: B x Cp -> B x 1 x 2^n h x 2^n w."""
        return self.dynamic(self.visual(x), pooled)


@MODELS.register_module()
class CRISHead(BaseReferHead):
    """ETRIS / DETRIS head: :class:`VLGlobalAlignDecoder` +
    :class:`TextDynamicConvProjector` behind the mask-head contract of
    :class:`BaseReferHead` (``forward(inputs, text)``, ``loss``, ``predict``,
    ``loss_by_feat``; ``num_classes=2, out_channels=1``, prediction
    ``sigmoid > threshold``).

    Inputs: a tuple of B x d x h x w maps (a neck's 1-tuple; mmseg's
    ``in_index`` / ``input_transform`` select) and ``TextFeatures``.
    Output: B x 1 x 4h x 4w logits (2^n h with n upsampling steps).
    Defaults are the peers' (PEERS.md 1.4-1.6): d = 512, 3 decoder layers,
    8 heads, FFN 512, dropout 0.1 (also on attention weights), up path
    (512, 256), C = 256, 3x3 dynamic kernel, plain BCE computed on the
    logit grid (``loss_at='logits'``, ground truth nearest-resized),
    threshold 0.35. 12,687,873 parameters at these widths.

    Args:
        in_channels: d.
        channels: C, width the dynamic kernel sees.
        text_dims / pooled_dims: widths of ``text.tokens`` / ``text.pooled``.
        num_decoder_layers: decoder depth; 0 = no decoder.
        decoder_heads, decoder_ffn_channels (``None`` = d),
        decoder_dropout, decoder_attn_dropout (``None`` = decoder_dropout),
        decoder_text_pos: see :class:`VLGlobalAlignDecoder`.
        up_channels, kernel_size: see :class:`TextDynamicConvProjector`.
        num_classes, out_channels, threshold: binary convention.
        dropout_ratio: Dropout2d on X before the dynamic conv (0 = none, the
            peers).
        norm_cfg, act_cfg: of the projector's CBRs.
        in_index, input_transform, ignore_index, align_corners: mmseg's.
        loss_decode: loss config(s), ``loss_*`` names; default BCE
            ``loss_mask``.
        loss_at: ``'logits'`` (the peers) or ``'gt'``; see
            :class:`BaseReferHead`.
        no_target_cfg: the no-target scorer (generalized referring
            segmentation), off with None; see :class:`BaseReferHead`. It
            reads V after the decoder (the neck's grid).
        init_cfg: mmengine init config (PyTorch defaults otherwise).
    """

    def __init__(self,
                 *,
                 in_channels: Union[int, Sequence[int]] = 512,
                 channels: int = 256,
                 text_dims: int = 512,
                 pooled_dims: int = 512,
                 num_decoder_layers: int = 3,
                 decoder_heads: int = 8,
                 decoder_ffn_channels: Optional[int] = 512,
                 decoder_dropout: float = 0.1,
                 decoder_attn_dropout: Optional[float] = None,
                 decoder_text_pos: bool = True,
                 up_channels: Sequence[int] = (512, 256),
                 kernel_size: int = 3,
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
                                    Sequence[ConfigType]] = CRIS_LOSS,
                 ignore_index: int = 255,
                 align_corners: bool = False,
                 loss_at: str = 'logits',
                 no_target_cfg: Optional[dict] = None,
                 init_cfg: Optional[ConfigType] = None) -> None:
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
            loss_at=loss_at,
            no_target_cfg=no_target_cfg,
            init_cfg=init_cfg)
        d = self.in_channels
        self.decoder = None
        if num_decoder_layers > 0:
            self.decoder = VLGlobalAlignDecoder(
                num_layers=num_decoder_layers, dims=d, text_dims=text_dims,
                num_heads=decoder_heads,
                ffn_dims=decoder_ffn_channels or d, dropout=decoder_dropout,
                attn_dropout=decoder_attn_dropout, text_pos=decoder_text_pos)
        self.projector = TextDynamicConvProjector(
            in_channels=d, up_channels=up_channels, channels=channels,
            text_dims=pooled_dims, kernel_size=kernel_size,
            norm_cfg=norm_cfg, act_cfg=act_cfg, align_corners=align_corners)
        self._build_no_target(d)

    def vl_features(self, inputs: Union[Tensor, Sequence[Tensor]],
                    text: TextFeatures) -> Tensor:
        """inputs: tuple of B x d x h x w maps, text: TextFeatures (tokens
        B x L x Ct, mask B x L, pooled B x Cp) -> V: B x d x h x w after
        the decoder."""
        x = self._select(inputs)
        self._check_text(x, text, tokens=self.decoder is not None)
        if self.decoder is not None:
            x = self.decoder(x, text)
        return x

    def mask_logits(self, x: Tensor, text: TextFeatures) -> Tensor:
        """V: B x d x h x w -> logits B x 1 x 2^n h x 2^n w."""
        x = self.projector.visual(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.projector.dynamic(x, text.pooled)
