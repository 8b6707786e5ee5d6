# Parts of generalized referring segmentation (GRES) for configs that
# inherit a method's own config (configs/gres/).  mmengine refuses two
# bases that both define the data loaders, so such a config names this file
# as its second base and takes the datasets and metric from it by reference:
#   train_dataloader = dict(dataset={{_base_.gres_synthetic_dataset}})
# The values are those of configs/_base_/datasets/synthetic_grefer.py and
# grefcoco.py (tests/test_configs_gres.py checks that they agree).
gres_synthetic_dataset = dict(
    type='GRefCocoDataset', data_root='data/synthetic_grefer',
    dataset='grefcoco', split_by='unc',
    data_prefix=dict(img_path='images/train2014'), sentence_sampling='all')
gres_synthetic_evaluator = dict(
    type='ReferSegMetric', protocol='gres', group_by='kind')
grefcoco_dataset = dict(
    type='GRefCocoDataset', dataset='grefcoco', split_by='unc',
    data_prefix=dict(img_path='images/train2014'), sentence_sampling='all')
grefcoco_evaluator = dict(type='ReferSegMetric', protocol='gres')
