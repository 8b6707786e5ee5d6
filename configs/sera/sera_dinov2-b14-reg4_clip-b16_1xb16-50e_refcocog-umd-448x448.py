# SERA on G-Ref (UMD partition: train / val / test).
# Same model and schedule as sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py.
_base_ = [
    '../_base_/models/sera_dinov2-b14-reg4_clip-b16.py',
    '../_base_/datasets/refcocog_umd.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/schedule_50e.py',
]
# Longer sentences: 22 tokens, as the RIS peers use for G-Ref.
model = dict(text_encoder=dict(context_length=22))
