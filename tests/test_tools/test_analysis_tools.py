"""tools/analysis_tools/count_params.py and benchmark.py, on the tiny SERA
config (and the paper config for the parameter budget)."""
import importlib.util
import json
import os.path as osp

import pytest
import torch

from ..conftest import REPO, TINY_CONFIG

PAPER = osp.join(REPO, 'configs', 'sera',
                 'sera_dinov2-b14-reg4_clip-b16_1xb16-50e_refcoco-448x448.py')
# one timed run per phase (--max-time ends adaptive_autorange after it)
FAST = ['--img-size', '112', '--batch-size', '2', '--repeats', '1',
        '--warmup', '0', '--threads', '1', '--max-time', '0.001']


def _load(name: str):
    path = osp.join(REPO, 'tools', 'analysis_tools', name + '.py')
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def cp():
    return _load('count_params')


@pytest.fixture(scope='module')
def bm():
    return _load('benchmark')


@pytest.fixture(scope='module')
def tiny_model(cp):
    return cp.build_model(TINY_CONFIG)


def _numel(params, trainable=False):
    return sum(p.numel() for p in params if p.requires_grad or not trainable)


# --------------------------------------------------------------------------
# count_params
# --------------------------------------------------------------------------
def test_count_parameters_matches_independent_sums(cp, tiny_model):
    model = tiny_model
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        # a mix of frozen and trainable parts
        for p in model.text_encoder.parameters():
            p.requires_grad_(False)
        model.backbone.blocks[0].attn.qkv.weight.requires_grad_(False)
        counts = cp.count_parameters(model)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)

    parts = counts['parts']
    assert set(parts) == set(cp.PART_NAMES)
    assert sum(r['total'] for r in parts.values()) == counts['total'][
        'total'] == sum(p.numel() for p in model.parameters())
    assert sum(r['trainable'] for r in parts.values()) == counts['total'][
        'trainable']
    adapters = list(model.backbone.adapters.parameters())
    assert parts['adapters']['total'] == _numel(adapters) > 0
    own = [p for n, p in model.backbone.named_parameters()
           if not n.startswith('adapters.')]
    assert parts['backbone']['total'] == _numel(own)
    qkv = model.backbone.blocks[0].attn.qkv.weight.numel()
    assert parts['backbone']['trainable'] == _numel(own) - qkv
    assert counts['backbone_trainable_percent'] == pytest.approx(
        100. * (_numel(own) - qkv) / _numel(own))
    assert parts['text_encoder'] == dict(
        total=_numel(model.text_encoder.parameters()), trainable=0)
    assert parts['neck']['total'] == parts['neck']['trainable'] == _numel(
        model.neck.parameters())
    assert parts['head']['total'] == _numel(model.decode_head.parameters())
    assert parts['other']['total'] == 0
    assert counts['total']['trainable'] == sum(
        p.numel() for p in model.parameters()) - qkv - parts[
            'text_encoder']['total']


def test_count_params_cli_writes_json(cp, tiny_model, tmp_path, capsys):
    out = tmp_path / 'counts.json'
    counts = cp.main([TINY_CONFIG, '--json', str(out)])
    with open(out) as f:
        saved = json.load(f)
    assert saved['parts'] == counts['parts']
    assert saved['total']['total'] == sum(
        p.numel() for p in tiny_model.parameters())
    printed = capsys.readouterr().out
    assert 'adapters' in printed and 'trainable share' in printed
    with pytest.raises(FileNotFoundError, match='no_such_config'):
        cp.main([str(tmp_path / 'no_such_config.py')])
    with pytest.raises(TypeError):
        cp.count_parameters(object())


def test_paper_config_parameter_budget(cp):
    counts = cp.count_parameters(cp.build_model(PAPER))
    parts = counts['parts']
    print(cp.format_table(counts, title='paper config'))
    # LayerNorm + bias of ViT-B/14: about 0.14 % of the backbone
    assert 0 < counts['backbone_trainable_percent'] < 0.2
    assert counts['total']['trainable'] <= 15e6
    assert parts['text_encoder']['trainable'] == 0
    assert parts['adapters']['trainable'] == parts['adapters']['total'] > 0
    assert 86e6 < parts['backbone']['total'] < 87e6  # ViT-B/14 + 4 registers


# --------------------------------------------------------------------------
# benchmark (the library's own tests: tests/test_apis/test_benchmark.py)
# --------------------------------------------------------------------------
def test_benchmark_single_config_json(bm, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    report = bm.main([TINY_CONFIG, *FAST, '--breakdown', '--profile', '3',
                      '--json', str(out)])
    assert torch.get_num_threads() == threads  # restored
    with open(out) as f:
        saved = json.load(f)
    run, = saved['results']
    assert saved['env']['threads'] == 1
    assert set(run['phases']) == set(bm.bench.PHASES)
    ref = run['phases']['frozen_forward']['median_s']
    assert run['phases']['frozen_forward']['ratio'] == 1.0
    for name, r in run['phases'].items():
        assert r['median_s'] > 0 and r['runs'] == len(r['times_s']) >= 1
        assert r['ratio'] == pytest.approx(r['median_s'] / ref)
        # the median and IQR of the reported times
        times = torch.tensor(r['times_s'], dtype=torch.float64)
        assert r['median_s'] == pytest.approx(times.quantile(.5).item())
        assert r['iqr_s'] == pytest.approx(
            (times.quantile(.75) - times.quantile(.25)).item())
        assert r['peak_mem_mb'] > 0 and r['mem_increase_mb'] >= 0
        assert len(r['loadavg_before']) == len(r['loadavg_after']) == 3
    assert run['params']['trainable'] == run['params']['total'] > 0
    assert saved['process_peak_rss_mb'] >= max(
        r['peak_mem_mb'] for r in run['phases'].values())
    parts = run['breakdown']
    assert parts['step'] > 0 and parts['forward'] > 0 and parts[
        'backward'] > 0
    fwd_parts = [k for k in parts if k.startswith('fwd_')]
    assert sum(parts[k] for k in fwd_parts) == pytest.approx(
        parts['forward'])
    assert parts['fwd_adapters'] > 0 and parts['bwd_adapters'] > 0
    assert parts['bwd_head'] > 0 and parts['bwd_neck'] > 0
    assert all(parts[k] >= 0 for k in parts if k.startswith('bwd_'))
    bwd = sum(parts[k] for k in parts if k.startswith('bwd_'))
    assert bwd == pytest.approx(parts['backward'])
    inf = run['breakdown_inference']
    assert inf['inference'] > 0 and inf['head'] > 0 and inf['adapters'] > 0
    assert sum(v for k, v in inf.items() if k != 'inference') == \
        pytest.approx(inf['inference'])
    assert len(run['profile']) == 3
    assert {'op', 'calls', 'self_cpu_s', 'share'} <= set(run['profile'][0])
    assert report['results'][0]['label'] == run['label']
    printed = capsys.readouterr().out
    assert '(a) frozen backbone forward' in printed
    assert 'median time per phase' in printed  # the Compare table
    assert 'training step breakdown' in printed
    assert 'inference breakdown' in printed


def test_benchmark_two_configs(bm, tmp_path, capsys):
    no_adapter = tmp_path / 'tiny_no_adapter.py'
    no_adapter.write_text(f'_base_ = [{TINY_CONFIG!r}]\n'
                          'model = dict(backbone=dict(adapter_indices=()))\n')
    report = bm.main([TINY_CONFIG, str(no_adapter), *FAST, '--interleave',
                      '--repeats', '2', '--max-spread', '1.5',
                      '--max-attempts', '3'])  # old flags: accepted
    a, b = report['results']
    assert b['label'] == 'tiny_no_adapter'
    assert b['params']['total'] < a['params']['total']
    for name in bm.bench.PHASES:
        assert report['b_over_a'][name] == pytest.approx(
            b['phases'][name]['median_s'] / a['phases'][name]['median_s'])
        assert len(a['phases'][name]['times_s']) >= 2  # rounds
    assert a['phases']['frozen_forward']['ratio'] == b['phases'][
        'frozen_forward']['ratio'] == 1.0
    printed = capsys.readouterr().out
    assert 'B / A' in printed
    assert 'A: ' + a['label'] in printed and 'B: tiny_no_adapter' in printed


def test_benchmark_explicit_attention_reference(bm, capsys):
    report = bm.main([TINY_CONFIG, *FAST, '--interleave',
                      '--explicit-attn-ref'])
    phases = report['results'][0]['phases']
    assert list(phases) == list(bm.bench.PHASES + bm.bench.REF_PHASES)
    ref = phases['frozen_forward_explicit']['median_s']
    for r in phases.values():
        assert r['ratio_explicit'] == pytest.approx(r['median_s'] / ref)
    printed = capsys.readouterr().out
    assert "(b') (b), explicit attention" in printed
    assert "ratio to the explicit-attention frozen forward: (b') " in printed


def test_benchmark_cfg_options2_changes_the_second_model_only(bm):
    report = bm.main([
        TINY_CONFIG, *FAST, '--cfg-options2',
        'model.decode_head.up_channels=[8,8]'
    ])
    a, b = report['results']
    assert a['config'] == b['config']
    assert 'up_channels' not in str(a['cfg_options'])
    assert b['label'].endswith('model.decode_head.up_channels=[8, 8]')
    assert b['cfg_options'] == {'model.decode_head.up_channels': [8, 8]}
    assert b['params']['total'] < a['params']['total']


def test_benchmark_bad_arguments(bm, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='missing.py'):
        bm.main([str(tmp_path / 'missing.py'), *FAST])
    with pytest.raises(ValueError, match='max_time'):
        bm.main([TINY_CONFIG, *FAST, '--max-time', '0'])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match='CUDA'):
        bm.main([TINY_CONFIG, *FAST, '--device', 'cuda'])


# --------------------------------------------------------------------------
# train_speed
# --------------------------------------------------------------------------
def test_train_speed_settings():
    ts = _load('train_speed')
    assert ts.parse_setting('plan') == dict(
        name='plan', passive=False, replan=True, plan=True)
    assert ts.parse_setting('plan+noreplan+passive') == dict(
        name='plan+noreplan+passive', passive=True, replan=False,
        plan=True)
    assert ts.parse_setting('1,0') == dict(
        name='1,0', passive=False, replan=True, plan=True, threads=1,
        workers=0)
    assert ts.parse_setting('default')['plan'] is False
    with pytest.raises(ValueError, match='unknown suffix'):
        ts.parse_setting('plan+fast')
    with pytest.raises(ValueError, match='not plan, default'):
        ts.parse_setting('two')


def test_train_speed_late_competitor(synthetic_root, tmp_path):
    """A competitor started after the measured run; the steps are timed
    only once it runs (settle 0), through the re-planning hook."""
    ts = _load('train_speed')
    out = tmp_path / 'speed.json'
    ts.main([TINY_CONFIG, '--iters', '2', '--warmup', '0', '--settings',
             'plan', '--late-competitor', '1', '--settle', '0',
             '--json', str(out), '--cfg-options',
             f'train_dataloader.dataset.data_root={synthetic_root}',
             'train_dataloader.batch_size=2'])
    rows = json.loads(out.read_text())['rows']
    assert [(r['setting'], r['busy']) for r in rows] == [('plan', False),
                                                         ('plan', True)]
    for r in rows:
        assert r['median_s'] > 0 and r['threads'] >= 1
