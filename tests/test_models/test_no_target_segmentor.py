"""ReferringEncoderDecoder with a no-target head (the tiny SERA config with
``decode_head.no_target_cfg``): the loss term, ``pred_no_target`` /
``no_target_score`` on the predictions with the mask zeroed, tensor mode
unchanged, and the flags scored by ReferSegMetric end to end (test_step on
the generalized synthetic set)."""
import json

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.runner import Runner

from mmseg.registry import MODELS
from mmseg_sera.datasets.synthetic_gres import generate_grefer_set
from mmseg_sera.evaluation import ReferSegMetric
from tests.conftest import REPO, TINY_CONFIG
from tests.test_models.test_segmentor import make_batch

NT_CFG = dict(hidden_channels=16, loss_weight=1.0, threshold=0.5)
TEXTS = ('the red circle', 'the purple star', 'all blue shapes')
ORI = ((112, 112), (90, 140), (120, 80))


def _build(no_target_cfg=None):
    model_cfg = Config.fromfile(TINY_CONFIG).model.to_dict()
    if no_target_cfg is not None:
        model_cfg['decode_head']['no_target_cfg'] = no_target_cfg
    init_default_scope('mmseg')
    torch.manual_seed(0)
    return MODELS.build(model_cfg)


def _set_bias(model, value: float) -> None:
    """Make every sample's no-target logit about ``value``."""
    last = model.decode_head.no_target.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


@pytest.fixture(scope='module')
def models():
    return _build(), _build(NT_CFG)


def test_loss_has_no_target_term():
    model = _build(NT_CFG).train()  # its own: training moves BN statistics
    batch = make_batch(TEXTS, ORI, seed=1)
    flags = [False, True, False]
    for s, flag in zip(batch['data_samples'], flags):
        s.set_metainfo(dict(no_target=flag))
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    assert {'loss_mask', 'loss_dice', 'loss_no_target', 'acc_no_target',
            'loss_moe_z'} <= set(losses)
    model.zero_grad()
    losses['loss_no_target'].backward()
    for name, p in model.decode_head.no_target.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the BCE reaches the shared layers too (the decoder under the scorer)
    assert model.decode_head.decoder.norm.weight.grad is not None


@pytest.mark.parametrize('bias', [20.0, -20.0])
def test_predict_sets_the_flag_and_zeroes_the_mask(models, bias):
    off, on = models
    off.eval(), on.eval()
    _set_bias(on, bias)
    batch = make_batch(TEXTS, ORI, seed=2)
    with torch.no_grad():
        data = on.data_preprocessor(batch, False)
        got = on(**data, mode='predict')
        data = off.data_preprocessor(make_batch(TEXTS, ORI, seed=2), False)
        ref = off(**data, mode='predict')
        # tensor mode: the mask logits, as without the option
        torch.testing.assert_close(on(**data, mode='tensor'),
                                   off(**data, mode='tensor'), rtol=0,
                                   atol=0)
    assert any(r.pred_sem_seg.data.any() for r in ref)
    for g, r in zip(got, ref):
        assert 'pred_no_target' not in r.metainfo
        assert isinstance(g.pred_no_target, bool)
        assert g.pred_no_target == (bias > 0)
        assert g.no_target_score == pytest.approx(
            float(torch.sigmoid(torch.tensor(bias))), abs=1e-6)
        # the mask probabilities stay; the mask goes with "no target"
        torch.testing.assert_close(g.seg_logits.data, r.seg_logits.data,
                                   rtol=0, atol=0)
        if bias > 0:
            assert g.pred_sem_seg.data.shape == r.pred_sem_seg.data.shape
            assert not g.pred_sem_seg.data.any()
        else:
            assert torch.equal(g.pred_sem_seg.data, r.pred_sem_seg.data)


def test_zero_mask_off_keeps_the_mask_as_rela(models):
    """``no_target_cfg.zero_mask=False``: the flag is set but the mask
    stays what the mask head drew (ReLA's behaviour)."""
    off, _ = models
    keep = _build(dict(NT_CFG, zero_mask=False)).eval()
    _set_bias(keep, 20.0)
    off.eval()
    with torch.no_grad():
        got = keep(**keep.data_preprocessor(make_batch(TEXTS, ORI, seed=2),
                                            False), mode='predict')
        ref = off(**off.data_preprocessor(make_batch(TEXTS, ORI, seed=2),
                                          False), mode='predict')
    assert any(r.pred_sem_seg.data.any() for r in ref)
    for g, r in zip(got, ref):
        assert g.pred_no_target is True
        assert torch.equal(g.pred_sem_seg.data, r.pred_sem_seg.data)


def test_flags_scored_by_the_metric_end_to_end(models, tmp_path):
    """test_step on the generalized synthetic set, then ReferSegMetric
    (paper definitions): every sample called "no target" gives IoU 1 on
    the no-target sentences and 0 on the others (gIoU = their share,
    N-acc 100, T-acc 0, cIoU 0); none called gives N-acc 0, T-acc 100 and
    the masks' IoU on the target sentences."""
    _, model = models
    model.eval()
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
    flags = np.array([s.no_target for s in batch['data_samples']])
    assert flags.any() and not flags.all()

    def scores(bias, out_file=None):
        _set_bias(model, bias)
        with torch.no_grad():
            outputs = model.test_step(batch)
        metric = ReferSegMetric(protocol='gres', out_file=out_file)
        metric.process({}, [o.to_dict() for o in outputs])
        return metric.compute_metrics(metric.results), outputs

    out_file = str(tmp_path / 'per_expression.json')
    got, outputs = scores(20.0, out_file)
    assert all(o.pred_no_target for o in outputs)
    assert got['gIoU'] == pytest.approx(100.0 * flags.mean())
    assert got['N-acc'] == 100.0 and got['T-acc'] == 0.0
    assert got['cIoU'] == 0.0
    with open(out_file) as f:
        records = json.load(f)
    assert [r['pred_no_target'] for r in records] == [True] * len(flags)
    assert [r['no_target'] for r in records] == flags.tolist()

    got, outputs = scores(-20.0)
    assert not any(o.pred_no_target for o in outputs)
    assert got['N-acc'] == 0.0 and got['T-acc'] == 100.0
    ious = []
    for o in outputs:
        pred = o.pred_sem_seg.data[0].bool()
        gt = o.gt_sem_seg.data[0] == 1
        union = int((pred | gt).sum())
        ious.append(0.0 if o.no_target or union == 0 else
                    int((pred & gt).sum()) / union)
    assert got['gIoU'] == pytest.approx(100.0 * np.mean(ious))


def test_a_res_checkpoint_loads_into_the_no_target_model(models):
    """Today's checkpoints stay usable: a model without the option loads
    into one with it (e.g. ``load_from`` to fine-tune on gRefCOCO) with
    only the scorer missing, and the no-target model's state dict minus the
    scorer loads strictly into a model without it."""
    off, on = models
    result = on.load_state_dict(off.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        k.startswith('decode_head.no_target.') for k in result.missing_keys)
    plain = {k: v for k, v in on.state_dict().items()
             if not k.startswith('decode_head.no_target.')}
    _build().load_state_dict(plain, strict=True)
