# Ablation: SERA-Fusion routes each sample to its top-1 of 4 experts.
# Paper (RefCOCO val mIoU / oIoU): 75.46 / 73.32.
_base_ = ['../sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py']
model = dict(neck=dict(top_k=1))
