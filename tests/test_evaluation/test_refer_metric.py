import json
import os
import socket

import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.structures import PixelData

from mmseg.structures import SegDataSample
from mmseg_sera.evaluation import ReferSegMetric, refer_scores


def _sample(pred, gt, logits=None, **meta):
    s = SegDataSample()
    s.gt_sem_seg = PixelData(data=torch.as_tensor(gt)[None].long())
    s.pred_sem_seg = PixelData(data=torch.as_tensor(pred)[None].long())
    if logits is not None:
        s.seg_logits = PixelData(data=torch.as_tensor(logits)[None].float())
    s.set_metainfo(meta)
    return s


def _cases():
    """(pred, gt) pairs at different sizes: partial overlap, perfect, empty
    prediction, empty ground truth, both empty (empty union), IoU exactly
    0.5 (strict thresholds), and ignored pixels."""
    rng = np.random.default_rng(0)
    cases = []
    for h, w in [(7, 9), (12, 5), (4, 4)]:
        cases.append((rng.random((h, w)) > 0.5, rng.random((h, w)) > 0.4))
    g = np.zeros((6, 6), bool)
    g[1:4, 1:4] = True
    cases.append((g.copy(), g.copy()))                    # IoU 1
    cases.append((np.zeros_like(g), g.copy()))            # empty prediction
    cases.append((g.copy(), np.zeros_like(g)))            # empty gt
    cases.append((np.zeros_like(g), np.zeros_like(g)))    # empty union
    half_p, half_g = np.zeros((2, 2), bool), np.zeros((2, 2), bool)
    half_p[0, :] = True
    half_g[0, 0] = True
    cases.append((half_p, half_g))                        # IoU exactly 0.5
    p = np.zeros((3, 3), bool)
    p[:, :2] = True
    gi = np.zeros((3, 3), np.int64)
    gi[:, 1:] = 1
    gi[0, :] = 255                                        # ignored row
    cases.append((p, gi))
    return cases


def _independent(cases, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9)):
    """Plain per-pixel loops, nothing shared with the metric."""
    ious, inter_sum, union_sum = [], 0, 0
    for pred, gt in cases:
        i = u = 0
        for pv, gv in zip(np.asarray(pred).ravel(), np.asarray(gt).ravel()):
            if gv == 255:
                continue
            a, b = bool(pv), gv == 1
            i += a and b
            u += a or b
        inter_sum += i
        union_sum += u
        ious.append(i / u if u else 0.0)
    out = {'mIoU': 100 * sum(ious) / len(ious),
           'oIoU': 100 * inter_sum / union_sum}
    for t in thresholds:
        out[f'Pr@{t}'] = 100 * sum(v > t for v in ious) / len(ious)
    return out, ious


def _mmdet_refseg(cases):
    """MMDetection 3.x RefSegMetric's formulas (cIoU, mIoU; NaN -> 0)."""
    i_all = u_all = 0
    ious = []
    for pred, gt in cases:
        p = torch.as_tensor(pred).bool()
        g = torch.as_tensor(gt) == 1
        i, u = (p & g).sum(), (p | g).sum()
        ious.append(torch.nan_to_num(i / u, nan=0.0))
        i_all, u_all = i_all + i, u_all + u
    return dict(cIoU=float(i_all * 100 / u_all),
                mIoU=float(sum(ious) * 100 / len(ious)))


def _run(metric, samples, batch=3):
    evaluator = Evaluator(metric)
    for k in range(0, len(samples), batch):
        evaluator.process(samples[k:k + batch])
    return evaluator.evaluate(len(samples))


def test_matches_independent_computation():
    cases = _cases()
    samples = [_sample(p, g, ref_id=k, sent_id=10 + k)
               for k, (p, g) in enumerate(cases)]
    got = _run(ReferSegMetric(), samples)
    want, ious = _independent(cases)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert ious[6] == 0.0 and ious[7] == 0.5  # empty union; exact 0.5
    strict = sum(v > 0.5 for v in ious)
    assert sum(v >= 0.5 for v in ious) == strict + 1
    assert got['Pr@0.5'] == pytest.approx(100 * strict / len(cases))
    # MMDetection's RefSegMetric (no ignore label there: drop that case)
    plain = cases[:-1]
    mm = _mmdet_refseg(plain)
    ours = refer_scores(
        [(np.asarray(p) & (np.asarray(g) == 1)).sum() for p, g in plain],
        [(np.asarray(p) | (np.asarray(g) == 1)).sum() for p, g in plain])
    assert ours['oIoU'] == pytest.approx(mm['cIoU'])
    assert ours['mIoU'] == pytest.approx(mm['mIoU'])


def test_all_empty_and_no_results():
    z = np.zeros((3, 3), bool)
    got = _run(ReferSegMetric(), [_sample(z, z), _sample(z, z)])
    assert got['mIoU'] == 0.0 and got['oIoU'] == 0.0 and got['Pr@0.9'] == 0
    assert refer_scores([], [])['mIoU'] == 0.0


def test_threshold_on_seg_logits():
    gt = np.array([[1, 1, 0, 0]])
    logits = np.array([[3.0, -0.1, 0.2, -4.0]])  # sigmoid .95 .475 .55 .018
    wrong_pred = np.zeros_like(gt)
    s = [_sample(wrong_pred, gt, logits)]
    assert _run(ReferSegMetric(), s)['mIoU'] == 0.0  # uses pred_sem_seg
    # threshold 0.5: pred [1, 0, 1, 0] -> I 1, U 3
    assert _run(ReferSegMetric(threshold=0.5, seg_logits_type='logits'),
                s)['mIoU'] == \
        pytest.approx(100 / 3)
    # threshold 0.45: pred [1, 1, 1, 0] -> I 2, U 3
    assert _run(ReferSegMetric(threshold=0.45, seg_logits_type='logits'),
                s)['mIoU'] == \
        pytest.approx(200 / 3)
    probs = [_sample(wrong_pred, gt, 1 / (1 + np.exp(-logits)))]
    assert _run(ReferSegMetric(threshold=0.45),
                probs)['mIoU'] == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        ReferSegMetric(threshold=1.5)


def test_group_by_and_dump(tmp_path):
    cases = _cases()[:6]
    kinds = ['attribute', 'relation', 'attribute', 'position', 'relation',
             'attribute']
    samples = [_sample(p, g, ref_id=k, sent_id=100 + k, kind=kinds[k])
               for k, (p, g) in enumerate(cases)]
    out_file = str(tmp_path / 'sub' / 'per_expression.json')
    got = _run(ReferSegMetric(group_by='kind', out_file=out_file), samples)
    for kind in ('attribute', 'position', 'relation'):
        sub = [c for c, k in zip(cases, kinds) if k == kind]
        want, _ = _independent(sub)
        assert got[f'mIoU_{kind}'] == pytest.approx(want['mIoU'])
        assert got[f'oIoU_{kind}'] == pytest.approx(want['oIoU'])
    with open(out_file) as f:
        records = json.load(f)
    _, ious = _independent(cases)
    assert [(r['ref_id'], r['sent_id'], r['group']) for r in records] == [
        (k, 100 + k, kinds[k]) for k in range(6)]
    assert [r['iou'] for r in records] == pytest.approx(ious)


def test_size_mismatch_is_an_error():
    s = _sample(np.zeros((4, 4)), np.zeros((5, 5)), img_path='a.jpg')
    with pytest.raises(ValueError, match='original image size'):
        _run(ReferSegMetric(), [s])


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    cases = _cases()
    samples = [_sample(p, g, ref_id=k, sent_id=k)
               for k, (p, g) in enumerate(cases)]
    evaluator = Evaluator(ReferSegMetric(out_file=f'{out_dir}/dump.json'))
    # DefaultSampler order: rank r gets r, r + world, ...
    mine = samples[rank::world]
    for k in range(0, len(mine), 2):
        evaluator.process(mine[k:k + 2])
    metrics = evaluator.evaluate(len(samples))
    with open(f'{out_dir}/rank{rank}.json', 'w') as f:
        json.dump(metrics, f)
    dist.destroy_process_group()


def test_distributed_evaluation_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported modules (spawn re-imports
    # torch and mmseg, ~15 s)
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(tmp_path)),
                       nprocs=2, start_method='fork')
    single = _run(ReferSegMetric(), [
        _sample(p, g, ref_id=k, sent_id=k) for k, (p, g) in enumerate(_cases())
    ])
    for rank in (0, 1):
        with open(tmp_path / f'rank{rank}.json') as f:
            got = json.load(f)
        for key, value in single.items():
            assert got[key] == pytest.approx(value), (rank, key)
    with open(tmp_path / 'dump.json') as f:
        records = json.load(f)
    assert sorted(r['ref_id'] for r in records) == list(range(len(_cases())))
