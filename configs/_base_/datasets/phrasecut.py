# PhraseCut (VGPhraseCut v0: train / val / test / miniv), the layout of
# github.com/ChenyunWu/PhraseCutDataset's data/VGPhraseCut_v0/:
#   data/phrasecut/{image_data_split.json, refer_{train,val,test,miniv}.json}
#   data/phrasecut/images/<image_id>.jpg       (Visual Genome images)
# Same pipelines, letterbox size and metric as refcoco.py (inherited); one
# item per task (phrase), whose instances are merged into one mask.
# val excludes the 100 miniv images; the whole validation set is
#   --cfg-options val_dataloader.dataset.split=val_miniv
# and miniv (821 phrases) is a quick check.
_base_ = ['./refcoco.py']
dataset_type = 'PhraseCutDataset'
data_root = 'data/phrasecut'

# _delete_: drop refcoco.py's dataset / split_by / sentence_sampling
train_dataloader = dict(
    dataset=dict(
        _delete_=True, type=dataset_type, data_root=data_root,
        split='train', pipeline={{_base_.train_pipeline}}))
val_dataloader = dict(
    dataset=dict(
        _delete_=True, type=dataset_type, data_root=data_root, split='val',
        test_mode=True, pipeline={{_base_.test_pipeline}}))
test_dataloader = dict(
    dataset=dict(
        _delete_=True, type=dataset_type, data_root=data_root, split='test',
        test_mode=True, pipeline={{_base_.test_pipeline}}))
# PhraseCut's mean / cumulative IoU = mIoU / oIoU; group_by='kind' adds
# mIoU_/oIoU_{name,attribute,relation,verbose} (phrase_structure.type)
val_evaluator = dict(type='ReferSegMetric', group_by='kind')
test_evaluator = val_evaluator
