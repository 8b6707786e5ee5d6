# DETRIS-L on RefCOCO (UNC), DETRIS's config/refcoco/DETRIS_large.yaml: the
# DETRIS-B recipe with a frozen DINOv2-L/14-reg4 (24 blocks, 1024 wide),
# Dense Aligners in blocks 2, 6, ..., 22 (hidden 128, attention 128), levels
# after blocks 8 and 16 (raw) and 23 (normed), the neck on 1024-wide maps;
# the text tower and its adapters as in DETRIS-B; 50 epochs, x0.1 at 35.
# Paper (DETRIS-L): 77.3 mIoU on val. For the authors' released weights:
# tools/model_converters/detris_to_sera.py --backbone large (docs/
# checkpoints.md).
_base_ = ['./detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py']
model = dict(
    backbone=dict(
        arch='large',
        out_indices=(8, 16, 23),
        adapters=[
            dict(type='DETRISDenseAligner', insert=(2, 6, 10, 14, 18, 22),
                 scale=0.2, hidden_dims=128, attn_dims=128, num_heads=8,
                 text_dims=512)
        ],
        init_cfg=dict(
            checkpoint='checkpoints/dinov2_vitl14_reg4_sera.pth')),
    neck=dict(in_channels=(1024, 1024, 1024)))
max_epochs = 50
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs,
         milestones=[35], gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs)
