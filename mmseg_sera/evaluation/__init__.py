"""Evaluation metrics (registered in mmseg's METRICS)."""
from .refer_metric import ReferSegMetric, refer_scores

__all__ = ['ReferSegMetric', 'refer_scores']
