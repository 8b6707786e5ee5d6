# Domain-shift benchmark, variant (d): the SpectralMoE adapter with the
# released module's settings (SpectralMoEAdapter(released_compat=True)):
# diagonal fusion (token n of one stream with token n of the other),
# log-sum-exp combine without gates, summed expert logits, W_tf / W_df / s
# shared by all blocks, balance loss x1e3 with the sample variance, and the
# released sizes E = 6 experts, T = 100 tokens, rank r = 16.
#
# Variant (c), domain-shift_spectralmoe_*, is this project's reading of
# SpectralMoE instead (cross-attention fusion, gated sum, dot-product
# logits, E 4, T 16, r 8, loss x1e-2). Everything else (frozen foundation,
# second RGB tower, head, schedule, budget) is variant (c)'s. The one
# departure from the release: its two backbones are equally wide, ours are
# not (96 and 64), so a Linear 64 -> 96 projects the second stream.
_base_ = [
    './domain-shift_spectralmoe_dinov2-tiny-frozen_1xb8-20e_synthetic-multispectral-56x56.py'  # noqa: E501
]

model = dict(
    backbone=dict(
        backbone=dict(adapters=[
            dict(
                type='SpectralMoEAdapter',
                insert=(0, 1, 2, 3),
                released_compat=True,
                second_dims={{_base_.second_dims}},
                num_layers=4)
        ])))
