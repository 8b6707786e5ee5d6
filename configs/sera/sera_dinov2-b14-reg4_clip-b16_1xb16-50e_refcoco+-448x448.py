# SERA on RefCOCO+ (UNC splits).  Paper: 70.4 mIoU on val.
# Same model and schedule as sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py.
_base_ = [
    '../_base_/models/sera_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/refcoco+.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
