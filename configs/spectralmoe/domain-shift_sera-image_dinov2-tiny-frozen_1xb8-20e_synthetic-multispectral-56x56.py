# Domain-shift benchmark, variant (b): the frozen stand-in foundation with
# an image-only SERA-Adapter (text_dims=None: no text parts, routing on the
# image alone) after every block, and the same UPerHead; adapters and head
# train. hidden_dims=24 puts its trainable adapter parameters (102 k) near
# those of the SpectralMoE variant (120 k). See
# configs/_base_/domain_shift_synthetic-multispectral.py and
# tools/analysis_tools/domain_shift.py.
_base_ = ['../_base_/domain_shift_synthetic-multispectral.py']

model = dict(
    backbone=dict(
        backbone=dict(adapters=[
            dict(
                type='SERAAdapter',
                slot='post_block',
                insert=(0, 1, 2, 3),
                text_dims=None,
                hidden_dims=24)
        ])))
