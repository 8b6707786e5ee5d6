# Ablation "+ SERA-Adapter" of the tiny synthetic model: adapters in the
# backbone, no fusion experts.  Numbers in docs/benchmarks.md.
_base_ = ['../sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
model = dict(neck=dict(num_experts=0))
