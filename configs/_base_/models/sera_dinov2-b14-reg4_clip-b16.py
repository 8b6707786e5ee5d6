# SERA: frozen DINOv2-B/14-reg4 (LayerNorm + bias trainable) with SERA-Adapter
# in four blocks, frozen CLIP ViT-B/16 text tower, SERA-Fusion neck with four
# experts and noisy Top-K (K=4) routing, referring head.
# Pretrained weights are local files (docs/install.md).
norm_cfg = dict(type='BN', requires_grad=True)
# CLIP normalisation for both towers, as the DINOv2-based RIS peers do.
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[122.7709383, 116.7460125, 104.09373615],
    std=[68.5005327, 66.6321579, 70.32316305],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size_divisor=14,
    test_cfg=dict(size_divisor=14))
text_dims = 512
model = dict(
    type='ReferringEncoderDecoder',
    data_preprocessor=data_preprocessor,
    text_encoder=dict(
        type='OpenCLIPTextEncoder',
        model_name='ViT-B-16',
        # OpenAI's CLIP weights were trained with QuickGELU.
        quick_gelu=True,
        pretrained='checkpoints/open_clip_vit_b16.bin',
        context_length=20,
        trainable='frozen'),
    backbone=dict(
        type='DINOv2',
        arch='base',
        num_register_tokens=4,
        out_indices=(3, 7, 11),
        adapter_indices=(2, 5, 8, 11),
        adapter_cfg=dict(
            type='SERAAdapter',
            text_dims=text_dims,
            hidden_dims=64,
            num_heads=4,
            norm_cfg=norm_cfg),
        trainable='ln_bias',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/dinov2_vitb14_reg4_sera.pth')),
    neck=dict(
        type='SERAFusion',
        in_channels=[768, 768, 768],
        channels=256,
        text_dims=text_dims,
        num_experts=4,
        top_k=4,
        routing='sample',
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='ReferHead',
        in_channels=256,
        channels=256,
        text_dims=text_dims,
        pooled_dims=text_dims,
        num_decoder_layers=1,
        # Dropout 0.1 on the decoder's residual branches, none on attention
        # weights: with it PyTorch materialises the 1024 x 1024 attention map
        # at 448 px, 0.64 s more per CPU training step (docs/benchmarks.md).
        decoder_attn_dropout=0.0,
        # 2x steps 256 -> 128 (stride 8) -> 64 (stride 4), then a 1x1 back to
        # 256: the stride-4 convolutions cost a fifth of a 256-wide path
        # (training step 3.05x -> 2.64x, inference 1.17x -> 1.03x the frozen
        # backbone forward; docs/benchmarks.md).  None = 256 throughout.
        up_channels=(128, 64),
        threshold=0.35,
        norm_cfg=norm_cfg),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
