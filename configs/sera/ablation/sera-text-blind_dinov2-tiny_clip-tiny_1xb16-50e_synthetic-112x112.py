# Text-blind control of the tiny synthetic model: the full model, trained and
# tested with the same sentence for every sample, so it sees the image only.
# Its mIoU is what the image alone gives (the most salient object); the gap
# to the full model is what the sentences add.  Numbers in
# docs/benchmarks.md.
_base_ = ['../sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
blind_text = 'the shape'
crop_size = (112, 112)
train_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='random', fixed_text=blind_text),
    dict(type='RandomReferFlip', prob=0.5),
    dict(type='ReferResizePad', size=crop_size),
    dict(type='PackReferSegInputs'),
]
test_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='ReferResizePad', size=crop_size),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='first', fixed_text=blind_text),
    dict(type='PackReferSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
