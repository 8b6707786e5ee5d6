# Tiny ETRIS for the synthetic referring set, on the SAME tiny towers and
# recipe as SERA's demo (inherited from
# configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py:
# ViT 96 x 4 blocks at 112 px with the sine-initialised position table, text
# tower 64 x 2 layers, both trained from scratch; AdamW 1e-3, warm-up +
# cosine, 50 epochs, batch 16, flips with left/right swapped, threshold 0.5),
# so that the synthetic comparison compares the methods, not the encoders.
# Like the tiny DETRIS config, the image tower stays SERA's tiny DINOv2
# (there is no tiny CLIP image tower with weights either); the ETRISBridger
# works on DINOv2 (CLS passes unchanged).
#
# ETRIS's parts at toy widths instead of SERA's:
# - no SERA-Adapter; an ETRISBridger (3 stages in ViT-B/16, here 2) after
#   image blocks 1 and 3.  The towers run in lock-step: with 4 image and 2
#   text blocks, text block 0 runs after image block 1 and text block 1
#   after image block 3, each right before the Bridger stage there; hidden
#   32 (ETRIS: 64 for 768), 2 heads;
# - the neck and head get the Bridger-modified text stream;
# - HierarchicalAlignNeck (96, 96, 96) -> 64 wide, no coord residual
#   (ETRIS; DINOv2 has no 512-d proj, so the last level stays 96) and
#   CRISHead at the tiny DETRIS widths (one decoder layer, up path 64 -> 32).
# The recipe stays SERA's demo recipe (hard targets, full training of the
# tiny towers, no separate position-table rule); add
# mask_interp='bilinear' to ReferResizePad for ETRIS's soft targets.
_base_ = ['../sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
text_dims = 64
model = dict(
    backbone=dict(
        adapter_indices=(),
        adapter_cfg=None,
        adapters=[
            dict(type='ETRISBridger', insert=(1, 3), text_dims=text_dims,
                 hidden_dims=32, num_heads=2)
        ]),
    neck=dict(
        _delete_=True,
        type='HierarchicalAlignNeck',
        in_channels=(96, 96, 96),
        channels=64,
        text_dims=text_dims,
        num_heads=2,
        coord_residual=False,
        norm_cfg={{_base_.norm_cfg}}),
    decode_head=dict(
        _delete_=True,
        type='CRISHead',
        in_channels=64,
        channels=32,
        text_dims=text_dims,
        pooled_dims=text_dims,
        num_decoder_layers=1,
        decoder_heads=2,
        decoder_ffn_channels=64,
        up_channels=(64, 32),
        threshold=0.5,
        norm_cfg={{_base_.norm_cfg}}))
