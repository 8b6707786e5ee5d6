# Router ablation of the tiny synthetic model: SERA-Fusion's router scores
# the experts with SpectralMoE's distance logits, r_e = -||z - w_e||_2
# ('laplace'), instead of the dot product.  Nothing else changes (noise
# floor, gate init and loss weights stay the tiny model's); note that the
# z-loss then penalises squared distances rather than logit sizes.
_base_ = ['../sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
model = dict(neck=dict(logit_fn='laplace'))
