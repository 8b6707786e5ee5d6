# SpectralMoE-RIS on RefCOCO (UNC): SERA's paper model and recipe with the
# backbone's four SERA-Adapters replaced by a SpectralMoEAdapter after every
# block of DINOv2-B/14-reg4 (all 12), whose second modality is the sentence:
# the CLIP ViT-B/16 word tokens (512 wide, padding masked) go through one
# Linear 512 -> 768 and their own router over the block's experts, and are
# fused into the visual experts' adjustment by cross-attention.  SERA-Fusion,
# the head, the frozen towers (LayerNorm + bias of DINOv2 trainable) and the
# schedule are SERA's.
#
# This is our interpretation (PEERS.md 5.4, INTERP): the released SpectralMoE
# is a semantic segmentation module whose second modality is a frozen depth
# network.  The adapter keeps its own defaults (fusion 'xattn', combine
# 'gated_sum', dot-product expert logits, Laplace routers, top-1 of 6
# experts, T = 100, r = 16, balance weight 1e-2), not released_compat; as in
# PEERS.md 5.4, W_tf, W_df, s and the word projection are shared by all
# blocks (shared_out=True; one set per block would be 20,123,148).
# num_layers=12 makes loss_moe_balance the mean over the blocks; it is
# summed with SERA-Fusion's loss_moe_balance under the same key.
#
# Trainable adapter parameters: 2,796,289 (12 x (6 experts 83,328 + two
# routers 18,432) + shared W_tf, W_df, s 1,181,185 + word projection
# 393,984); tests/test_configs_spectralmoe.py checks the number.
_base_ = ['../sera/sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py']
text_dims = 512
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
                text_dims=text_dims,
                fusion='xattn',
                shared_out=True,
                num_layers=num_blocks)
        ]))
