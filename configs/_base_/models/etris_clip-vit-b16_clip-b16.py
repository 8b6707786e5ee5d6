# ETRIS ViT-B/16 (Xu et al., ICCV 2023) from mmseg_sera's parts (PEERS.md 2):
# frozen CLIP ViT-B/16 image tower and frozen CLIP ViT-B/16 text tower run
# in lock-step; after blocks 3, 7 and 11 of both an ETRISBridger stage
# writes a residual into both streams (d = 64, 8 heads, as released); both
# position tables train (visual 26 x 26 + 1 rows for 416 px, text 77 rows).
# Levels: blocks 3 and 7 raw, block 11 ln_post(.) @ proj -> (768, 768, 512);
# then the CRIS lineage: HierarchicalAlignNeck without the coord residual,
# VLGlobalAlignDecoder (3 x 512) and the 3 x 3 text-dynamic projector, BCE.
# Trainable: 23,829,313 parameters (the authors' count; PEERS.md 2.5).
# Pretrained weights are local files (docs/install.md): both towers read the
# full OpenAI CLIP ViT-B/16 state dict in open_clip's layout.
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN for several GPUs
# CLIP mean/std (RGB); 416 = 26 x 16, so nothing is padded at 416 px.
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[122.7709383, 116.7460125, 104.09373615],
    std=[68.5005327, 66.6321579, 70.32316305],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size_divisor=16,
    test_cfg=dict(size_divisor=16))
text_dims = 512
clip_checkpoint = 'checkpoints/open_clip_vit_b16.bin'
etris_blocks = (3, 7, 11)  # 0-based; the text blocks beside them (12 / 12)
model = dict(
    type='ReferringEncoderDecoder',
    data_preprocessor=data_preprocessor,
    text_encoder=dict(
        type='OpenCLIPTextEncoder',
        model_name='ViT-B-16',
        # OpenAI's CLIP weights were trained with QuickGELU.
        quick_gelu=True,
        pretrained=clip_checkpoint,
        context_length=17,  # word_len (22 for G-Ref UMD and Google)
        trainable='frozen',
        train_pos_embed=True),  # 77 x 512 = 39,424, as ETRIS counts it
    backbone=dict(
        type='CLIPViT',
        model_name='ViT-B-16',
        quick_gelu=True,
        pretrained=clip_checkpoint,
        # table stored for 26 x 26 patches (416 px); the checkpoint's
        # 14 x 14 is resized bicubically at load, as ETRIS does
        pos_embed_size=26,
        out_indices=etris_blocks,  # 3 and 7 raw, 11 ln_post'ed ...
        out_norm='last',
        out_proj=True,  # ... and @ proj: (768, 768, 512)
        trainable='frozen',  # the Bridger still trains
        train_pos_embed=True,  # (26^2 + 1) x 768 = 519,936
        adapters=[
            dict(type='ETRISBridger', insert=etris_blocks,
                 text_dims=text_dims, hidden_dims=64, num_heads=8)
        ]),
    neck=dict(
        type='HierarchicalAlignNeck',
        in_channels=(768, 768, 512),
        channels=512,
        text_dims=text_dims,
        coord_residual=False,
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
