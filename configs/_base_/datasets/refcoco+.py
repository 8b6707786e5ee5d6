# RefCOCO+ (UNC splits: train / val / testA / testB).
# Same pipelines and loaders as refcoco.py, reading
# data/refcoco+/{instances.json, refs(unc).p}; images in
# data/images/mscoco/images/train2014/.
_base_ = ['./refcoco.py']
refer_dataset = 'refcoco+'
split_by = 'unc'
_refer = dict(dataset=refer_dataset, split_by=split_by)
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
