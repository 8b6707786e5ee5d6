# SERA, paper setting on RefCOCO (UNC): DINOv2-B/14-reg4 (LayerNorm + bias
# trainable) with SERA-Adapter, frozen CLIP ViT-B/16 text tower, SERA-Fusion
# with noisy Top-4 routing; 448 x 448 letterbox; Adam 1e-4, x0.1 at epoch 35
# of 50; batch 16 on one GPU.  Paper: 76.5 mIoU on val.
_base_ = [
    '../_base_/models/sera_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/refcoco.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
