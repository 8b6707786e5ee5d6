"""The no-target option of the referring heads (ReferHead, SegVLM's
ReferHead with refine blocks, CRISHead): off it changes nothing; on it adds
``loss_no_target`` (checked against an independent BCE), its gradients
reach the scorer, and training moves the score toward the flag."""
import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import PixelData

from mmseg.structures import SegDataSample
from mmseg_sera.evaluation.refer_metric import (GT_NO_TARGET_KEY,
                                                PRED_NO_TARGET_KEY)
from mmseg_sera.models.heads import CRISHead, ReferHead
from mmseg_sera.models.heads import no_target as nt
from mmseg_sera.models.structures import TextFeatures

D, C, CT, CP, L = 16, 8, 12, 10, 6
NT_CFG = dict(hidden_channels=8, loss_weight=1.0)


def _text(batch: int, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, 4:] = True
    return TextFeatures(tokens=torch.randn(batch, L, CT, generator=g),
                        mask=mask,
                        pooled=torch.randn(batch, CP, generator=g))


HEADS = {
    'refer': (ReferHead, dict(num_decoder_layers=1, decoder_heads=2,
                              coord_conv=True)),
    'segvlm': (ReferHead, dict(num_decoder_layers=0, refine_cfg=dict(
        num_blocks=1, text_cond=True, text_channels=4, se_ratio=4,
        se_text_cond=True), refine_at=('neck', 'up'))),
    'cris': (CRISHead, dict(num_decoder_layers=1, decoder_heads=2,
                            decoder_ffn_channels=16, up_channels=[8, 8])),
}


def _head(kind: str, **kwargs):
    cls, cfg = HEADS[kind]
    torch.manual_seed(0)
    return cls(in_channels=D, channels=C, text_dims=CT, pooled_dims=CP,
               **cfg, **kwargs)


def _samples(labels: torch.Tensor, flags=None) -> list:
    """labels: B x H x W -> SegDataSamples with gt_sem_seg and, where
    ``flags[b]`` is not None, metainfo no_target."""
    out = []
    for b, lab in enumerate(labels):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        if flags is not None and flags[b] is not None:
            s.set_metainfo({GT_NO_TARGET_KEY: flags[b]})
        out.append(s)
    return out


def _batch(seed: int = 0):
    """Two samples: the first names nothing (empty mask, flag set), the
    second one object."""
    g = torch.Generator().manual_seed(seed)
    feats = (torch.randn(2, D, 4, 5, generator=g), )
    labels = torch.zeros(2, 16, 20, dtype=torch.long)
    labels[1, 4:10, 6:14] = 1
    return feats, _text(2, seed), _samples(labels, [True, False])


def test_keys_match_the_metric():
    assert nt.NO_TARGET_KEY == GT_NO_TARGET_KEY
    assert nt.PRED_NO_TARGET_KEY == PRED_NO_TARGET_KEY


@pytest.mark.parametrize('kind', sorted(HEADS))
def test_off_changes_nothing(kind):
    """Same seed: the head with the option has the parameters of the head
    without it, plus ``no_target.*``, and gives the same logits and mask
    losses; without it no scorer exists and no new loss appears."""
    off, on = _head(kind), _head(kind, no_target_cfg=NT_CFG)
    assert off.no_target is None and not off.predicts_no_target
    assert on.predicts_no_target
    sd_off, sd_on = off.state_dict(), on.state_dict()
    extra = set(sd_on) - set(sd_off)
    assert set(sd_off) <= set(sd_on)
    assert extra and all(k.startswith('no_target.') for k in extra)
    for k, v in sd_off.items():
        assert torch.equal(v, sd_on[k]), k
    feats, text, samples = _batch()
    off.eval(), on.eval()
    with torch.no_grad():
        torch.testing.assert_close(off(feats, text), on(feats, text),
                                   rtol=0, atol=0)
        logits, score = off.forward_with_no_target(feats, text)
        assert score is None
        torch.testing.assert_close(logits, off(feats, text), rtol=0, atol=0)
    loss_off = off.loss(feats, text, samples, None)
    loss_on = on.loss(feats, text, samples, None)
    assert set(loss_on) - set(loss_off) == {'loss_no_target',
                                            'acc_no_target'}
    for k, v in loss_off.items():
        torch.testing.assert_close(v, loss_on[k], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='no_target_cfg is None'):
        off.no_target_threshold


@pytest.mark.parametrize('kind', sorted(HEADS))
def test_loss_is_weighted_bce_and_reaches_the_scorer(kind):
    # eval mode: no dropout, so the two passes see the same score
    head = _head(kind, no_target_cfg=dict(NT_CFG, loss_weight=0.5)).eval()
    feats, text, samples = _batch()
    losses = head.loss(feats, text, samples, None)
    with torch.no_grad():
        _, score = head.forward_with_no_target(feats, text)
    assert score.shape == (2, )
    # independent BCE: -[y log s(x) + (1 - y) log(1 - s(x))], y = (1, 0)
    want = -(F.logsigmoid(score[0]) + F.logsigmoid(-score[1])) / 2
    torch.testing.assert_close(losses['loss_no_target'], 0.5 * want)
    acc = 50.0 * (float(score[0] > 0) + float(score[1] <= 0))
    assert float(losses['acc_no_target']) == acc
    assert not losses['acc_no_target'].requires_grad
    head.zero_grad()
    losses['loss_no_target'].backward()
    for name, p in head.no_target.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_labels_from_flag_else_from_an_empty_mask():
    labels = torch.zeros(4, 1, 3, 3, dtype=torch.long)
    labels[1, 0, 1, 1] = 1
    labels[3, 0, 0, 0] = 1
    labels[2, 0, 0, :] = 255  # ignored pixels are no object
    samples = _samples(labels[:, 0], [None, None, None, False])
    got = nt.no_target_labels(samples, labels)
    assert got.tolist() == [1.0, 0.0, 1.0, 0.0]
    # the flag wins over the mask (a crop may cut a target out of view)
    samples = _samples(labels[:, 0], [False, True, None, None])
    assert nt.no_target_labels(samples, labels).tolist() == [0., 1., 1., 0.]


@pytest.mark.parametrize('kind', sorted(HEADS))
def test_training_moves_the_score_toward_the_flag(kind):
    """A few Adam steps on the head's total loss: the no-target
    probability of the flagged sample rises, the other's falls."""
    head = _head(kind, no_target_cfg=NT_CFG)
    feats, text, samples = _batch(seed=1)

    def probs():
        head.eval()
        with torch.no_grad():
            return head.forward_with_no_target(feats, text)[1].sigmoid()

    before = probs()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(5):
        head.train()
        losses = head.loss(feats, text, samples, None)
        total = sum(v for k, v in losses.items() if k.startswith('loss'))
        opt.zero_grad()
        total.backward()
        opt.step()
    after = probs()
    assert after[0] > before[0] + 0.05
    assert after[1] < before[1] - 0.05
    assert after[0] > 0.5 > after[1]


@pytest.mark.parametrize('cfg,match', [
    (dict(hidden=3), "unknown keys \\['hidden'\\]"),
    (dict(threshold=1.0), 'threshold must lie in'),
    (dict(loss_weight=-1), 'loss_weight must be >= 0'),
    (dict(hidden_channels=0), 'hidden_channels must be >= 1'),
    (dict(zero_mask=1), 'zero_mask must be a bool'),
])
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        _head('refer', no_target_cfg=cfg)
    assert nt.check_no_target_cfg(None, 'x') is None
    assert nt.check_no_target_cfg({}, 'x') == nt.NO_TARGET_DEFAULTS


def test_scorer_reads_max_and_mean():
    """The scorer's input: [GAP(V), GMP(V), s] through a LayerNorm."""
    torch.manual_seed(0)
    scorer = nt.NoTargetScorer(in_channels=3, text_dims=2,
                               hidden_channels=4)
    x, s = torch.randn(2, 3, 4, 5), torch.randn(2, 2)
    z = torch.cat([x.mean((2, 3)), x.flatten(2).max(2).values, s], 1)
    want = scorer.mlp(F.layer_norm(z, (8, ), scorer.norm.weight,
                                   scorer.norm.bias))[:, 0]
    torch.testing.assert_close(scorer(x, s), want)
