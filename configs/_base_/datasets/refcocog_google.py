# G-Ref / RefCOCOg, Google partition (train / val; no public test).
# Same pipelines and loaders as refcoco.py, reading
# data/refcocog/{instances.json, refs(google).p}; images in
# data/images/mscoco/images/train2014/.
_base_ = ['./refcoco.py']
refer_dataset = 'refcocog'
split_by = 'google'
_refer = dict(dataset=refer_dataset, split_by=split_by)
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
