# Tiny SpectralMoE-RIS for the synthetic referring set: the tiny SERA demo
# model and recipe (configs/sera/sera_dinov2-tiny_*_synthetic-112x112.py)
# with its two SERA-Adapters replaced by a SpectralMoEAdapter after each of
# the 4 blocks, the sentence's 64-wide tokens as second modality (Linear
# 64 -> 96, own router, cross-attention fusion).  SERA-Fusion, the head and
# the from-scratch training are unchanged.  Our interpretation (PEERS.md
# 5.4, INTERP), as in
# spectralmoe-ris_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py:
# the adapter's own defaults, W_tf / W_df / s / projection shared by the
# blocks; the experts are sized for 8 x 8 patches 96 wide as in the tiny
# multispectral config (4 experts, T = 16 tokens, rank 8).
#
# Trainable adapter parameters: 45,345 (4 x (4 experts 3,584 + two routers
# 1,536) + shared W_tf, W_df, s 18,625 + word projection 6,240).
_base_ = ['../sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
text_dims = 64
num_blocks = 4
model = dict(
    backbone=dict(
        adapter_indices=(),
        adapter_cfg=None,
        adapters=[
            dict(
                type='SpectralMoEAdapter',
                insert=tuple(range(num_blocks)),
                second_source='text',
                text_dims=text_dims,
                fusion='xattn',
                num_experts=4,
                top_k=1,
                token_length=16,
                rank=8,
                shared_out=True,
                num_layers=num_blocks)
        ]))
