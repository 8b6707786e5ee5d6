# RefCOCO (UNC splits: train / val / testA / testB), refer toolkit layout:
#   data/refcoco/{instances.json, refs(unc).p}
#   data/images/mscoco/images/train2014/COCO_train2014_*.jpg
# (MMDetection's data/coco layout: data_root='data/coco',
#  data_prefix=dict(img_path='train2014')).
# 448 x 448 letterbox as DETRIS (32 x 32 patches of 14 px); the CLIP mean/std
# live in the model's data_preprocessor.  Evaluate the other splits with
#   --cfg-options test_dataloader.dataset.split=testA
dataset_type = 'RefCocoDataset'
data_root = 'data'
refer_dataset = 'refcoco'
split_by = 'unc'
crop_size = (448, 448)
# Padding colour: the CLIP mean in BGR (images load as BGR), so the padding is
# 0 after normalisation, as in CRIS/ETRIS/DETRIS.
pad_val = (104.09, 116.75, 122.77)

train_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='random'),
    dict(type='ReferResizePad', size=crop_size, pad_val=pad_val),
    dict(type='PackReferSegInputs'),
]
# Optional augmentation (the peers use none).  No hue change: colour words.
train_pipeline_aug = [
    dict(type='LoadReferImageFromFile'),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='random'),
    dict(type='ReferResizePad', size=crop_size, pad_val=pad_val),
    dict(type='RandomReferFlip', prob=0.5),
    dict(type='PhotoMetricDistortion', brightness_delta=24,
         contrast_range=(0.8, 1.2), saturation_range=(0.8, 1.2),
         hue_delta=0),
    dict(type='PackReferSegInputs'),
]
# Mask loaded after the resize: ground truth at the original size.
test_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='ReferResizePad', size=crop_size, pad_val=pad_val),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='first'),
    dict(type='PackReferSegInputs'),
]

train_dataloader = dict(
    batch_size=16,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type, data_root=data_root, dataset=refer_dataset,
        split_by=split_by, split='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    # 'all': one item per sentence, the papers' protocol; 'first' (one
    # sentence per object, ~3x faster) is the peers' choice during training.
    dataset=dict(
        type=dataset_type, data_root=data_root, dataset=refer_dataset,
        split_by=split_by, split='val', test_mode=True,
        sentence_sampling='all', pipeline=test_pipeline))
test_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, dataset=refer_dataset,
        split_by=split_by, split='val', test_mode=True,
        sentence_sampling='all', pipeline=test_pipeline))
val_evaluator = dict(type='ReferSegMetric')
test_evaluator = val_evaluator
