# SpectralMoE-RIS on SERA's DINOv3-L/16 model: a SpectralMoEAdapter after
# every one of the 24 blocks (the released SpectralMoE's placement on its
# DINOv3-L), the sentence as second modality, shared W_tf / W_df / s and
# word projection.
_base_ = ['../sera/sera_dinov3-l16_clip-b16_1xb16-50e_refcoco-448x448.py']
num_blocks = 24
model = dict(
    backbone=dict(
        adapter_indices=(),
        adapter_cfg=None,
        adapters=[
            dict(
                type='SpectralMoEAdapter',
                insert=tuple(range(num_blocks)),
                second_source='text',
                text_dims=512,
                fusion='xattn',
                shared_out=True,
                num_layers=num_blocks)
        ]))
