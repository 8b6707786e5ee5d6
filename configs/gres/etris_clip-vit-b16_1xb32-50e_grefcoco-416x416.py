# ETRIS ViT-B/16 on gRefCOCO (UNC splits): the RefCOCO recipe
# (configs/etris/etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py: 416 px,
# soft targets, Adam 1e-4, 50 epochs, batch 32) with the CRIS head's
# no-target scorer (hidden width 256, loss_no_target weight 1, threshold
# 0.5; docs/gres.md) and the GRES metric.
_base_ = [
    '../etris/etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py',
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
