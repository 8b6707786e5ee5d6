"""Referring necks: fuse backbone levels with the sentence."""
from .sera_fusion import SERAFusion

__all__ = ['SERAFusion']
