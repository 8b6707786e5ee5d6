"""RoutingRecorder and ExpertUtilisationHook on the tiny SERA model."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.registry import init_default_scope

from mmseg.registry import HOOKS, MODELS
from mmseg_sera.engine import ExpertUtilisationHook, RoutingRecorder
from mmseg_sera.engine.hooks import expert_utilisation_hook as hook_module
from mmseg_sera.engine.routing import (RoutingRecord, routing_statistics,
                                       short_name)
from ..conftest import TINY_CONFIG, count_host_reads

TEXTS = ['the red circle', 'the leftmost big square',
         'the blue triangle above the small circle']


@pytest.fixture(scope='module')
def tiny_model():
    init_default_scope('mmseg')
    torch.manual_seed(0)
    cfg = Config.fromfile(TINY_CONFIG)
    return MODELS.build(cfg.model)


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 112, 112, generator=g)


def test_recorder_sees_what_the_modules_return(tiny_model):
    tiny_model.eval()
    x = _images(3)
    with torch.no_grad():
        _, bb, neck = tiny_model.extract_feat(x, TEXTS)
        with RoutingRecorder(tiny_model) as rec:
            tiny_model.extract_feat(x, TEXTS)
    names = [r.module for r in rec.records]
    assert names == ['backbone.adapters.1', 'backbone.adapters.3', 'neck']
    by_name = {r.module: r for r in rec.records}
    for block in (1, 3):
        r = by_name[f'backbone.adapters.{block}']
        assert r.experts == ('spatial', 'boundary')
        assert r.indices is None
        assert torch.equal(r.weights, bb.routing[block])
    r = by_name['neck']
    assert r.experts == ('spatial', 'context', 'boundary', 'shape')
    assert torch.equal(r.weights, neck.routing['weights'])
    assert torch.equal(r.indices, neck.routing['indices'])
    # hooks are gone after the with block
    tiny_model.extract_feat(x, TEXTS)
    assert len(rec.records) == 3


def test_recorder_module_selection(tiny_model):
    with pytest.raises(ValueError, match='not routed modules'):
        RoutingRecorder(tiny_model, modules=['neck', 'decode_head'])
    rec = RoutingRecorder(tiny_model, modules=['neck'])
    with rec, torch.no_grad():
        tiny_model.eval()
        tiny_model.extract_feat(_images(2), TEXTS[:2])
    assert [r.module for r in rec.records] == ['neck']


def test_recorder_on_device_equals_cpu_copy(tiny_model):
    tiny_model.eval()
    x = _images(3)
    with torch.no_grad(), RoutingRecorder(tiny_model) as on_cpu:
        tiny_model.extract_feat(x, TEXTS)
    with count_host_reads() as reads, torch.no_grad(), \
            RoutingRecorder(tiny_model, to_cpu=False) as dev:
        tiny_model.extract_feat(x, TEXTS)
    assert reads == []  # to_cpu=False copies nothing to the host
    assert [r.module for r in dev.records] == [r.module for r in
                                               on_cpu.records]
    for a, b in zip(on_cpu.records, dev.records):
        assert torch.equal(a.weights, b.weights)
        assert (a.indices is None) == (b.indices is None)
        assert a.indices is None or torch.equal(a.indices, b.indices)
        assert torch.equal(a.top1_counts(), b.top1_counts())


def test_record_statistics():
    w = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.5, 0.0, 0.5],
                      [0.1, 0.1, 0.8]])
    r = RoutingRecord('neck', ('a', 'b', 'c'), w)
    # argmax picks the first of tied experts (row 3 -> a)
    assert r.top1_counts().tolist() == [2.0, 1.0, 1.0]
    assert r.weight_sums().tolist() == pytest.approx([1.5, 1.2, 1.3])
    assert r.num_units() == 4
    # per-token weights count every token
    tok = RoutingRecord('neck', ('a', 'b', 'c'), w.reshape(2, 2, 3))
    assert tok.top1_counts().tolist() == [2.0, 1.0, 1.0]
    assert tok.num_units() == 4
    assert short_name('backbone.adapters.3') == 'adapter3'
    assert short_name('neck') == 'neck'


def _runner(model, logger_interval=None):
    hub = MessageHub.get_instance(f'util-test-{id(model)}-{logger_interval}')
    hooks = []
    if logger_interval is not None:
        hooks.append(HOOKS.build(dict(type='LoggerHook',
                                      interval=logger_interval)))
    return SimpleNamespace(model=model, message_hub=hub, hooks=hooks,
                           iter=0, train_loop=object())


def test_hook_logs_window_shares(tiny_model, monkeypatch):
    tiny_model.train()
    runner = _runner(tiny_model, logger_interval=2)
    hook = ExpertUtilisationHook(log_weights=True, collapse_ratio=0)
    hook.before_train(runner)
    assert hook.interval == 2  # taken from the LoggerHook
    expected = {}
    with RoutingRecorder(tiny_model) as truth:
        for it in range(2):
            runner.iter = it
            with torch.no_grad():
                tiny_model.extract_feat(_images(3), TEXTS)
            hook.after_train_iter(runner, it)
    hook.after_train(runner)
    for r in truth.records:
        counts, wsum = expected.get(r.module, (0, 0))
        expected[r.module] = (counts + r.top1_counts(),
                              wsum + r.weight_sums())
    scalars = runner.message_hub.log_scalars
    assert expected, 'no routing recorded'
    for module, (counts, wsum) in expected.items():
        name = short_name(module)
        experts = (('spatial', 'boundary') if 'adapter' in name else
                   ('spatial', 'context', 'boundary', 'shape'))
        shares = [scalars[f'train/util_{name}_{e}'].current()
                  for e in experts]
        weights = [scalars[f'train/wutil_{name}_{e}'].current()
                   for e in experts]
        assert shares == pytest.approx((counts / 6).tolist())
        assert weights == pytest.approx((wsum / 6).tolist())
        assert sum(shares) == pytest.approx(1.0)
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    # the hook removed its forward hooks after training
    assert not any(m._forward_hooks for _, m in tiny_model.named_modules())


def test_hook_reads_the_device_once_per_window(tiny_model):
    tiny_model.train()
    runner = _runner(tiny_model)
    hook = ExpertUtilisationHook(interval=3, collapse_ratio=0)
    hook.before_train(runner)
    with count_host_reads() as reads:
        for it in range(2):  # inside the window: forwards and sums only
            runner.iter = it
            with torch.no_grad():
                tiny_model.extract_feat(_images(2), TEXTS[:2])
            hook.after_train_iter(runner, it)
        in_window = list(reads)
        with torch.no_grad():
            tiny_model.extract_feat(_images(2), TEXTS[:2])
        runner.iter = 2
        hook.after_train_iter(runner, 2)  # window ends: a read per module
    hook.after_train(runner)
    assert in_window == []
    assert reads == ['cpu'] * 3
    assert runner.message_hub.get_scalar(
        'train/util_neck_spatial').current() >= 0


def test_hook_warns_once_on_collapse(tiny_model, monkeypatch):
    messages = []
    monkeypatch.setattr(hook_module, 'print_log',
                        lambda msg, **kw: messages.append(msg))
    hook = ExpertUtilisationHook(interval=1, collapse_ratio=0.5)
    hook._check_collapse('neck', ('a', 'b', 'c', 'd'),
                         torch.tensor([0.85, 0.1, 0.05, 0.0]))
    # even share 0.25, threshold 0.125: b, c and d collapse, a does not
    assert len(messages) == 3
    assert all('collapsing' in m for m in messages)
    assert '"d" got a mean routing weight of 0.0%' in messages[2]
    hook._check_collapse('neck', ('a', 'b', 'c', 'd'),
                         torch.tensor([0.85, 0.1, 0.05, 0.0]))
    assert len(messages) == 3  # once per expert


def test_hook_argument_checks():
    with pytest.raises(ValueError, match='interval'):
        ExpertUtilisationHook(interval=0)
    with pytest.raises(ValueError, match='collapse_ratio'):
        ExpertUtilisationHook(collapse_ratio=1.0)


def test_routing_statistics_separates_sentence_from_image():
    images = ['a', 'a', 'b', 'b', 'c']
    kinds = ['x', 'y', 'x', 'y', 'x']
    # the weights follow the sentence kind only: all spread within images
    by_kind = [[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.2, 0.8], [0.9, 0.1]]
    st = routing_statistics(by_kind, images, kinds)
    assert st['sentence_share'] == pytest.approx(1.0)
    assert st['by_group']['x'] == dict(n=3, mean=pytest.approx([0.9, 0.1]))
    assert st['by_group']['y']['mean'] == pytest.approx([0.2, 0.8])
    assert st['mean'] == pytest.approx([0.62, 0.38])
    assert st['std'] == pytest.approx([torch.tensor(
        [0.9, 0.2, 0.9, 0.2, 0.9]).std(unbiased=False).item()] * 2)
    # the weights follow the image only: no spread within an image ('c',
    # with one sentence, does not count)
    by_image = [[0.7, 0.3], [0.7, 0.3], [0.1, 0.9], [0.1, 0.9], [0.5, 0.5]]
    assert routing_statistics(by_image, images)['sentence_share'] == 0.0
    # both: 'a' splits its sentences, 'b' sends both to expert 0
    mixed = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]
    within = 4 * 0.5**2  # 'a's two rows, 0.5 from their mean per expert
    total = 2 * 0.25**2 + 2 * 0.75**2 + 2 * 2 * 0.25**2  # grand mean .75
    assert routing_statistics(mixed, images[:4])['sentence_share'] == \
        pytest.approx(within / total)
    assert routing_statistics([[0.5, 0.5]] * 2, ['a', 'a'])[
        'sentence_share'] is None  # no spread at all
    assert routing_statistics([[0.5, 0.5]], ['a'])['sentence_share'] is None
    with pytest.raises(ValueError, match='one image'):
        routing_statistics([[0.5, 0.5]], ['a', 'b'])
