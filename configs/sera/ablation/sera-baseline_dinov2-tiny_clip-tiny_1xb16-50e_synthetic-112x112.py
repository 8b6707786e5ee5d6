# Ablation "Baseline" of the tiny synthetic model: no SERA-Adapter, SERA-Fusion
# without experts (the sentence-gated level fusion only).  Same budget as the
# full tiny model; numbers in docs/benchmarks.md.
_base_ = ['../sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py']
model = dict(backbone=dict(adapter_indices=()), neck=dict(num_experts=0))
