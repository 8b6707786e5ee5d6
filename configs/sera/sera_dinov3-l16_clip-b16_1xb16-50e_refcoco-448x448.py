# SERA on DINOv3-L/16: the DINOv3-B config with the 24-block, 1024-wide
# tower; maps after blocks 7, 15, 23 and SERA-Adapters after 5, 11, 17, 23
# (the B positions 2, 5, 8, 11 at twice the depth), LayerNorm + bias
# trainable, the neck reading 1024 channels.
# Weights: python tools/model_converters/dinov3_to_sera.py \
#   dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth \
#   checkpoints/dinov3_vitl16_sera.pth --arch large
_base_ = ['./sera_dinov3-b16_clip-b16_1xb16-50e_refcoco-448x448.py']
model = dict(
    backbone=dict(
        arch='large',
        out_indices=(7, 15, 23),
        adapter_indices=(5, 11, 17, 23),
        init_cfg=dict(checkpoint='checkpoints/dinov3_vitl16_sera.pth')),
    neck=dict(in_channels=[1024, 1024, 1024]))
