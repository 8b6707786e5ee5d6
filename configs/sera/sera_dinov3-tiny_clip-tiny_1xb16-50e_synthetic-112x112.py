# Tiny SERA on a DINOv3-style tower for the synthetic referring set: the
# recipe of sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py (toy
# widths, trained from scratch, AdamW + cosine, flips with left/right
# swapped) with the DINOv2 tower replaced by a DINOv3 one: patch 16 (7 x 7
# patches at 112 px), RoPE instead of a position table (nothing to size or
# initialise), 4 register tokens, masked qkv bias, LayerNorm eps 1e-5.
_base_ = ['./sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
text_dims = 64
data_preprocessor = dict(size_divisor=16, test_cfg=dict(size_divisor=16))
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='DINOv3',
        arch=dict(embed_dims=96, num_layers=4, num_heads=3, mlp_ratio=2),
        num_register_tokens=4,
        out_indices=(1, 2, 3),
        adapter_indices=(1, 3),
        adapter_cfg=dict(
            type='SERAAdapter',
            text_dims=text_dims,
            hidden_dims=32,
            num_heads=2,
            norm_cfg=dict(type='BN', requires_grad=True)),
        trainable='full',
        init_cfg=None))
