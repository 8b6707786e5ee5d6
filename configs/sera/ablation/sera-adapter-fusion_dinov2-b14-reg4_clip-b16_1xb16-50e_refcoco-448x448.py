# Ablation "+ SERA-Adapter + SERA-Fusion": the full model (Top-4).
# Paper: 76.50 mIoU (RefCOCO val).
_base_ = ['../sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py']
model = dict(neck=dict(num_experts=4, top_k=4))
