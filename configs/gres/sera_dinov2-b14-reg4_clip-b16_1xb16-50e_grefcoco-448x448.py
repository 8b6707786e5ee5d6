# SERA on gRefCOCO (UNC splits; sentences naming one object, several or
# none): the RefCOCO paper setting (sera_dinov2-b14-reg4_clip-b16_1xb16-50e_
# refcoco-448x448.py) with the head's no-target scorer (hidden width 256,
# loss_no_target weight 1, threshold 0.5; docs/gres.md), scored by the GRES
# paper's gIoU, cIoU, Pr@0.7-0.9, N-acc and T-acc.
_base_ = [
    '../_base_/models/sera_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/grefcoco.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
model = dict(decode_head=dict(no_target_cfg=dict()))
# keep the checkpoint with the best GRES score (mIoU ignores 'no target')
default_hooks = dict(checkpoint=dict(save_best='gIoU'))
