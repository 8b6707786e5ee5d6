# DETRIS on a frozen DINOv3-L/16: the DINOv3-B config with Dense Aligners in
# every other block of the 24 (1, 3, ..., 23) and the levels after blocks
# 9, 17 (raw) and 23 (normed), the B positions at twice the depth; the text
# tower and its Text Adapters are unchanged.
_base_ = ['./detris_dinov3-b16_clip-b16_1xb32-65e_refcoco-448x448.py']
model = dict(
    backbone=dict(
        arch='large',
        out_indices=(9, 17, 23),
        adapters=[
            dict(type='DETRISDenseAligner', insert=tuple(range(1, 24, 2)),
                 scale=0.2, hidden_dims=128, attn_dims=128, num_heads=8,
                 text_dims=512)
        ],
        init_cfg=dict(checkpoint='checkpoints/dinov3_vitl16_sera.pth')),
    neck=dict(in_channels=(1024, 1024, 1024)))
