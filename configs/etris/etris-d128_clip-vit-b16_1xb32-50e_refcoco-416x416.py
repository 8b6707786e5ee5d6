# ETRIS ViT-B/16 on RefCOCO with the paper's Bridger width: d = 128 gives
# 1,387,648 Bridger parameters, the paper's "1.39 M" to the parameter
# (the released config has d = 64, 598,592; PEERS.md 2.5, open question Q2).
# Everything else as etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py.
# Trainable: 24,618,369.
_base_ = ['./etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py']
model = dict(
    backbone=dict(adapters=[
        dict(type='ETRISBridger', insert=(3, 7, 11), text_dims=512,
             hidden_dims=128, num_heads=8)
    ]))
