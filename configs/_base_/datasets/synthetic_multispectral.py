# Synthetic multispectral land cover, one folder per sensor domain, written by
#   python tools/data/make_synthetic_multispectral.py \
#       --out data/synthetic_multispectral
# (data/synthetic_multispectral/{A,B,C}/{img,ann}/{train,val}/NNNNN.{npy,png};
#  56 x 56 px, 6 bands stored as uint16 DN, 5 classes).
#
# Domain generalisation protocol: train on domain A; validate on A's val
# split (in-domain, for checkpoint selection: no target data is looked at);
# test on the val split of a target domain, B by default.  mmseg runs one
# test set per call, and every domain holds the same val scenes, so the
# per-domain scores are comparable; evaluate each domain with
#   python tools/test.py CONFIG CKPT --cfg-options \
#       test_dataloader.dataset.data_root=data/synthetic_multispectral/C
# (A for in-domain, B, C for the shifted sensors).
dataset_type = 'SyntheticMultispectralDataset'
data_root = 'data/synthetic_multispectral'
num_bands = 6
crop_size = (56, 56)
# band mean / std (DN) of domain A's training images, from meta.json: the
# normalisation is the source sensor's, as it would be in practice
band_mean = [873.49, 1064.93, 1038.61, 2148.59, 1960.47, 1470.67]
band_std = [404.09, 441.11, 664.56, 1217.65, 1171.99, 1064.75]

# mmcv's LoadImageFromFile reads at most 4 channels: .npy loader.  No
# photometric augmentation (it would blur the sensor shift under study);
# flips only (rotations go through cv2.warpAffine, limited to 4 channels).
train_pipeline = [
    dict(type='LoadMultiBandImageFromFile', num_bands=num_bands),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadMultiBandImageFromFile', num_bands=num_bands),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]

train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root + '/A',
        data_prefix=dict(img_path='img/train', seg_map_path='ann/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root + '/A',
        data_prefix=dict(img_path='img/val', seg_map_path='ann/val'),
        test_mode=True,
        pipeline=test_pipeline))
# the target domain: B (override data_root for A or C, see above)
test_dataloader = dict(
    val_dataloader,
    dataset=dict(val_dataloader['dataset'], data_root=data_root + '/B'))
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
