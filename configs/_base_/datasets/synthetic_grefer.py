# Generalized synthetic referring set (multi-target, no-target, ordinal and
# negation sentences besides the single-target ones) written by
#   python tools/data/make_synthetic_refer.py --generalized \
#       --out data/synthetic_grefer
# (gRefCOCO layout: data/synthetic_grefer/grefcoco/{instances.json,
#  grefs(unc).json}, images under data/synthetic_grefer/images/train2014/).
# Pipelines as synthetic_refer.py (flips swap left / right, which keeps every
# sentence of the grammar true); one item per sentence in every split.
_base_ = ['./synthetic_refer.py']
dataset_type = 'GRefCocoDataset'
data_root = 'data/synthetic_grefer'
_refer = dict(type=dataset_type, data_root=data_root, dataset='grefcoco',
              split_by='unc', data_prefix=dict(img_path='images/train2014'),
              sentence_sampling='all')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
# per kind: attribute, position, relation, ordinal, negation, multi,
# no_target (gIoU_<kind>, cIoU_<kind>, N-acc_<kind>, T-acc_<kind>, ...)
val_evaluator = dict(type='ReferSegMetric', protocol='gres', group_by='kind')
test_evaluator = val_evaluator
