# Domain-shift benchmark, variant (c): the frozen stand-in foundation with a
# SpectralMoEAdapter after every block, each reading the block tokens of a
# frozen second tower on the RGB bands, and the same UPerHead; adapters and
# head train. Adapter settings as in
# spectralmoe_dinov2-tiny_1xb8-20e_synthetic-multispectral-56x56.py.
#
# The second tower (SpectralMoE: a frozen depth network on an RGB DINOv2)
# is the stand-in RGB foundation pretrained by
# pretrain_dinov2-tiny-rgb_1xb16-12e_synthetic-multispectral-random8-56x56.py
# on the same pretraining set as the 6-band one (other scenes, random
# sensors), exported by the tool to `foundation_rgb` below (another file:
# model.backbone.second.init_cfg.checkpoint=PATH). A random second tower
# would give the adapters noise features instead of a second model's view.
# See configs/_base_/domain_shift_synthetic-multispectral.py and
# tools/analysis_tools/domain_shift.py.
_base_ = ['../_base_/domain_shift_synthetic-multispectral.py']

second_dims = 64
foundation_rgb = 'work_dirs/domain_shift/foundation/dinov2-tiny-rgb.pth'
model = dict(
    backbone=dict(
        type='DualStreamDINOv2',
        backbone=dict(adapters=[
            dict(
                type='SpectralMoEAdapter',
                insert=(0, 1, 2, 3),
                second_source='tokens',
                second_dims=second_dims,
                fusion='xattn',
                num_experts=4,
                top_k=1,
                token_length=16,
                rank=8,
                num_layers=4,
                loss_weight=1e-2)
        ]),
        second=dict(
            type='DINOv2',
            arch=dict(embed_dims=second_dims, num_layers=4, num_heads=2,
                      mlp_ratio=2),
            patch_size=7,
            img_size=56,
            in_channels=3,
            pos_embed_init='sincos',
            trainable='frozen',
            init_cfg=dict(type='Pretrained', checkpoint=foundation_rgb)),
        second_bands=(2, 1, 0)),
    auxiliary_head=dict(type='BackboneAuxLossHead'))
