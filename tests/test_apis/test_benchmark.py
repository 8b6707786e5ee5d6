"""mmseg_sera.apis.benchmark: timing on fake clocks, ratios on fake
Measurements, peak memory, the profiler breakdowns on the tiny config."""
import contextlib

import pytest
import torch
from torch.utils.benchmark import Measurement, TaskSpec

from mmseg_sera.apis import benchmark as bm
from mmseg_sera.apis import build_model, load_config
from ..conftest import TINY_CONFIG


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_config(TINY_CONFIG))


@pytest.fixture(scope='module')
def tiny_phases(tiny_model):
    cfg = load_config(TINY_CONFIG)
    batch = bm.make_batch(2, 56)
    train = bm.preprocess(tiny_model, batch, training=True)
    test = bm.preprocess(tiny_model, batch, training=False)
    return bm.make_phases(tiny_model, train, test,
                          bm.build_optimizer(cfg, tiny_model),
                          contextlib.nullcontext, explicit_ref=True)


class FakeClock:
    """A clock that only moves when a fake phase runs."""

    def __init__(self):
        self.now, self.calls = 0., []

    def __call__(self) -> float:
        return self.now

    def phase(self, name, durations):
        durations = iter(durations)

        def fn():
            self.calls.append(name)
            self.now += next(durations)
        return fn


def _m(times, name='x'):
    return Measurement(1, list(times),
                       TaskSpec('fn()', 'pass', sub_label=name))


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------
def test_ratios_and_compare_on_fake_measurements():
    a = dict(frozen_forward=_m([1., 2., 3.]), train_step=_m([5., 6., 70.]))
    b = dict(frozen_forward=_m([4.]), train_step=_m([3.]), extra=_m([1.]))
    assert bm.ratios(a) == dict(frozen_forward=1., train_step=3.)
    assert bm.ratios(b, 'train_step')['frozen_forward'] == pytest.approx(
        4 / 3)
    assert bm.compare(a, b) == dict(frozen_forward=2., train_step=0.5)


def test_time_adaptive_adds_runs_until_the_iqr_is_small():
    clock = FakeClock()
    spec = bm.task_spec('train_step', 'A')
    # 1 untimed call sizes the block, then runs until IQR / median < 0.1
    fn = clock.phase('c', [9., 1., 3., 2., 2.2, 2.1])
    m = bm.time_adaptive(fn, spec, repeats=1, max_iqr=0.1, max_time=100.,
                         clock=clock)
    assert m.times == pytest.approx([1., 3., 2., 2.2, 2.1])
    assert m.median == pytest.approx(2.1) and m.meets_confidence(0.1)
    assert m.sub_label == '(c) training step' and m.description == 'A'
    # stopped by max_time while still spread: disturbed
    fn = clock.phase('c', [1., 1., 3., 1., 3., 1.])
    m = bm.time_adaptive(fn, spec, repeats=1, max_time=4.5, clock=clock)
    assert m.times == pytest.approx([1., 3., 1.])
    assert not m.meets_confidence(0.1)
    # --repeats is a minimum: a second adaptive_autorange, merged
    clock.calls.clear()
    m = bm.time_adaptive(clock.phase('c', [1.] * 10), spec, repeats=5,
                         clock=clock)
    assert len(m.times) == 8 and len(clock.calls) == 10


def test_round_robin_rounds_until_every_phase_is_steady():
    clock, wrapped = FakeClock(), []
    fns = dict(a=clock.phase('a', [1.] * 5),
               b=clock.phase('b', [2., 5., 2.1, 2., 2.05]))
    specs = {n: bm.task_spec(n) for n in fns}

    @contextlib.contextmanager
    def around(name):
        wrapped.append(name)
        yield

    ms = bm.time_round_robin(fns, specs, repeats=2, max_iqr=0.1,
                             max_time=100., clock=clock, around=around)
    assert clock.calls == wrapped == ['a', 'b'] * 5
    assert ms['a'].times == pytest.approx([1.] * 5)
    assert ms['b'].median == pytest.approx(2.05)
    assert ms['b'].meets_confidence(0.1)


def test_measure_phases_rows(monkeypatch):
    clock = FakeClock()
    fns = dict(a=clock.phase('a', [1.] * 20), b=clock.phase('b', [3.] * 20))
    rows = bm.measure_phases(fns, ('a', 'b'), torch.device('cpu'),
                             repeats=2, warmup=1, max_time=100.,
                             interleave=True, clock=clock)
    assert clock.calls[:4] == ['a', 'b', 'a', 'b']  # warmup, round 1
    for name, r in rows.items():
        assert r['runs'] == len(r['times_s']) == 2 and not r['disturbed']
        assert r['median_s'] == r['measurement'].median
        assert r['iqr_s'] == pytest.approx(0, abs=1e-9)
        assert r['spread'] == pytest.approx(1)
        assert r['peak_mem_mb'] > 0 and r['mem_kind'] == 'cpu_rss'
        assert len(r['loadavg_before']) == len(r['loadavg_after']) == 3
    assert rows['b']['median_s'] == pytest.approx(3.)
    with pytest.raises(ValueError, match='repeats'):
        bm.measure_phases(fns, ('a', ), torch.device('cpu'), repeats=0)


PEAK_MEMORY_CHILD = """
import json, torch
from mmseg_sera.apis import benchmark as bm
with bm.peak_memory(torch.device('cpu')) as mem:
    x = torch.ones(50 * 2**20)  # 200 MB, freed before the exit
    del x
print(json.dumps(mem))
"""


def test_peak_memory_sees_a_cpu_allocation():
    # in a fresh process: after other tests the allocator may hand out
    # pages that are already resident, which the peak RSS cannot see
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-c', PEAK_MEMORY_CHILD],
                         capture_output=True, text=True, timeout=120,
                         check=True).stdout
    mem = json.loads(out.strip().splitlines()[-1])
    assert mem['kind'] == 'cpu_rss'
    assert mem['increase_mb'] > 150
    assert mem['peak_mb'] > mem['increase_mb']


# --------------------------------------------------------------------------
# phases and helpers
# --------------------------------------------------------------------------
def test_bypass_freeze_and_loss_sum(tiny_model):
    backbone = tiny_model.backbone.eval()
    calls = []
    handles = [a.register_forward_hook(lambda *_: calls.append(1))
               for a in backbone.adapters.values()]
    x = torch.randn(1, 3, 56, 56)
    adapters = backbone.adapters
    try:
        with bm.adapters_bypassed(backbone), torch.no_grad():
            feats = bm.backbone_features(backbone, x)
        assert calls == [] and backbone.adapters is adapters
        with torch.no_grad():
            bm.backbone_features(backbone, x)
        assert len(calls) == len(adapters) == 2
    finally:
        for h in handles:
            h.remove()
    assert [f.shape for f in feats] == [(1, 96, 4, 4)] * 3

    flags = [p.requires_grad for p in backbone.parameters()]
    with bm.params_frozen(backbone):
        assert not any(p.requires_grad for p in backbone.parameters())
    assert [p.requires_grad for p in backbone.parameters()] == flags

    one = torch.tensor(1.)
    total = bm.total_loss(dict(loss_a=one, loss_b=[one, 2 * one], acc=one))
    assert total.item() == 4.
    with pytest.raises(ValueError, match='no loss'):
        bm.total_loss(dict(acc=one))


def test_explicit_attention_switch(tiny_model, monkeypatch):
    backbone = tiny_model.backbone.eval()
    attns = [blk.attn for blk in backbone.blocks]
    x = torch.randn(1, 3, 56, 56)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        fused = bm.backbone_features(backbone, x)
        assert len(calls) == len(attns)
        with bm.explicit_attention(backbone):
            assert not any(a.fused for a in attns)
            explicit = bm.backbone_features(backbone, x)
    assert len(calls) == len(attns)  # no SDPA call inside the block
    assert all(a.fused for a in attns)  # restored
    for f, e in zip(fused, explicit):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='no attention module'):
        with bm.explicit_attention(torch.nn.Linear(2, 2)):
            pass


def test_batch_is_fixed_and_preprocessed(tiny_model):
    a, b = bm.make_batch(3, 112, seed=1), bm.make_batch(3, 112, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a['inputs'], b['inputs']))
    assert [s.metainfo['text'] for s in a['data_samples']] == list(
        bm.SENTENCES[:3])
    assert set(a['data_samples'][0].gt_sem_seg.data.unique().tolist()) == {
        0, 1}
    data = bm.preprocess(tiny_model, a, training=True)
    assert data['inputs'].shape == (3, 3, 112, 112)
    assert data['inputs'].dtype == torch.float32
    assert a['inputs'][0].dtype == torch.uint8  # the raw batch is unchanged
    with pytest.raises(ValueError, match='positive'):
        bm.make_batch(0, 112)


# --------------------------------------------------------------------------
# torch.profiler breakdowns
# --------------------------------------------------------------------------
def test_profiled_step_names_every_part(tiny_model, tiny_phases):
    cpu = torch.device('cpu')
    prof = bm.profiled(tiny_phases['train_step'], tiny_model, cpu)
    fwd = bm.section_times(prof)
    assert set(fwd) == set(bm.PARTS) and all(v > 0 for v in fwd.values())
    assert fwd['adapters'] < fwd['backbone']  # nested in the backbone
    assert set(bm.section_times(prof, 'bench:')) == {
        'forward', 'backward', 'optimizer'}
    bwd = bm.backward_times(prof, cpu)
    # every part of the tiny model trains, the text encoder included
    assert set(bm.PARTS) <= set(bwd) and all(v > 0 for v in bwd.values())
    assert sum(bwd.values()) <= bm.section_times(prof, 'bench:')['backward']
    # the wrappers are gone afterwards
    assert 'forward' not in vars(tiny_model.decode_head)
    assert 'forward_features' not in vars(tiny_model.backbone)
    ops = bm.top_operators(
        bm.profiled(tiny_phases['inference'], tiny_model, cpu,
                    record_shapes=True, profile_memory=True), 5)
    assert len(ops) == 5 and 0 < sum(r['share'] for r in ops) <= 1
    assert all(r['op'] and r['calls'] > 0 for r in ops)
    assert any(r['input_shapes'] for r in ops)


def test_breakdowns_add_up(tiny_model, tiny_phases):
    cpu = torch.device('cpu')
    parts = bm.breakdown_train_step(tiny_phases['train_step'], tiny_model,
                                    cpu, repeats=1)
    assert parts['step'] == pytest.approx(
        parts['forward'] + parts['backward'] + parts['optimizer'])
    fwd = sum(v for k, v in parts.items() if k.startswith('fwd_'))
    bwd = sum(v for k, v in parts.items() if k.startswith('bwd_'))
    assert fwd == pytest.approx(parts['forward'])
    assert bwd == pytest.approx(parts['backward'])
    assert all(v > 0 for k, v in parts.items() if k.startswith('bwd_'))
    inf = bm.breakdown_inference(tiny_phases['inference'], tiny_model, cpu,
                                 repeats=1)
    assert inf['head'] > 0 and inf['adapters'] > 0
    assert sum(v for k, v in inf.items() if k != 'inference') == \
        pytest.approx(inf['inference'])


def test_profiled_step_names_the_head_of_a_no_target_model():
    """A head with a no-target scorer runs forward_with_no_target in
    training and prediction: the profiler's 'head' part wraps that."""
    cfg = load_config(TINY_CONFIG, {
        'model.decode_head.no_target_cfg': dict(hidden_channels=8)})
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = bm.make_batch(2, 56)
    phases = bm.make_phases(
        model, bm.preprocess(model, batch, training=True),
        bm.preprocess(model, batch, training=False),
        bm.build_optimizer(cfg, model), contextlib.nullcontext,
        explicit_ref=True)
    cpu = torch.device('cpu')
    fwd = bm.section_times(bm.profiled(phases['train_step'], model, cpu))
    assert set(fwd) == set(bm.PARTS) and fwd['head'] > 0
