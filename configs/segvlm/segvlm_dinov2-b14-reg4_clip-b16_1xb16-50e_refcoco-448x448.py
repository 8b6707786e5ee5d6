# SegVLM-style model (configs/_base_/models/segvlm_dinov2-b14-reg4_clip-b16.py)
# with SERA's recipe (448 x 448 letterbox; Adam 1e-4, x0.1 at epoch 35 of
# 50; batch 16) on RefCOCO (UNC), for comparison with the other methods.
# SegVLM itself reports PhraseCut: segvlm_*_phrasecut-448x448.py.
_base_ = [
    '../_base_/models/segvlm_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/refcoco.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
