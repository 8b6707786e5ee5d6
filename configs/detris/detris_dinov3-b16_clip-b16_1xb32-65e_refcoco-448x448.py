# The DETRIS-B recipe on RefCOCO (detris_dinov2-b14-reg4_clip-b16_1xb32-65e_
# refcoco-448x448.py: Dense Aligners in blocks 1, 3, 5, 7, 9, 11 of a frozen
# image tower, Text Adapters in the same text blocks, HierarchicalAlignNeck +
# CRISHead, soft targets, Adam 1e-4 over 65 epochs, batch 32) with the image
# tower a frozen DINOv3-B/16 (RoPE: no position table to resample; 28 x 28
# patches at 448 px).  Weights: tools/model_converters/dinov3_to_sera.py.
_base_ = ['./detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py']
text_dims = 512
data_preprocessor = dict(size_divisor=16, test_cfg=dict(size_divisor=16))
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='DINOv3',
        arch='base',
        out_indices=(4, 8, 11),  # blocks 4 and 8 raw, block 11 normed
        out_norm='last',
        trainable='frozen',  # the Dense Aligners still train
        adapters=[
            dict(type='DETRISDenseAligner', insert=(1, 3, 5, 7, 9, 11),
                 scale=0.2, hidden_dims=128, attn_dims=128, num_heads=8,
                 text_dims=text_dims)
        ],
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/dinov3_vitb16_sera.pth')))
