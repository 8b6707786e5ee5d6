"""Evaluation metrics (registered in mmseg's METRICS)."""
from .refer_metric import (GT_NO_TARGET_KEY, PRED_NO_TARGET_KEY, PROTOCOLS,
                           ReferSegMetric, gres_scores, refer_scores)

__all__ = ['ReferSegMetric', 'refer_scores', 'gres_scores', 'PROTOCOLS',
           'PRED_NO_TARGET_KEY', 'GT_NO_TARGET_KEY']
