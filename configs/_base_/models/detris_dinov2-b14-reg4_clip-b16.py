# DETRIS-B (Huang et al., AAAI 2025) from mmseg_sera's parts (PEERS.md 3):
# frozen DINOv2-B/14-reg4 with a Dense Aligner beside the MLP of blocks
# 1, 3, 5, 7, 9, 11 (x 0.2, inside LayerScale 2), frozen CLIP ViT-B/16 text
# tower with a Text Adapter in the same text blocks (x 0.2), then the CRIS
# lineage: HierarchicalAlignNeck (residual around the coord convs),
# VLGlobalAlignDecoder (3 x 512) and the 3 x 3 text-dynamic projector, BCE.
# Trainable: 25,518,129 parameters (the authors' count; PEERS.md 3.7).
# Pretrained weights are local files (docs/install.md).
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN for several GPUs
# CLIP mean/std, also for DINOv2, as DETRIS normalises.
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
detris_blocks = (1, 3, 5, 7, 9, 11)  # 0-based, image and text towers
model = dict(
    type='ReferringEncoderDecoder',
    data_preprocessor=data_preprocessor,
    text_encoder=dict(
        type='OpenCLIPTextEncoder',
        model_name='ViT-B-16',
        # OpenAI's CLIP weights were trained with QuickGELU.
        quick_gelu=True,
        pretrained='checkpoints/open_clip_vit_b16.bin',
        context_length=17,  # word_len (22 for G-Ref UMD)
        trainable='frozen',  # the Text Adapters still train
        adapters=[
            dict(type='DETRISTextAdapter', insert=detris_blocks, scale=0.2,
                 hidden_dims=64)
        ]),
    backbone=dict(
        type='DINOv2',
        arch='base',
        num_register_tokens=4,
        # 37 x 37 position table (DETRIS builds img_size=526, 526 // 14 =
        # 37; the 518 px checkpoints have the same table).
        img_size=518,
        # DETRIS resamples the table the old (no-register) way: bicubic by
        # scale factor (grid + 0.1) / 37, no antialias.
        interpolate_offset=0.1,
        interpolate_antialias=False,
        out_indices=(4, 8, 11),  # blocks 4 and 8 raw, block 11 normed
        out_norm='last',
        trainable='frozen',  # the Dense Aligners still train
        adapters=[
            dict(type='DETRISDenseAligner', insert=detris_blocks, scale=0.2,
                 hidden_dims=128, attn_dims=128, num_heads=8,
                 text_dims=text_dims)
        ],
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/dinov2_vitb14_reg4_sera.pth')),
    neck=dict(
        type='HierarchicalAlignNeck',
        in_channels=(768, 768, 768),
        channels=512,
        text_dims=text_dims,
        coord_residual=True,
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='CRISHead',
        in_channels=512,
        channels=256,
        text_dims=text_dims,
        pooled_dims=text_dims,
        threshold=0.35,
        norm_cfg=norm_cfg),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
