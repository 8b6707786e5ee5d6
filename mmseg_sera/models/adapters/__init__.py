"""Backbone adapter slots (run inside the ViT block loop)."""
from .dense_moc import DenseMoC
from .detris_adapter import DETRISDenseAligner, DETRISTextAdapter
from .etris_bridger import ETRISBridger
from .sera_adapter import SERAAdapter
from .spectral_moe import (SpectralMoEAdapter, SpectralMoEShared,
                           tie_shared_parts)

__all__ = [
    'SERAAdapter', 'DenseMoC', 'DETRISDenseAligner', 'DETRISTextAdapter',
    'ETRISBridger', 'SpectralMoEAdapter', 'SpectralMoEShared',
    'tie_shared_parts'
]
