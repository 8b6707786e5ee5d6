# Tiny SERA for the synthetic referring set: trains on a CPU in minutes.
#
# The architecture is the paper's (DINOv2-style ViT with SERA-Adapter, CLIP
# text tower, SERA-Fusion with noisy Top-K routing, referring head) at toy
# widths.  No pretrained weights exist for such a model, so, unlike the paper
# (LayerNorm + bias only, Adam), it trains from scratch:
# - the backbone and the text tower train fully;
# - the position table is sized for the 112 px input (8 x 8 patches) and
#   starts from the fixed 2-D sine code: with the official random table the
#   model learns colours and shapes but not where things are, and position
#   and relation sentences stay near the text-blind level (docs/benchmarks.md);
# - AdamW with a one-epoch warm-up, cosine decay and gradient clipping, for
#   50 epochs: position and relation sentences are learned late (after
#   about 20 epochs), attribute sentences early;
# - random horizontal flips with left/right swapped in the sentence
#   (configs/_base_/datasets/synthetic_refer.py);
# - the head sees coordinates (CoordConv residual before the decoder) and
#   has two vision-language decoder layers: "the circle on the left" needs
#   the pixels of every circle to compare their x, which one layer (whose
#   self-attention runs before the sentence enters the decoder) learned only
#   late and in some seeds not at all (docs/benchmarks.md, "Why the spatial
#   sentences came late").
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
        img_size=112,
        pos_embed_init='sincos',
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
        pooled_dims=text_dims, num_decoder_layers=2, decoder_heads=2,
        coord_conv=True,
        # as when the recipe was tuned (64 tokens: no cost to speak of)
        decoder_attn_dropout=0.1,
        threshold=0.5))

# fused AdamW: one kernel per parameter instead of a dozen small ops; on
# this CPU the optimizer step went from 14.8 to 3.8 ms and the whole demo
# step from 0.147 to 0.128 s (docs/benchmarks.md)
optim_wrapper = dict(
    optimizer=dict(
        _delete_=True, type='AdamW', lr=1e-3, weight_decay=0.01,
        fused=True),
    clip_grad=dict(_delete_=True, max_norm=1.0))
max_epochs = 50
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=5, max_keep_ckpts=2))
randomness = dict(seed=0)
# draw the 112 px pictures three times larger (336 px panels)
visualizer = dict(min_size=336)
