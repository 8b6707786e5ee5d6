"""Backbone adapter slots (run inside the ViT block loop)."""
from .sera_adapter import SERAAdapter

__all__ = ['SERAAdapter']
