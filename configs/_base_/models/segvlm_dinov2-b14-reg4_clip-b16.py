# SegVLM's parts (PEERS.md 4) on SERA's model (DINOv2-B/14-reg4 with
# SERA-Adapters, frozen CLIP ViT-B/16 text tower, SERA-Fusion, ReferHead),
# added in the head:
# - SegVLM refinement (DeformableRefine = DCNv2 3x3 + BN + SE + residual),
#   one block on the fused stride-14 map before the decoder (256 wide) and
#   one after each upsampling conv (128 wide at stride 7, 64 at stride 4,
#   where the boundaries are); the offsets and the SE gates are
#   conditioned on the pooled sentence (64 and C/16 text channels);
#   718,139 + 233,707 + 103,667 parameters (trainable 5.84 M, SERA 4.79 M);
# - the RAF loss (BCE + focal + generalised Dice, weights 1/1/1) instead of
#   BCE + Dice.
# SegVLM published no code and its method section was not read: the
# placement, the text conditioning and the loss weights are our
# interpretation (docs/peers.md, "SegVLM").
_base_ = ['./sera_dinov2-b14-reg4_clip-b16.py']
model = dict(
    decode_head=dict(
        refine_cfg=dict(
            type='SegVLMRefineBlock',
            num_blocks=1,
            text_cond=True,
            text_channels=64,
            se_text_cond=True,
            # 'mmcv' runs the same weights on mmcv's compiled kernel
            backend='torchvision'),
        refine_at=('neck', 'up'),
        loss_decode=[
            dict(type='RAFLoss', lambda_bce=1.0, lambda_focal=1.0,
                 lambda_dice=1.0, dice_mode='generalised',
                 loss_name='loss_raf')
        ]))
