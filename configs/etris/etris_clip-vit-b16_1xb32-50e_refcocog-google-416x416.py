# ETRIS ViT-B/16 on G-Ref (Google partition: train / val): the RefCOCO
# schedule (50 epochs, x0.1 at 35) with word_len 22 (ETRIS's refcocog_g
# config; DETRIS keeps 17 there).  Paper numbers: not found (PEERS.md 7, Q1).
_base_ = ['./etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py']
_refer = dict(dataset='refcocog', split_by='google')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
model = dict(text_encoder=dict(context_length=22))
