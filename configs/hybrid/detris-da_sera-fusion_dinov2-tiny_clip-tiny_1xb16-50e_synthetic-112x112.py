# Hybrid on the synthetic set: DETRIS's Dense Aligners in the backbone
# (instead of SERA-Adapters), then SERA's neck and head: SERA-Fusion with
# four experts and noisy Top-4 routing, ReferHead.  Everything else is
# SERA's demo config (configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_
# synthetic-112x112.py): same tiny towers, recipe and budget, so it
# compares with the tiny SERA and DETRIS configs part by part.
# Dense Aligners: beside the MLP of blocks 1 and 3 (the blocks SERA's demo
# gives its adapters), x 0.2 inside LayerScale 2, hidden 32.
_base_ = ['../sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
text_dims = 64
model = dict(
    backbone=dict(
        adapter_indices=(),
        adapter_cfg=None,
        adapters=[
            dict(type='DETRISDenseAligner', insert=(1, 3), scale=0.2,
                 hidden_dims=32, attn_dims=32, num_heads=2,
                 text_dims=text_dims)
        ]))
