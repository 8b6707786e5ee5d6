"""ReferSegMetric's GRES protocols against an independent computation
written here with plain loops, from the definitions of the GRES paper and
of the released ReLA evaluator (quirks included), and the edge cases where
a ratio has an empty denominator."""
import json

import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.structures import PixelData

from mmseg.structures import SegDataSample
from mmseg_sera.evaluation import ReferSegMetric, gres_scores

_UNSET = object()


def _sample(pred, gt, no_target=_UNSET, pred_nt=_UNSET, as_field=False,
            **meta):
    s = SegDataSample()
    s.gt_sem_seg = PixelData(data=torch.as_tensor(np.asarray(gt))[None].long())
    s.pred_sem_seg = PixelData(
        data=torch.as_tensor(np.asarray(pred))[None].long())
    if no_target is not _UNSET:
        meta['no_target'] = no_target
    if pred_nt is not _UNSET:
        if as_field:
            s.set_field(torch.tensor([bool(pred_nt)]), 'pred_no_target')
        else:
            meta['pred_no_target'] = pred_nt
    s.set_metainfo(meta)
    return s


def _run(metric, samples, batch=3):
    evaluator = Evaluator(metric)
    for k in range(0, len(samples), batch):
        evaluator.process(samples[k:k + batch])
    return evaluator.evaluate(len(samples))


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.int64)
    m[y0:y1, x0:x1] = 1
    return m


def _gres_cases():
    """(pred, gt, gt_flag or None, pred_flag or None, kind) tuples."""
    rng = np.random.default_rng(3)
    z = np.zeros((6, 8), np.int64)
    g = _box(6, 8, 1, 4, 1, 5)                     # 12 pixels
    p_half = _box(6, 8, 1, 4, 3, 7)                # I 6, U 18
    ign = g.copy()
    ign[1, :] = 255                                 # row 1 left out
    return [
        # target samples
        (p_half, g, False, None, 'a'),              # TN, IoU 1/3
        (g, g, None, None, 'a'),                    # TN, IoU 1, no flags
        (z, g, None, None, 'b'),                    # empty pred -> "no target"
        (p_half, g, False, True, 'b'),              # FP with a mask left
        (g, g, False, True, 'a'),                   # FP, perfect mask
        (rng.integers(0, 2, (5, 7)), rng.integers(0, 2, (5, 7)) | _box(
            5, 7, 0, 1, 0, 1), None, False, 'b'),  # TN, random
        (p_half, ign, False, None, 'a'),            # ignored row
        (_box(1, 10, 0, 1, 0, 7), _box(1, 10, 0, 1, 0, 10), False, False,
         'b'),                                      # IoU exactly 0.7
        (_box(1, 10, 0, 1, 0, 8), _box(1, 10, 0, 1, 0, 10), None, None,
         'a'),                                      # IoU exactly 0.8
        # no-target samples
        (z, z, True, None, 'nt'),                   # TP by empty mask
        (p_half, z, True, True, 'nt'),              # TP, mask not zeroed
        (p_half, z, True, None, 'nt'),              # FN (mask not empty)
        (g, z, None, False, 'nt'),                  # FN, flag from the model
    ]


def _independent(cases, definition, thresholds=(0.7, 0.8, 0.9)):
    """Plain loops over pixels and samples, from the written definitions."""
    tp = fn = fp = tn = 0
    ious, is_target = [], []
    sum_i = sum_u = 0
    for pred, gt, gt_flag, pred_flag, _ in cases:
        i = u = area = 0
        any_pred = False
        for pv, gv in zip(np.asarray(pred).ravel(), np.asarray(gt).ravel()):
            if gv == 255:
                continue
            a, b = bool(pv), gv == 1
            i += a and b
            u += a or b
            area += b
            any_pred = any_pred or a
        n = (area == 0) if gt_flag is None else gt_flag
        p = (not any_pred) if pred_flag is None else pred_flag
        if n:
            is_target.append(False)
            if p:
                tp += 1
                ious.append(1.0)
            else:
                fn += 1
                ious.append(0.0)
                sum_u += u
        else:
            is_target.append(True)
            if p:
                fp += 1
                ii = 0
                uu = area if definition == 'paper' else u
            else:
                tn += 1
                ii, uu = i, u
            ious.append(ii / uu if uu else 0.0)
            sum_i += ii
            sum_u += uu
    out = {'gIoU': 100.0 * sum(ious) / len(ious),
           'cIoU': 100.0 * sum_i / sum_u if sum_u else 0.0}
    targets = [v for v, t in zip(ious, is_target) if t]
    for t in thresholds:
        if definition == 'paper':
            hits = sum(1 for v in targets if v > t)
        else:
            hits = sum(1 for v in targets if v >= t)
        out[f'Pr@{t}'] = 100.0 * hits / len(targets) if targets else 0.0
    if definition == 'paper':
        out['N-acc'] = 100.0 * tp / (tp + fn) if tp + fn else 0.0
        out['T-acc'] = 100.0 * tn / (tn + fp) if tn + fp else 0.0
    elif not tp + fn:
        out['N_acc'] = out['T_acc'] = 0.0
    elif definition == 'rela':      # first release: +1, T_acc = precision
        out['N_acc'] = tp / (tp + fn + 1)
        out['T_acc'] = tp / (tp + fp + 1)
    else:                           # after ReLA's "fix eval metrics"
        out['N_acc'] = tp / (tp + fn)
        out['T_acc'] = tn / (tn + fp) if tn + fp else 0.0
    return out, ious


def _samples(cases):
    out = []
    for k, (pred, gt, gt_flag, pred_flag, kind) in enumerate(cases):
        kw = dict(ref_id=k, sent_id=100 + k, kind=kind)
        if gt_flag is not None:
            kw['no_target'] = gt_flag
        if pred_flag is not None:
            kw['pred_nt'] = pred_flag
            kw['as_field'] = k % 2 == 1   # both ways a head may set it
        out.append(_sample(pred, gt, **kw))
    return out


@pytest.mark.parametrize('protocol,definition',
                         [('gres', 'paper'), ('gres-rela', 'rela'),
                          ('gres-rela-fixed', 'rela-fixed')])
def test_matches_independent_loops(protocol, definition):
    cases = _gres_cases()
    got = _run(ReferSegMetric(protocol=protocol), _samples(cases))
    want, ious = _independent(cases, definition)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert set(got) == set(want) | {'mIoU', 'oIoU'}
    # the cases do exercise the quirks
    assert ious[7] == pytest.approx(0.7) and ious[8] == pytest.approx(0.8)
    paper, _ = _independent(cases, 'paper')
    rela, _ = _independent(cases, 'rela')
    assert paper['Pr@0.7'] != rela['Pr@0.7']        # > against >=
    assert paper['cIoU'] != rela['cIoU']            # U of an FP
    assert rela['T_acc'] == pytest.approx(2 / (2 + 3 + 1))  # precision
    assert paper['T-acc'] == pytest.approx(100 * 6 / 9)
    assert paper['N-acc'] == pytest.approx(50.0)
    assert rela['N_acc'] == pytest.approx(2 / 5)
    fixed, _ = _independent(cases, 'rela-fixed')
    assert fixed['N_acc'] == pytest.approx(paper['N-acc'] / 100)
    assert fixed['T_acc'] == pytest.approx(paper['T-acc'] / 100)
    assert fixed['cIoU'] == rela['cIoU'] and fixed['Pr@0.7'] == rela[
        'Pr@0.7']


def test_per_kind_scores():
    cases = _gres_cases()
    got = _run(ReferSegMetric(protocol='gres', group_by='kind'),
               _samples(cases))
    for kind in ('a', 'b', 'nt'):
        sub = [c for c in cases if c[4] == kind]
        want, _ = _independent(sub, 'paper', thresholds=())
        for key in ('gIoU', 'cIoU', 'N-acc', 'T-acc'):
            assert got[f'{key}_{kind}'] == pytest.approx(want[key]), (kind,
                                                                      key)
    assert got['gIoU_nt'] == pytest.approx(50.0)
    assert 'Pr@0.7_nt' not in got
    rela = _run(ReferSegMetric(protocol='gres-rela', group_by='kind'),
                _samples(cases))
    assert rela['N_acc_nt'] == pytest.approx(2 / 5)
    assert rela['N_acc_a'] == 0.0   # no no-target sample in that kind


def _no_empty_cases():
    rng = np.random.default_rng(7)
    cases = []
    for h, w in [(7, 9), (12, 5), (4, 4), (6, 6), (3, 8)]:
        gt = rng.random((h, w)) > 0.5
        gt[0, 0] = True
        cases.append((rng.random((h, w)) > 0.5, gt))
    z = np.zeros((4, 4), bool)
    g = z.copy()
    g[1:3, 1:3] = True
    cases += [(z, g), (g, g)]     # an empty prediction, a perfect one
    return cases


@pytest.mark.parametrize('protocol',
                         ['gres', 'gres-rela', 'gres-rela-fixed'])
def test_equals_res_scores_without_empty_samples(protocol):
    cases = _no_empty_cases()
    samples = [_sample(p, gt) for p, gt in cases]
    res = _run(ReferSegMetric(), samples)
    gres = _run(ReferSegMetric(protocol=protocol), samples)
    assert gres['gIoU'] == pytest.approx(res['mIoU'], abs=1e-12)
    assert gres['cIoU'] == pytest.approx(res['oIoU'], abs=1e-12)
    assert gres['mIoU'] == res['mIoU'] and gres['oIoU'] == res['oIoU']
    assert 0 < res['mIoU'] < 100
    # the RES protocol's keys are unchanged
    assert set(res) == {'mIoU', 'oIoU', 'Pr@0.5', 'Pr@0.6', 'Pr@0.7',
                        'Pr@0.8', 'Pr@0.9'}


def test_empty_denominators_give_defined_values():
    z = np.zeros((3, 3), np.int64)
    g = _box(3, 3, 0, 2, 0, 2)
    # only no-target samples, all recognised: sum U' = 0, no target sample
    only_nt = [_sample(z, z, no_target=True), _sample(z, z)]
    for protocol in ('gres', 'gres-rela'):
        got = _run(ReferSegMetric(protocol=protocol), only_nt)
        assert got['gIoU'] == 100.0
        assert got['cIoU'] == 0.0 and got['Pr@0.7'] == 0.0
    paper = _run(ReferSegMetric(protocol='gres'), only_nt)
    assert paper['N-acc'] == 100.0 and paper['T-acc'] == 0.0
    rela = _run(ReferSegMetric(protocol='gres-rela'), only_nt)
    assert rela['N_acc'] == pytest.approx(2 / 3)
    assert rela['T_acc'] == pytest.approx(2 / 3)
    fixed = _run(ReferSegMetric(protocol='gres-rela-fixed'), only_nt)
    assert fixed['N_acc'] == 1.0 and fixed['T_acc'] == 0.0
    # only target samples: no N-acc denominator
    only_t = [_sample(g, g), _sample(z, g)]
    paper = _run(ReferSegMetric(protocol='gres'), only_t)
    assert paper['N-acc'] == 0.0 and paper['T-acc'] == 50.0
    assert paper['gIoU'] == 50.0
    for protocol in ('gres-rela', 'gres-rela-fixed'):
        rela = _run(ReferSegMetric(protocol=protocol), only_t)
        assert rela['N_acc'] == 0.0 and rela['T_acc'] == 0.0
    # nothing at all
    out = gres_scores([], [], [], [], [])
    assert out == {'gIoU': 0.0, 'cIoU': 0.0, 'Pr@0.7': 0.0, 'Pr@0.8': 0.0,
                   'Pr@0.9': 0.0, 'N-acc': 0.0, 'T-acc': 0.0}


def test_flags_and_errors(tmp_path):
    z = np.zeros((3, 3), np.int64)
    g = _box(3, 3, 0, 2, 0, 2)
    # a 0-d tensor in the metainfo works too
    s = _sample(g, z, no_target=True, pred_nt=torch.tensor(True))
    out_file = str(tmp_path / 'd.json')
    got = _run(ReferSegMetric(protocol='gres', out_file=out_file), [s])
    assert got['gIoU'] == 100.0 and got['N-acc'] == 100.0
    with open(out_file) as f:
        rec = json.load(f)[0]
    assert rec['no_target'] is True and rec['pred_no_target'] is True
    with pytest.raises(ValueError, match='one bool per sample'):
        _run(ReferSegMetric(protocol='gres'),
             [_sample(g, z, pred_nt=torch.ones(2))])
    with pytest.raises(ValueError, match='flagged no_target but'):
        _run(ReferSegMetric(protocol='gres'),
             [_sample(g, g, no_target=True, ref_id=4)])
    with pytest.raises(ValueError, match=r"protocol must be one of .*'res'"):
        ReferSegMetric(protocol='grES')
    with pytest.raises(ValueError, match='definition'):
        gres_scores([1], [1], [1], [False], [False], definition='release')


def test_a_models_predictions_and_flag_reach_the_metric(tmp_path):
    """The tiny SERA model's test_step keeps the packed no_target flag,
    and a pred_no_target that a head sets on its outputs is what the
    metric reads (here set by hand: no head predicts it yet)."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner

    from mmseg.registry import MODELS
    from mmseg_sera.datasets.synthetic_gres import generate_grefer_set
    from tests.conftest import REPO, TINY_CONFIG

    generate_grefer_set(str(tmp_path), num_images=6, img_size=112, seed=2,
                        progress=False)
    data_cfg = Config.fromfile(
        f'{REPO}/configs/_base_/datasets/synthetic_grefer.py')
    with DefaultScope.overwrite_default_scope('mmseg'):
        loader_cfg = data_cfg.val_dataloader.copy()
        loader_cfg.update(num_workers=0, persistent_workers=False,
                          batch_size=64)
        loader_cfg.dataset.update(data_root=str(tmp_path), split='train')
        batch = next(iter(Runner.build_dataloader(loader_cfg, seed=0)))
        torch.manual_seed(0)
        model = MODELS.build(Config.fromfile(TINY_CONFIG).model).eval()
        with torch.no_grad():
            outputs = model.test_step(batch)
    flags = [s.no_target for s in batch['data_samples']]
    assert [o.no_target for o in outputs] == flags
    assert any(flags) and not all(flags)
    cases = []
    for k, o in enumerate(outputs):
        pred_nt = k % 3 == 0
        o.set_metainfo(dict(pred_no_target=pred_nt))
        cases.append((o.pred_sem_seg.data[0].numpy(),
                      o.gt_sem_seg.data[0].numpy(), o.no_target, pred_nt,
                      o.kind))
    got = _run(ReferSegMetric(protocol='gres'), outputs, batch=8)
    want, _ = _independent(cases, 'paper')
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
