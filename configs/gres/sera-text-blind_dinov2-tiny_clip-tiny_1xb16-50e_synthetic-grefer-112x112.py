# Text-blind control on the generalized synthetic set: the tiny SERA GRES
# model trained and tested with the same sentence ('the shape') for every
# sample (configs/sera/ablation/sera-text-blind_...), so it sees the image
# only.  It cannot know when a sentence names nothing or which objects a
# multi-target sentence means; the gap to the full model is what the
# sentences add.
_base_ = [
    '../sera/ablation/sera-text-blind_dinov2-tiny_clip-tiny_1xb16-50e_'
    'synthetic-112x112.py',
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
