# Ablation "+ SERA-Adapter": adapters in the backbone, no fusion experts.
# Paper: 75.35 mIoU (RefCOCO val).
_base_ = ['../sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py']
model = dict(neck=dict(num_experts=0))
