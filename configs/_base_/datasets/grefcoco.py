# gRefCOCO (generalized referring segmentation: a sentence names zero, one
# or several objects; UNC splits train / val / testA / testB), release
# layout:
#   data/grefcoco/{grefs(unc).json, instances.json}
#   data/images/train2014/COCO_train2014_*.jpg
# Same pipelines and loaders as refcoco.py; one item per sentence in every
# split (the GRES protocol).  PackReferSegInputs packs the ground-truth
# no-target flag (metainfo `no_target`); the metric scores gIoU, cIoU,
# Pr@0.7/0.8/0.9, N-acc and T-acc by the paper's definitions (for the
# numbers of ReLA's evaluator as first released, or after its accuracy fix:
#   --cfg-options test_evaluator.protocol=gres-rela   (gres-rela-fixed)).
# Evaluate the other splits with
#   --cfg-options test_dataloader.dataset.split=testA
_base_ = ['./refcoco.py']
dataset_type = 'GRefCocoDataset'
refer_dataset = 'grefcoco'
split_by = 'unc'
_refer = dict(type=dataset_type, dataset=refer_dataset, split_by=split_by,
              data_prefix=dict(img_path='images/train2014'),
              sentence_sampling='all')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
val_evaluator = dict(type='ReferSegMetric', protocol='gres')
test_evaluator = val_evaluator
