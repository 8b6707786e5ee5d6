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

__all__ = ['ReferSegMetric', 'refer_scores', 'gres_scores', 'PROTOCOLS',
           'PRED_NO_TARGET_KEY', 'GT_NO_TARGET_KEY']

DEFAULT_PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
#: Pr@ thresholds of the GRES protocol
GRES_PR_THRESHOLDS = (0.7, 0.8, 0.9)
#: ``'res'``: mIoU / oIoU / Pr@t; ``'gres'``: the GRES paper's gIoU, cIoU,
#: Pr@t, N-acc, T-acc; ``'gres-rela'`` / ``'gres-rela-fixed'``: the same as
#: the released ReLA evaluator computes them, first release / after its
#: accuracy fix (see :func:`gres_scores`)
PROTOCOLS = ('res', 'gres', 'gres-rela', 'gres-rela-fixed')
#: protocol -> ``definition`` of :func:`gres_scores`
_DEFINITIONS = {'gres': 'paper', 'gres-rela': 'rela',
                'gres-rela-fixed': 'rela-fixed'}
#: the data-sample field (metainfo or data field) where a model states
#: "the sentence names nothing": a bool, or a one-element tensor / array
PRED_NO_TARGET_KEY = 'pred_no_target'
#: the ground-truth flag packed by ``PackReferSegInputs`` (gRefCOCO)
GT_NO_TARGET_KEY = 'no_target'


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


def _ratio(num: float, den: float, scale: float = 100.0) -> float:
    """``scale * num / den``, and 0 where ``den`` = 0 (a defined value for
    an empty set instead of a division by zero)."""
    return float(scale * num / den) if den > 0 else 0.0


def gres_scores(intersections: Sequence[float], unions: Sequence[float],
                gt_areas: Sequence[float], gt_no_target: Sequence[bool],
                pred_no_target: Sequence[bool],
                pr_thresholds: Sequence[float] = GRES_PR_THRESHOLDS,
                definition: str = 'paper') -> Dict[str, float]:
    """Generalized referring-segmentation scores (GRES, CVPR 2023).

    Per sample k: I_k = |P_k & G_k|, U_k = |P_k | G_k| of the predicted mask
    P_k as it is and the ground truth G_k, A_k = |G_k|, the ground-truth
    flag n_k (the sentence names nothing) and the predicted flag p_k.
    Outcomes of the no-target decision: TP = n & p, FN = n & ~p,
    FP = ~n & p, TN = ~n & ~p.

    ``definition='paper'`` (the paper's, and gRefCOCO's own evaluator): a
    "no target" answer is an empty mask, so::

        I'_k = 0 if p_k else I_k;  U'_k = A_k if p_k else U_k
        IoU_k = 1 (TP), 0 (FN), I'_k / U'_k (n_k false; 0 where U'_k = 0)
        gIoU  = 100 * mean_k IoU_k                    (all samples)
        cIoU  = 100 * sum_k I'_k / sum_k U'_k
        Pr@t  = 100 * #{k : ~n_k, IoU_k > t} / #{k : ~n_k}
        N-acc = 100 * TP / (TP + FN);  T-acc = 100 * TN / (TN + FP)

    ``definition='rela'`` (the ReLA evaluator as first released,
    github.com/henghuiding/ReLA at a389648, its quirks kept): a "no
    target" answer keeps the predicted mask's union on a target sample
    (I'_k = 0 but U'_k = U_k, FP) and adds nothing on a no-target sample
    (U'_k = 0, TP); ``Pr@t`` counts IoU_k >= t; the accuracies are
    fractions in [0, 1] with +1 smoothing, and its ``T_acc`` is the
    precision of the no-target calls, not the paper's T-acc::

        N_acc = TP / (TP + FN + 1);  T_acc = TP / (TP + FP + 1)
        (both 0 when the set has no no-target sample)

    ``definition='rela-fixed'`` (ReLA since its commit 884ef17, "fix eval
    metrics"): as ``'rela'``, but the accuracies are the paper's ratios,
    still fractions and still 0 without a no-target sample::

        N_acc = TP / (TP + FN);  T_acc = TN / (TN + FP)

    Where the release divides by zero (sum U' = 0, no target sample) and
    where the paper's ratios are empty (no no-target sample for N-acc, no
    target sample for T-acc), the value is 0.

    On a set without no-target samples, with p_k = "P_k is empty", gIoU
    and cIoU equal :func:`refer_scores`' mIoU and oIoU (then U'_k = U_k).

    Returns:
        dict: ``gIoU``, ``cIoU``, ``Pr@<t>`` and ``N-acc``, ``T-acc``
        (paper) or ``N_acc``, ``T_acc`` (rela, rela-fixed: fractions).
    """
    if definition not in ('paper', 'rela', 'rela-fixed'):
        raise ValueError("definition must be 'paper', 'rela' or "
                         f"'rela-fixed', got {definition!r}")
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    area = np.asarray(gt_areas, dtype=np.float64)
    n_flag = np.asarray(gt_no_target, dtype=bool).reshape(-1)
    p_flag = np.asarray(pred_no_target, dtype=bool).reshape(-1)
    tp, fn = n_flag & p_flag, n_flag & ~p_flag
    fp, tn = ~n_flag & p_flag, ~n_flag & ~p_flag
    inter_eff = np.where(p_flag | n_flag, 0.0, inter)
    if definition == 'paper':
        union_eff = np.where(p_flag, area, union)
    else:
        union_eff = union.copy()
    union_eff[tp] = 0.0
    iou = np.divide(inter_eff, union_eff, out=np.zeros_like(inter),
                    where=union_eff > 0)
    iou[tp] = 1.0
    iou[fn] = 0.0
    target_iou = iou[~n_flag]
    out = {
        'gIoU': _ratio(iou.sum(), iou.size),
        'cIoU': _ratio(inter_eff.sum(), union_eff.sum()),
    }
    for t in pr_thresholds:
        hit = target_iou > t if definition == 'paper' else target_iou >= t
        out[f'Pr@{t:g}'] = _ratio(hit.sum(), target_iou.size)
    n_tp, n_fn = int(tp.sum()), int(fn.sum())
    n_fp, n_tn = int(fp.sum()), int(tn.sum())
    if definition == 'paper':
        out['N-acc'] = _ratio(n_tp, n_tp + n_fn)
        out['T-acc'] = _ratio(n_tn, n_tn + n_fp)
    elif n_tp + n_fn == 0:
        out['N_acc'] = out['T_acc'] = 0.0
    elif definition == 'rela':
        out['N_acc'] = n_tp / (n_tp + n_fn + 1)
        out['T_acc'] = n_tp / (n_tp + n_fp + 1)
    else:
        out['N_acc'] = _ratio(n_tp, n_tp + n_fn, 1.0)
        out['T_acc'] = _ratio(n_tn, n_tn + n_fp, 1.0)
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


def _flag(value: Any, key: str) -> bool:
    """A no-target flag as a bool: bool / int / one-element array or
    tensor."""
    if isinstance(value, (bool, int, np.bool_, np.integer)):
        return bool(value)
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) \
        else np.asarray(value)
    if arr.size != 1:
        raise ValueError(f'{key} must be one bool per sample, got shape '
                         f'{tuple(arr.shape)}')
    return bool(arr.reshape(-1)[0])


@METRICS.register_module()
class ReferSegMetric(BaseMetric):
    """Per-expression IoU of a binary referring mask, aggregated as
    ``mIoU``, ``oIoU`` and ``Pr@0.5 ... Pr@0.9`` (percent, see
    :func:`refer_scores`), and, with ``protocol='gres'`` or
    ``'gres-rela'``, the generalized scores ``gIoU``, ``cIoU``,
    ``Pr@0.7 ... Pr@0.9``, N-acc and T-acc of :func:`gres_scores` (sentences
    that name several objects or none, gRefCOCO).

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
    - metainfo ``no_target`` (bool, optional): the ground-truth "the
      sentence names nothing" (``GRefCocoDataset``); absent, a sample is a
      no-target one when its ground-truth mask is empty.
    - ``pred_no_target`` (optional; :data:`PRED_NO_TARGET_KEY`): the
      model's "nothing is named", a bool (or a one-element tensor) that a
      head with a no-target output sets with
      ``data_sample.set_metainfo(dict(pred_no_target=flag))`` (or as a
      field of that name).  Absent, the prediction is "no target" when
      the predicted mask is empty.

    Per expression the metric keeps only (I, U, |G|, the two flags, ids),
    so distributed evaluation gathers small records through
    :class:`BaseMetric`.

    Protocols (``protocol``):

    - ``'res'`` (default): ``mIoU``, ``oIoU``, ``Pr@t`` (strict, over all
      samples), exactly as before the GRES scores existed.
    - ``'gres'``: the GRES paper's definitions (:func:`gres_scores`,
      ``definition='paper'``): ``gIoU``, ``cIoU``, ``Pr@t`` (target
      samples, strict), ``N-acc``, ``T-acc`` in percent; ``mIoU`` and
      ``oIoU`` of the masks alone are kept beside them.
    - ``'gres-rela'``: as the released ReLA code computes them
      (``definition='rela'``): ``Pr@t`` with ``>=``, the union of the
      actual prediction kept for a wrong "no target", and ``N_acc``,
      ``T_acc`` as fractions with +1 smoothing (``T_acc`` is the precision
      of the no-target calls), as first released.
    - ``'gres-rela-fixed'``: as ``'gres-rela'`` but ``N_acc``, ``T_acc``
      are the paper's ratios (as fractions), as ReLA computes them since
      its "fix eval metrics" commit.

    Say which protocol a table uses.

    On a set without no-target samples (and without a model flag) gIoU and
    cIoU equal mIoU and oIoU.

    Args:
        threshold (float, optional): re-threshold ``seg_logits``; None uses
            ``pred_sem_seg``. Default: None.
        seg_logits_type (str): ``'probs'`` or ``'logits'``. Default:
            ``'probs'``.
        pr_thresholds (Sequence[float], optional): IoU thresholds of
            ``Pr@t``. Default: 0.5 ... 0.9 (``'res'``), 0.7, 0.8, 0.9
            (GRES protocols).
        ignore_index (int): ground-truth value excluded from I and U.
            Default: 255.
        group_by (str, optional): metainfo key; adds ``mIoU_<value>`` and
            ``oIoU_<value>`` per value (samples without it go to
            ``'none'``), and with a GRES protocol also ``gIoU_``,
            ``cIoU_``, ``N-acc_``, ``T-acc_`` (``N_acc_``, ``T_acc_``)
            per value. Default: None.
        protocol (str): ``'res'``, ``'gres'``, ``'gres-rela'`` or
            ``'gres-rela-fixed'`` (see above). Default: ``'res'``.
        out_file (str, optional): JSON file for the per-expression records
            ``{ref_id, sent_id, iou, I, U, no_target, pred_no_target
            [, group]}`` (``iou`` = I / U of the masks), written on rank 0.
        collect_device (str): ``'cpu'`` or ``'gpu'``. Default: ``'cpu'``.
        prefix (str, optional): metric name prefix.
    """

    default_prefix: Optional[str] = None

    def __init__(self,
                 threshold: Optional[float] = None,
                 seg_logits_type: str = 'probs',
                 pr_thresholds: Optional[Sequence[float]] = None,
                 ignore_index: int = 255,
                 group_by: Optional[str] = None,
                 protocol: str = 'res',
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
        if protocol not in PROTOCOLS:
            raise ValueError(
                f'protocol must be one of {PROTOCOLS}, got {protocol!r}')
        if pr_thresholds is None:
            pr_thresholds = (DEFAULT_PR_THRESHOLDS if protocol == 'res' else
                             GRES_PR_THRESHOLDS)
        self.threshold = threshold
        self.seg_logits_type = seg_logits_type
        self.protocol = protocol
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
            area = int(target.sum())
            gt_nt = _field(sample, GT_NO_TARGET_KEY)
            gt_nt = area == 0 if gt_nt is None else _flag(
                gt_nt, GT_NO_TARGET_KEY)
            if gt_nt and area > 0:
                raise ValueError(
                    f'sample ref_id={_field(sample, "ref_id")} of '
                    f'{_field(sample, "img_path")} is flagged no_target but '
                    f'its ground-truth mask has {area} pixels')
            pred_nt = _field(sample, PRED_NO_TARGET_KEY)
            pred_nt = not bool(pred.any()) if pred_nt is None else _flag(
                pred_nt, PRED_NO_TARGET_KEY)
            record = dict(
                I=int((pred & target).sum()),
                U=int((pred | target).sum()),
                G=area,
                no_target=bool(gt_nt),
                pred_no_target=bool(pred_nt),
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
        metrics = self._scores(results, self.pr_thresholds)
        if self.group_by is not None:
            groups: Dict[str, List[dict]] = defaultdict(list)
            for r in results:
                groups[r['group']].append(r)
            for name in sorted(groups):
                sub = self._scores(groups[name], ())
                for key, value in sub.items():
                    metrics[f'{key}_{name}'] = value
        if self.out_file is not None:
            self._dump(results)
        return metrics

    def _scores(self, results: List[dict],
                pr_thresholds: Sequence[float]) -> Dict[str, float]:
        """The protocol's scores of some records (``Pr@t`` only for the
        given thresholds: none per group)."""
        inter = [r['I'] for r in results]
        union = [r['U'] for r in results]
        if self.protocol == 'res':
            return refer_scores(inter, union, pr_thresholds)
        plain = refer_scores(inter, union, ())
        out = gres_scores(
            inter, union, [r['G'] for r in results],
            [r['no_target'] for r in results],
            [r['pred_no_target'] for r in results], pr_thresholds,
            definition=_DEFINITIONS[self.protocol])
        out.update(mIoU=plain['mIoU'], oIoU=plain['oIoU'])
        return out

    def _dump(self, results: List[dict]) -> None:
        records = []
        for r in results:
            rec = dict(ref_id=r['ref_id'], sent_id=r['sent_id'],
                       iou=r['I'] / r['U'] if r['U'] > 0 else 0.0,
                       I=r['I'], U=r['U'], no_target=r['no_target'],
                       pred_no_target=r['pred_no_target'])
            if 'group' in r:
                rec['group'] = r['group']
            records.append(rec)
        folder = osp.dirname(osp.abspath(self.out_file))
        os.makedirs(folder, exist_ok=True)
        with open(self.out_file, 'w', encoding='utf-8') as f:
            json.dump(records, f)
        print_log(f'per-expression results written to {self.out_file}',
                  logger='current')
