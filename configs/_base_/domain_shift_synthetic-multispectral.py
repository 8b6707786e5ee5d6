# Shared by the three variants of the domain-shift benchmark
# (configs/spectralmoe/domain-shift_*, run by
# tools/analysis_tools/domain_shift.py): one frozen stand-in foundation, one
# head, one schedule, train on domain A, validate on A (checkpoint
# selection sees no target data), test on each domain by overriding
# test_dataloader.dataset.data_root.
#
# The foundation is the tiny 6-band DINOv2 pretrained by
# configs/spectralmoe/pretrain_dinov2-tiny_1xb16-12e_synthetic-multispectral-random8-56x56.py
# on other scenes and random sensors, exported (backbone weights only) to
# `foundation` below by the tool (pass another file with
# model.backbone.backbone.init_cfg.checkpoint=PATH). It is frozen
# (trainable='frozen': no gradient, eval mode); what trains is the head
# and, per variant, the adapters.
_base_ = ['./models/dinov2-tiny_uperhead_synthetic-multispectral-56x56.py']

foundation = 'work_dirs/domain_shift/foundation/dinov2-tiny-6band.pth'
model = dict(
    backbone=dict(
        backbone=dict(
            trainable='frozen',
            init_cfg=dict(
                _delete_=True, type='Pretrained', checkpoint=foundation))))

# same budget for every variant: 20 epochs of domain A (320 scenes,
# batch 8: 800 iterations), AdamW 1e-3, warm-up then cosine
max_epochs = 20
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=5)
