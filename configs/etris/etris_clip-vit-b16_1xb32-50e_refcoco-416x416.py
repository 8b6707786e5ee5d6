# ETRIS ViT-B/16 recipe on RefCOCO (UNC), PEERS.md 1.1 and 2: frozen CLIP
# ViT-B/16 image and text towers in lock-step with an ETRISBridger after
# blocks 3, 7, 11 (d = 64, as released), both position tables trained,
# word_len 17, HierarchicalAlignNeck (768, 768, 512) + CRISHead; 416 x 416
# letterbox padded with the CLIP mean, CLIP mean/std, no flip or colour
# jitter; soft mask targets (bilinear, fractional at the edges); Adam 1e-4,
# no weight decay, x0.1 at epoch 35 of 50 (schedule_50e.py); batch 32 on
# one GPU; seed 0.  Paper (ViT-B/16): 70.51 mIoU on val (the paper's 1.39 M
# Bridger is d = 128: etris-d128_...).  AMP as the peers: --amp.
_base_ = [
    '../_base_/models/etris_clip-vit-b16_clip-b16.py',
    '../_base_/datasets/refcoco.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
crop_size = (416, 416)  # 26 x 26 patches of 16 px
pad_val = (104.09, 116.75, 122.77)  # CLIP mean in BGR: 0 after normalising
train_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='random'),
    # mask_interp='bilinear': the loss sees the soft target gt_soft_mask;
    # gt_sem_seg stays binary (acc_seg, ignore label).
    dict(type='ReferResizePad', size=crop_size, pad_val=pad_val,
         mask_interp='bilinear'),
    dict(type='PackReferSegInputs'),
]
# Mask loaded after the resize: ground truth at the original size.
test_pipeline = [
    dict(type='LoadReferImageFromFile'),
    dict(type='ReferResizePad', size=crop_size, pad_val=pad_val),
    dict(type='LoadReferringMask'),
    dict(type='SelectSentence', mode='first'),
    dict(type='PackReferSegInputs'),
]
train_dataloader = dict(batch_size=32, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
randomness = dict(seed=0)
