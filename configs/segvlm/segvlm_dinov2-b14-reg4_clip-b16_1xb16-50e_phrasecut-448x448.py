# SegVLM-style model (configs/_base_/models/segvlm_dinov2-b14-reg4_clip-b16.py)
# on PhraseCut, the set SegVLM reports (IoU ~53.9, PEERS.md 7), with SERA's
# recipe (448 x 448 letterbox; Adam 1e-4, x0.1 at epoch 35 of 50; batch
# 16). Data layout: docs/data_preparation.md, "PhraseCut"; mIoU / oIoU are
# PhraseCut's mean and cumulative IoU.
_base_ = [
    '../_base_/models/segvlm_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/phrasecut.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
