# ETRIS ViT-B/16 on RefCOCO+ (UNC splits): the RefCOCO recipe and schedule
# (50 epochs, x0.1 at 35; word_len 17).  Paper numbers: not found
# (PEERS.md 7, Q1).
_base_ = ['./etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py']
_refer = dict(dataset='refcoco+', split_by='unc')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
