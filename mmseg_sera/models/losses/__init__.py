"""Losses of mmseg_sera, registered in mmseg's ``MODELS``."""
from .raf_loss import RAFLoss

__all__ = ['RAFLoss']
