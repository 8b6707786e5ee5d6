# DETRIS-B on RefCOCO+ (UNC splits): the RefCOCO recipe and schedule
# (65 epochs, x0.1 at 35 and 55; word_len 17).  Paper: 68.9 mIoU on val.
_base_ = ['./detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py']
_refer = dict(dataset='refcoco+', split_by='unc')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
