# Tiny SERA for the synthetic referring set: trains on a CPU in minutes.
#
# The architecture is the paper's (DINOv2-style ViT with SERA-Adapter, CLIP
# text tower, SERA-Fusion with noisy Top-K routing, referring head) at toy
# widths.  No pretrained weights exist for such a model, so, unlike the paper
# (LayerNorm + bias only), the backbone and the text tower train fully here.
_base_ = [
    '../_base_/models/sera_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/synthetic_refer.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
text_dims = 64
model = dict(
    text_encoder=dict(
        text_cfg=dict(width=text_dims, layers=2, heads=2),
        embed_dim=text_dims,
        pretrained=None,
        context_length=16,
        trainable='full'),
    backbone=dict(
        arch=dict(
            _delete_=True, embed_dims=96, num_layers=4, num_heads=3,
            mlp_ratio=2),
        num_register_tokens=0,
        out_indices=(1, 2, 3),
        adapter_indices=(1, 3),
        adapter_cfg=dict(text_dims=text_dims, hidden_dims=32, num_heads=2),
        trainable='full',
        init_cfg=None),
    neck=dict(
        in_channels=[96, 96, 96], channels=64, text_dims=text_dims,
        context_heads=2),
    decode_head=dict(
        in_channels=64, channels=32, text_dims=text_dims,
        pooled_dims=text_dims, num_decoder_layers=1, decoder_heads=2,
        threshold=0.5))

optim_wrapper = dict(optimizer=dict(lr=1e-3))
max_epochs = 20
param_scheduler = [
    dict(type='MultiStepLR', by_epoch=True, begin=0, end=max_epochs,
         milestones=[15], gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=5, max_keep_ckpts=2))
randomness = dict(seed=0)
