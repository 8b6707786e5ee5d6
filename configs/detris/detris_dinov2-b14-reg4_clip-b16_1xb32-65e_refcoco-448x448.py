# DETRIS-B recipe on RefCOCO (UNC), PEERS.md 1.1: frozen DINOv2-B/14-reg4 with
# Dense Aligners and a frozen CLIP ViT-B/16 text tower with Text Adapters
# (word_len 17), HierarchicalAlignNeck + CRISHead; 448 x 448 letterbox
# padded with the CLIP mean, CLIP mean/std, no flip or colour jitter; soft
# mask targets (bilinear, fractional at the edges); Adam 1e-4, no weight
# decay, x0.1 at epochs 35 and 55 of 65; batch 32 on one GPU; seed 0.
# Paper (DETRIS-B): 76.0 mIoU on val.  AMP as the peers: --amp.
_base_ = [
    '../_base_/models/detris_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/refcoco.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_65e.py',
]
crop_size = (448, 448)
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
train_dataloader = dict(batch_size=32, dataset=dict(pipeline=train_pipeline))
randomness = dict(seed=0)
