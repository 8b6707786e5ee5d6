# DETRIS-B on gRefCOCO (UNC splits): the RefCOCO recipe
# (configs/detris/detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py:
# soft targets, Adam 1e-4, 65 epochs, batch 32) with the CRIS head's
# no-target scorer (hidden width 256, loss_no_target weight 1, threshold
# 0.5; docs/gres.md) and the GRES metric.
_base_ = [
    '../detris/detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py',
    '../_base_/gres.py',
]
model = dict(decode_head=dict(no_target_cfg=dict()))
train_dataloader = dict(dataset={{_base_.grefcoco_dataset}})
val_dataloader = dict(dataset={{_base_.grefcoco_dataset}})
test_dataloader = dict(dataset={{_base_.grefcoco_dataset}})
val_evaluator = {{_base_.grefcoco_evaluator}}
test_evaluator = {{_base_.grefcoco_evaluator}}
# keep the checkpoint with the best GRES score (mIoU ignores 'no target')
default_hooks = dict(checkpoint=dict(save_best='gIoU'))
