# Stand-in RGB "foundation" for the second stream of the SpectralMoE variant
# of the domain-shift benchmark (SpectralMoE's frozen depth network on an
# RGB DINOv2): the 6-band pretraining run with a narrower tower (width 64,
# 2 heads) that sees only the red, green and blue bands (2, 1, 0), on the
# same pretraining set (other scenes, random sensors R00..R07; see
# pretrain_dinov2-tiny_1xb16-12e_synthetic-multispectral-random8-56x56.py).
# The tool exports backbone.backbone.* as the RGB foundation file.
_base_ = ['./pretrain_dinov2-tiny_1xb16-12e_synthetic-multispectral-random8-56x56.py']

rgb_dims = 64
model = dict(
    backbone=dict(
        bands=(2, 1, 0),
        backbone=dict(
            arch=dict(embed_dims=rgb_dims, num_layers=4, num_heads=2,
                      mlp_ratio=2),
            in_channels=3)),
    decode_head=dict(in_channels=[rgb_dims] * 4))
