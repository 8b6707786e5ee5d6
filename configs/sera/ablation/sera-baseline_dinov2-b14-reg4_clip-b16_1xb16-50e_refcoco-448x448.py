# Ablation "Baseline": no SERA-Adapter, SERA-Fusion without experts (the
# sentence-gated level fusion only).  Paper: 74.90 mIoU (RefCOCO val).
_base_ = ['../sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py']
model = dict(backbone=dict(adapter_indices=()), neck=dict(num_experts=0))
