# Tiny DETRIS for the synthetic referring set, on the SAME tiny towers and
# recipe as SERA's demo (inherited from
# configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py:
# ViT 96 x 4 blocks at 112 px with the sine-initialised position table, text
# tower 64 x 2 layers, both trained from scratch; AdamW 1e-3, warm-up +
# cosine, 50 epochs, batch 16, flips with left/right swapped, threshold 0.5),
# so that the synthetic comparison compares the methods, not the encoders.
#
# DETRIS's parts at toy widths instead of SERA's:
# - a Dense Aligner beside the MLP of blocks 1 and 3 (every other block, as
#   DETRIS-B's 1, 3, ..., 11), x 0.2, hidden 32 (DETRIS-B: 128 for 768);
# - a Text Adapter beside the MLP of text layer 1 (of 2), x 0.2, hidden 16;
# - HierarchicalAlignNeck (64 wide, residual around the coord convs) and
#   CRISHead (one decoder layer, as SERA's demo head; up path 64 -> 32).
# The recipe stays SERA's demo recipe (hard targets); add
# mask_interp='bilinear' to ReferResizePad for DETRIS's soft targets.
_base_ = ['../sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
text_dims = 64
model = dict(
    text_encoder=dict(
        adapters=[
            dict(type='DETRISTextAdapter', insert=(1, ), scale=0.2,
                 hidden_dims=16)
        ]),
    backbone=dict(
        adapter_indices=(),
        adapter_cfg=None,
        adapters=[
            dict(type='DETRISDenseAligner', insert=(1, 3), scale=0.2,
                 hidden_dims=32, attn_dims=32, num_heads=2,
                 text_dims=text_dims)
        ]),
    neck=dict(
        _delete_=True,
        type='HierarchicalAlignNeck',
        in_channels=(96, 96, 96),
        channels=64,
        text_dims=text_dims,
        num_heads=2,
        coord_residual=True,
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
