# SpectralMoE-RIS (spectralmoe-ris_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-
# 448x448.py: a SpectralMoEAdapter after every block, the sentence as second
# modality, shared W_tf / W_df / s and word projection, SERA's fusion, head,
# frozen towers and schedule) on SERA's DINOv3-B/16 model.
_base_ = ['../sera/sera_dinov3-b16_clip-b16_1xb16-50e_refcoco-448x448.py']
num_blocks = 12
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
