# Synthetic referring set written by
#   python tools/data/make_synthetic_refer.py --out data/synthetic_refer
# (RefCOCO layout: data/synthetic_refer/refcoco/{instances.json,refs(unc).p},
#  images under data/synthetic_refer/images/mscoco/images/train2014/).
# 112 x 112 images = 8 x 8 patches of 14 px.  No photometric augmentation:
# colour words decide the referent.  Horizontal flips swap the words left /
# right (leftmost / rightmost, left of / right of), which keeps every
# sentence of this grammar true.
dataset_type = 'RefCocoDataset'
data_root = 'data/synthetic_refer'
crop_size = (112, 112)

train_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='random'),
    dict(type='RandomReferFlip', prob=0.5),
    dict(type='ReferResizePad', size=crop_size),
    dict(type='PackReferSegInputs'),
]
# The mask is loaded after the resize: it stays at the original size, where
# ReferSegMetric compares it with the prediction.
test_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='ReferResizePad', size=crop_size),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='first'),
    dict(type='PackReferSegInputs'),
]

_dataset = dict(type=dataset_type, data_root=data_root, dataset='refcoco',
                split_by='unc')
train_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(**_dataset, split='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    # one item per sentence ('first' would evaluate one sentence per object)
    dataset=dict(**_dataset, split='val', test_mode=True,
                 sentence_sampling='all', pipeline=test_pipeline))
# Other splits: --cfg-options test_dataloader.dataset.split=testA (or testB)
test_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**_dataset, split='val', test_mode=True,
                 sentence_sampling='all', pipeline=test_pipeline))
# group_by='kind': extra mIoU_/oIoU_{attribute,position,relation}
val_evaluator = dict(type='ReferSegMetric', group_by='kind')
test_evaluator = val_evaluator
