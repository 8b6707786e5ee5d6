# SERA on DINOv3-B/16 (RoPE, 4 register tokens), otherwise the paper setting
# of sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py: LayerNorm +
# bias trainable, SERA-Adapter after blocks 2, 5, 8, 11, frozen CLIP ViT-B/16
# text tower, SERA-Fusion (noisy Top-4), 448 x 448 letterbox (28 x 28
# patches of 16 px), Adam 1e-4, 50 epochs, batch 16.
# Weights: python tools/model_converters/dinov3_to_sera.py \
#   dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth \
#   checkpoints/dinov3_vitb16_sera.pth --arch base
_base_ = ['./sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py']
data_preprocessor = dict(size_divisor=16, test_cfg=dict(size_divisor=16))
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='DINOv3',
        arch='base',
        init_cfg=dict(checkpoint='checkpoints/dinov3_vitb16_sera.pth')))
