# The tiny 6-band DINOv2 + UPerHead of the domain-shift benchmark
# (tools/analysis_tools/domain_shift.py): the architecture shared by the
# stand-in foundation's pretraining (configs/spectralmoe/pretrain_*) and the
# three benchmark variants (configs/spectralmoe/domain-shift_*).
#
#   EncoderDecoder
#   ├─ backbone: PyramidDINOv2 (a DualStreamDINOv2 in the SpectralMoE
#   │   │        variant): the same tower under backbone.backbone
#   │   └─ backbone: DINOv2 on the 6 bands, 4 blocks of width 96, patch 7
#   │                on 56 px (8 x 8 tokens), all 4 block maps returned,
#   │                resampled to strides 7/4, 7/2, 7, 14 (out_scales,
#   │                parameter-free)
#   └─ decode_head: UPerHead on the 4 maps
#
# Tower and head are those of
# configs/spectralmoe/spectralmoe_dinov2-tiny_1xb8-20e_synthetic-multispectral-56x56.py.
# Normalisation: the constants of the dataset base (domain A's training
# band mean / std), used unchanged for pretraining and fine-tuning, as a
# foundation model fixes its input normalisation once.
_base_ = [
    '../datasets/synthetic_multispectral.py',
    '../default_runtime.py',
]
custom_imports = dict(
    imports=['mmseg_sera'],
    allow_failed_imports=False)
num_classes = 5
dims = 96
out_scales = (4, 2, 1, 0.5)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean={{_base_.band_mean}},
    std={{_base_.band_std}},
    bgr_to_rgb=False,
    pad_val=0,
    seg_pad_val=255,
    size={{_base_.crop_size}})
tower = dict(
    type='DINOv2',
    arch=dict(embed_dims=dims, num_layers=4, num_heads=3, mlp_ratio=2),
    patch_size=7,
    img_size=56,
    in_channels={{_base_.num_bands}},
    pos_embed_init='sincos',
    out_indices=(0, 1, 2, 3),
    trainable='full',
    init_cfg=None)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(type='PyramidDINOv2', backbone=tower,
                  out_scales=out_scales),
    decode_head=dict(
        type='UPerHead',
        in_channels=[dims] * 4,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 4),
        channels=64,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=dict(type='BN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01),
    clip_grad=dict(max_norm=1.0))
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=True),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=True, interval=5,
                    max_keep_ckpts=1,
                    backend_args=dict(backend='local_atomic')),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
# mmseg's own visualizer for semantic segmentation (draws nothing unless
# the hook is told to)
visualizer = dict(
    _delete_=True,
    type='SegLocalVisualizer',
    vis_backends=[dict(type='LocalVisBackend')],
    name='visualizer')
randomness = dict(seed=0)
