# DETRIS-B on G-Ref (Google partition: train / val): DETRIS's refcocog_g
# config trains 50 epochs, x0.1 at epoch 35, and keeps word_len 17.
# Paper: 65.9 mIoU on val(g).
_base_ = ['./detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py']
_refer = dict(dataset='refcocog', split_by='google')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
max_epochs = 50
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs,
         milestones=[35], gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs)
