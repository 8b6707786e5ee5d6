# Tiny SERA on the generalized synthetic set (sentences naming one object,
# several or none; tools/data/make_synthetic_refer.py --generalized): SERA's
# demo config (same towers, recipe and budget) with the head's no-target
# scorer (docs/gres.md) and the GRES metric per sentence kind.
_base_ = [
    '../sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py',
    '../_base_/gres.py',
]
model = dict(decode_head=dict(no_target_cfg=dict(hidden_channels=64)))
train_dataloader = dict(dataset={{_base_.gres_synthetic_dataset}})
val_dataloader = dict(dataset={{_base_.gres_synthetic_dataset}})
test_dataloader = dict(dataset={{_base_.gres_synthetic_dataset}})
val_evaluator = {{_base_.gres_synthetic_evaluator}}
test_evaluator = {{_base_.gres_synthetic_evaluator}}
# keep the checkpoint with the best GRES score (mIoU ignores 'no target')
default_hooks = dict(checkpoint=dict(save_best='gIoU'))
