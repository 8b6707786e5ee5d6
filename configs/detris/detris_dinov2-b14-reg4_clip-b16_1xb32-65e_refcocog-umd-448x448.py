# DETRIS-B on G-Ref (UMD partition): the RefCOCO schedule (65 epochs, x0.1
# at 35 and 55) with word_len 22 (DETRIS's refcocog_u config).
# Paper: 67.9 mIoU on val(u), 68.1 on test(u).
_base_ = ['./detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py']
_refer = dict(dataset='refcocog', split_by='umd')
train_dataloader = dict(dataset=_refer)
val_dataloader = dict(dataset=_refer)
test_dataloader = dict(dataset=_refer)
model = dict(text_encoder=dict(context_length=22))
