"""Referring-segmentation metric: mIoU, oIoU and Pr@X over expressions."""
import json
import os
import os.path as osp
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from mmseg.registry import METRICS

__all__ = ['ReferSegMetric', 'refer_scores']

DEFAULT_PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def refer_scores(intersections: Sequence[float], unions: Sequence[float],
                 pr_thresholds: Sequence[float] = DEFAULT_PR_THRESHOLDS
                 ) -> Dict[str, float]:
    """Scores (in percent) from per-expression intersections I_k and unions
    U_k, k = 1..N::

        IoU_k  = I_k / U_k, and 0 where U_k = 0
        mIoU   = 100 * mean_k IoU_k
        oIoU   = 100 * sum_k I_k / sum_k U_k        (0 if every U_k = 0)
        Pr@t   = 100 * #{k : IoU_k > t} / N          (strict)

    ``oIoU`` is MMDetection's ``cIoU`` ("overall"/"cumulative" IoU) and
    ``mIoU`` its ``mIoU``, which also sets the IoU of an empty union to 0.
    """
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    n = inter.size
    if n == 0:
        out = {'mIoU': 0.0, 'oIoU': 0.0}
        out.update({f'Pr@{t:g}': 0.0 for t in pr_thresholds})
        return out
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    total_u = union.sum()
    out = {
        'mIoU': float(100.0 * iou.mean()),
        'oIoU': float(100.0 * inter.sum() / total_u) if total_u > 0 else 0.0,
    }
    for t in pr_thresholds:
        out[f'Pr@{t:g}'] = float(100.0 * (iou > t).mean())
    return out


def _field(sample: Any, key: str) -> Any:
    """``sample[key]`` for dicts (what the Evaluator passes) and data
    elements alike; None when absent."""
    if isinstance(sample, dict):
        return sample.get(key)
    return getattr(sample, key, None) if key in sample else None


def _plain(value: Any) -> Any:
    """numpy / torch scalars -> Python scalars (JSON-friendly records)."""
    if isinstance(value, (np.generic, torch.Tensor)) and value.ndim == 0:
        return value.item()
    return value


def _pixel_data(sample: Any, key: str) -> Optional[torch.Tensor]:
    value = _field(sample, key)
    if value is None:
        return None
    data = value['data'] if isinstance(value, dict) else value.data
    return torch.as_tensor(data)


@METRICS.register_module()
class ReferSegMetric(BaseMetric):
    """Per-expression IoU of a binary referring mask, aggregated as
    ``mIoU``, ``oIoU`` and ``Pr@0.5 ... Pr@0.9`` (percent, see
    :func:`refer_scores`).

    Each data sample must carry, at the **original image size** H x W:

    - ``gt_sem_seg.data``: 1 x H x W, 1 = referred object, 0 = background,
      ``ignore_index`` pixels excluded from I and U;
    - ``pred_sem_seg.data``: 1 x H x W, nonzero = object (the segmentor's
      ``sigmoid(logit) > threshold``), used when ``threshold`` is None;
    - ``seg_logits.data``: 1 x H x W, used instead when ``threshold`` is
      set: ``pred = score > threshold`` with ``score = seg_logits``
      (``seg_logits_type='probs'``, the default: mmseg 1.2.2's
      ``BaseSegmentor.postprocess_result`` stores ``sigmoid(logits)`` there
      for one-channel heads) or ``score = sigmoid(seg_logits)``
      (``'logits'``, raw logits).
    - metainfo ``ref_id``, ``sent_id`` (kept for the dump) and, for
      ``group_by``, that key (e.g. ``kind`` of the synthetic set).

    Per expression the metric keeps only (I, U, ids), so distributed
    evaluation gathers small records through :class:`BaseMetric`.

    Args:
        threshold (float, optional): re-threshold ``seg_logits``; None uses
            ``pred_sem_seg``. Default: None.
        seg_logits_type (str): ``'probs'`` or ``'logits'``. Default:
            ``'probs'``.
        pr_thresholds (Sequence[float]): IoU thresholds of ``Pr@t``.
        ignore_index (int): ground-truth value excluded from I and U.
            Default: 255.
        group_by (str, optional): metainfo key; adds ``mIoU_<value>`` and
            ``oIoU_<value>`` per value (samples without it go to
            ``'none'``). Default: None.
        out_file (str, optional): JSON file for the per-expression records
            ``{ref_id, sent_id, iou, I, U[, group]}``, written on rank 0.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Default: ``'cpu'``.
        prefix (str, optional): metric name prefix.
    """

    default_prefix: Optional[str] = None

    def __init__(self,
                 threshold: Optional[float] = None,
                 seg_logits_type: str = 'probs',
                 pr_thresholds: Sequence[float] = DEFAULT_PR_THRESHOLDS,
                 ignore_index: int = 255,
                 group_by: Optional[str] = None,
                 out_file: Optional[str] = None,
                 collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        if seg_logits_type not in ('logits', 'probs'):
            raise ValueError(
                "seg_logits_type must be 'logits' or 'probs', got "
                f'{seg_logits_type!r}')
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f'threshold must be in (0, 1), got {threshold}')
        self.threshold = threshold
        self.seg_logits_type = seg_logits_type
        self.pr_thresholds = tuple(float(t) for t in pr_thresholds)
        self.ignore_index = ignore_index
        self.group_by = group_by
        self.out_file = out_file

    def _prediction(self, sample: Any) -> torch.Tensor:
        if self.threshold is None:
            pred = _pixel_data(sample, 'pred_sem_seg')
            if pred is None:
                raise KeyError('ReferSegMetric needs pred_sem_seg in each '
                               'data sample (or set threshold= to use '
                               'seg_logits)')
            return pred.squeeze(0) != 0
        score = _pixel_data(sample, 'seg_logits')
        if score is None:
            raise KeyError('ReferSegMetric(threshold=...) needs seg_logits '
                           'in each data sample')
        if score.dim() == 3 and score.shape[0] != 1:
            raise ValueError('ReferSegMetric expects one-channel seg_logits '
                             f'(1 x H x W), got {tuple(score.shape)}')
        score = score.squeeze(0).float()
        if self.seg_logits_type == 'logits':
            score = score.sigmoid()
        return score > self.threshold

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Store (I, U, ids) of every expression of the batch."""
        for sample in data_samples:
            gt = _pixel_data(sample, 'gt_sem_seg')
            if gt is None:
                raise KeyError('ReferSegMetric needs gt_sem_seg in each data '
                               'sample (load the mask in the test pipeline)')
            gt = gt.squeeze(0)
            pred = self._prediction(sample).to(gt.device)
            if pred.shape != gt.shape:
                raise ValueError(
                    f'prediction {tuple(pred.shape)} and ground truth '
                    f'{tuple(gt.shape)} differ in size for '
                    f'{_field(sample, "img_path")}: both must be at the '
                    'original image size (resize logits to ori_shape; load '
                    'the mask after the resize in the test pipeline)')
            valid = gt != self.ignore_index
            target = (gt != 0) & valid
            pred = pred & valid
            record = dict(
                I=int((pred & target).sum()),
                U=int((pred | target).sum()),
                ref_id=_plain(_field(sample, 'ref_id')),
                sent_id=_plain(_field(sample, 'sent_id')))
            if self.group_by is not None:
                group = _field(sample, self.group_by)
                record['group'] = 'none' if group is None else str(group)
            self.results.append(record)

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        """Aggregate the gathered records (rank 0 only)."""
        if not results:
            print_log('ReferSegMetric got no results', logger='current',
                      level=30)
        inter = [r['I'] for r in results]
        union = [r['U'] for r in results]
        metrics = refer_scores(inter, union, self.pr_thresholds)
        if self.group_by is not None:
            groups: Dict[str, List[dict]] = defaultdict(list)
            for r in results:
                groups[r['group']].append(r)
            for name in sorted(groups):
                sub = refer_scores([r['I'] for r in groups[name]],
                                   [r['U'] for r in groups[name]], ())
                metrics[f'mIoU_{name}'] = sub['mIoU']
                metrics[f'oIoU_{name}'] = sub['oIoU']
        if self.out_file is not None:
            self._dump(results)
        return metrics

    def _dump(self, results: List[dict]) -> None:
        records = []
        for r in results:
            rec = dict(ref_id=r['ref_id'], sent_id=r['sent_id'],
                       iou=r['I'] / r['U'] if r['U'] > 0 else 0.0,
                       I=r['I'], U=r['U'])
            if 'group' in r:
                rec['group'] = r['group']
            records.append(rec)
        folder = osp.dirname(osp.abspath(self.out_file))
        os.makedirs(folder, exist_ok=True)
        with open(self.out_file, 'w', encoding='utf-8') as f:
            json.dump(records, f)
        print_log(f'per-expression results written to {self.out_file}',
                  logger='current')
