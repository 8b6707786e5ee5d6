# Tiny SegVLM-style model for the synthetic referring set: SERA's demo config
# (configs/sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py:
# same tiny towers, SERA-Adapters, SERA-Fusion, recipe and budget) with
# SegVLM's head parts and loss, as the RefCOCO config
# (segvlm_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py):
# - one text-conditioned refine block (DCNv2 + BN + SE + residual) on the
#   64-wide neck map and one after each upsampling conv (128 and 64 wide,
#   the up path of SERA's base head); 16 text channels for the offsets, SE
#   hidden width C / 16 (58,419 + 186,667 + 58,419 parameters);
# - the RAF loss (BCE + focal + generalised Dice) instead of BCE + Dice.
_base_ = ['../sera/sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
model = dict(
    decode_head=dict(
        refine_cfg=dict(
            type='SegVLMRefineBlock',
            num_blocks=1,
            text_cond=True,
            text_channels=16,
            se_text_cond=True),
        refine_at=('neck', 'up'),
        loss_decode=[dict(type='RAFLoss')]))
