"""Referring necks: fuse backbone levels with the sentence."""
from .hierarchical_align import HierarchicalAlignNeck, mha_gate_to_linear
from .sera_fusion import SERAFusion

__all__ = ['SERAFusion', 'HierarchicalAlignNeck', 'mha_gate_to_linear']
