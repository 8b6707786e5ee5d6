# Stand-in "foundation" for the domain-shift benchmark
# (tools/analysis_tools/domain_shift.py): no pretrained tiny 6-band DINOv2
# exists, so the tiny tower of the benchmark is pretrained here, fully
# (trainable='full', no adapters, stock UPerHead), on a generated set whose
# scenes and sensors are NOT the benchmark's:
#
#   python tools/data/make_synthetic_multispectral.py \
#       --out data/synthetic_multispectral_pretrain --seed 1 \
#       --random-domains 8 --num-train 320 --num-val 32
#
# seed 1: other scenes than the benchmark's (seed 0); 8 random sensors
# R00..R07 (make_random_domains: the same kinds of shift as B and C, at
# random severities and with other gains, none of them B or C), all mixed
# in every epoch. The foundation sees spectral variety, not the target
# sensors. The domain-shift tool exports backbone.backbone.* of the last
# checkpoint as the foundation file the benchmark configs load (frozen).
_base_ = ['../_base_/models/dinov2-tiny_uperhead_synthetic-multispectral-56x56.py']

pretrain_root = 'data/synthetic_multispectral_pretrain'
# the generator arguments of that set (the tool writes it with them)
pretrain_set = dict(seed=1, random_domains=8, num_train=320, num_val=32)
pretrain_domains = [
    f'R{d:02d}' for d in range(pretrain_set['random_domains'])
]


# one dataset per sensor, concatenated; serialize_data=False: the lists are
# short, and packing each of them costs a full garbage collection
def _domains(split, pipeline, test_mode):
    return [
        dict(
            type='SyntheticMultispectralDataset',
            data_root=f'{pretrain_root}/{name}',
            data_prefix=dict(img_path=f'img/{split}',
                             seg_map_path=f'ann/{split}'),
            test_mode=test_mode,
            serialize_data=False,
            pipeline=pipeline) for name in pretrain_domains
    ]


train_dataloader = dict(
    batch_size=16,
    dataset=dict(
        _delete_=True,
        type='ConcatDataset',
        datasets=_domains('train', {{_base_.train_pipeline}}, False)))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='ConcatDataset',
        datasets=_domains('val', {{_base_.test_pipeline}}, True)))
test_dataloader = val_dataloader

max_epochs = 12
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs,
    val_interval=max_epochs)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_epochs))
