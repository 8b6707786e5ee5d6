"""tools/analysis_tools/domain_shift.py and its parts: the pretraining set's
random sensors, the pyramid backbone of the single-stream variants, the
per-domain table, and the whole benchmark at a toy budget through
tools/train.py and tools/test.py."""
import contextlib
import importlib.util
import io
import json
import os
import os.path as osp
import runpy
import sys
import time
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mmseg.registry import MODELS
from mmseg_sera.apis.domain_shift import (count_parts, ensure_set,
                                          format_markdown, summarise_domains,
                                          variant_name)
from mmseg_sera.datasets.multispectral import (generate_multispectral_set,
                                               make_domains,
                                               make_random_domains)
from mmseg_sera.models.backbones.dual_stream import BackboneFeatures
from mmseg_sera.models.backbones.pyramid import PyramidDINOv2

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    'domain_shift', ROOT / 'tools' / 'analysis_tools' / 'domain_shift.py')
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)

TOWER = dict(type='DINOv2', arch=dict(embed_dims=24, num_layers=2,
                                      num_heads=2, mlp_ratio=2),
             patch_size=7, img_size=28, in_channels=3, out_indices=(0, 1),
             trainable='full')


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def test_random_domains_are_deterministic_and_not_the_benchmarks():
    doms = make_random_domains(6, 8, seed=1)
    assert [d.name for d in doms] == [f'R{i:02d}' for i in range(8)]
    assert make_random_domains(6, 8, seed=1) == doms
    assert make_random_domains(6, 8, seed=2) != doms
    bench = make_domains(6, 3, seed=0)
    for d in doms:
        assert d.num_bands == 6
        assert 0 <= d.crosstalk <= 0.08 and 0.67 <= d.illumination <= 1.5
        assert all(abs(g - 1) <= 0.2 for g in d.gains)
        assert all(d.gains != b.gains for b in bench)
    with pytest.raises(ValueError, match='num_domains'):
        make_random_domains(6, 0)


def test_generator_writes_random_domains_on_request(tmp_path):
    meta = generate_multispectral_set(str(tmp_path), num_train=1, num_val=1,
                                      img_size=28, seed=1, random_domains=3,
                                      progress=False)
    assert [d['name'] for d in meta['domains']] == ['R00', 'R01', 'R02']
    assert meta['seed'] == 1
    for name in ('R00', 'R02'):
        assert (tmp_path / name / 'img' / 'train' / '00000.npy').is_file()
    assert not (tmp_path / 'A').exists()


# --------------------------------------------------------------------------
# PyramidDINOv2
# --------------------------------------------------------------------------
def test_pyramid_backbone_resamples_and_selects_bands():
    model = PyramidDINOv2(backbone=TOWER, bands=(2, 1, 0),
                          out_scales=(2, 0.5))
    feats = model(torch.randn(2, 6, 28, 28))
    assert isinstance(feats, BackboneFeatures)
    assert [tuple(f.shape) for f in feats] == [(2, 24, 8, 8), (2, 24, 2, 2)]
    assert feats.aux_losses == {} and model.embed_dims == 24
    plain = PyramidDINOv2(backbone=dict(TOWER, in_channels=6))
    assert [f.shape[-1] for f in plain(torch.randn(1, 6, 28, 28))] == [4, 4]
    with pytest.raises(ValueError, match='bands'):
        PyramidDINOv2(backbone=TOWER, bands=(0, 1))
    with pytest.raises(ValueError, match='out_scales'):
        PyramidDINOv2(backbone=TOWER, out_scales=(1, ))
    with pytest.raises(ValueError, match='1 / k'):
        PyramidDINOv2(backbone=TOWER, out_scales=(1, 0.4))
    assert MODELS.get('PyramidDINOv2') is PyramidDINOv2


# --------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------
def test_variant_configs_share_foundation_head_and_budget():
    cfgs = {variant_name(c): Config.fromfile(str(ROOT / c))
            for c in ds.VARIANTS}
    assert list(cfgs) == ['head-only', 'sera-image', 'spectralmoe',
                          'spectralmoe-released']
    pre = Config.fromfile(str(ROOT / ds.PRETRAIN))
    for name, cfg in cfgs.items():
        tower = cfg.model.backbone.backbone
        assert tower.trainable == 'frozen'
        assert tower.init_cfg == dict(type='Pretrained',
                                      checkpoint=cfg.foundation)
        assert cfg.foundation.endswith(ds.FOUNDATION_FILES['main'])
        # the pretrained tower, as pretrained (no adapters there)
        for key in ('arch', 'patch_size', 'img_size', 'in_channels'):
            assert tower[key] == pre.model.backbone.backbone[key], key
        assert cfg.model.decode_head == cfgs['head-only'].model.decode_head
        assert cfg.train_cfg == cfgs['head-only'].train_cfg
        assert cfg.optim_wrapper == cfgs['head-only'].optim_wrapper
        assert cfg.train_dataloader.dataset.data_root.endswith('/A')
        assert cfg.val_dataloader.dataset.data_root.endswith('/A')
    assert 'adapters' not in cfgs['head-only'].model.backbone.backbone
    sera, = cfgs['sera-image'].model.backbone.backbone.adapters
    assert sera.type == 'SERAAdapter' and sera.text_dims is None
    moe = cfgs['spectralmoe'].model.backbone
    assert moe.type == 'DualStreamDINOv2'
    assert moe.backbone.adapters[0].type == 'SpectralMoEAdapter'
    assert sera.insert == moe.backbone.adapters[0].insert == (0, 1, 2, 3)
    rgb = Config.fromfile(str(ROOT / ds.PRETRAIN_RGB)).model.backbone
    assert moe.second_bands == rgb.bands == (2, 1, 0)
    for key in ('arch', 'patch_size', 'img_size', 'in_channels'):
        assert moe.second[key] == rgb.backbone[key], key
    assert moe.second.trainable == 'frozen'
    # the release-faithful variant differs from (c) in its adapter only
    released = cfgs['spectralmoe-released'].model.backbone
    assert released.second == moe.second
    assert released.second_bands == moe.second_bands
    adapter, = released.backbone.adapters
    assert adapter.released_compat is True and adapter.insert == (0, 1, 2, 3)
    for key in ('fusion', 'num_experts', 'token_length', 'rank'):
        assert key not in adapter, key  # the released defaults apply
    # the pretraining set is not the benchmark set
    assert pre.pretrain_set.seed != 0 and pre.pretrain_set.random_domains
    assert len(pre.train_dataloader.dataset.datasets) == len(
        pre.pretrain_domains) == pre.pretrain_set.random_domains


# --------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------
def test_summary_and_markdown():
    runs = {0: {'A': {'mIoU': 80.}, 'B': {'mIoU': 60.}, 'C': {'mIoU': 40.}},
            1: {'A': {'mIoU': 70.}, 'B': {'mIoU': 50.}, 'C': {'mIoU': 50.}}}
    s = summarise_domains(runs, ['A', 'B', 'C'], 'A')
    assert s['A'] == dict(mean=75., min=70., max=80., values=[80., 70.])
    assert s['targets'] == dict(mean=50., min=50., max=50.,
                                values=[50., 50.])
    params = dict(trainable=1200, frozen=5000, adapters_trainable=200,
                  head_trainable=1000)
    head, rule, row = format_markdown(
        [dict(name='x', params=params, summary=s)], ['A', 'B', 'C'], 'A', 2)
    assert head.startswith('| variant | seeds | trainable')
    assert '| A (source) | B | C | targets |' in head
    assert row == ('| x | 2 | 1,200 (200 + 1,000) | 5,000 | 75.00 (70.0-80.0)'
                   ' | 55.00 (50.0-60.0) | 45.00 (40.0-50.0) | 50.00 '
                   '(50.0-50.0) |')
    assert variant_name('a/domain-shift_sera-image_x_y.py') == 'sera-image'
    assert variant_name('a/other_cfg.py') == 'other_cfg'


# --------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------
def _managed_classes():
    """MMEngine's named-instance classes (loggers, message hubs,
    visualizers, scopes), each with its own registry of instances."""
    from mmengine.utils import ManagerMixin
    todo, seen = [ManagerMixin], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


@pytest.fixture
def in_process(monkeypatch):
    """Run the tool's ``python tools/{train,test}.py ...`` commands in this
    interpreter (the same scripts and arguments, without paying the imports
    for each of the 14 runs), and leave the process as it was: MMEngine's
    named instances (a later Runner of a config that names its visualizer
    would reuse one of these), torch threads, random states, environment.
    MMEngine's yapf pass over the config text it logs and dumps (about 4
    per run, half a second each) is skipped: the text stays as MMEngine
    writes it before formatting."""
    import random

    import mmengine.config.config as mmengine_config
    import numpy as np
    monkeypatch.setattr(mmengine_config, 'FormatCode',
                        lambda text, **kwargs: (text, False))
    monkeypatch.chdir(ROOT)
    instances = {cls: dict(cls._instance_dict)
                 for cls in _managed_classes()}
    threads = torch.get_num_threads()
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    environ = dict(os.environ)
    last_start = {}

    def run(cmd, log):
        assert cmd[0] == sys.executable
        assert cmd[1] in ('tools/train.py', 'tools/test.py')
        # an MMEngine Runner names its logger and message hub after the
        # config and the second: one run of a config per second
        if int(time.time()) == last_start.get(cmd[2]):
            time.sleep(1 - time.time() % 1)
        last_start[cmd[2]] = int(time.time())
        out = io.StringIO()  # stays open for the loggers that hold it
        argv = sys.argv
        sys.argv = list(cmd[1:])
        try:
            with contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(out):
                runpy.run_path(str(ROOT / cmd[1]), run_name='__main__')
        finally:
            sys.argv = argv
            Path(log).write_text(out.getvalue())

    monkeypatch.setattr(ds.cm, '_run', run)
    yield
    for cls in _managed_classes():
        cls._instance_dict.clear()
        cls._instance_dict.update(instances.get(cls, {}))
    torch.set_num_threads(threads)
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])
    os.environ.clear()
    os.environ.update(environ)


def _state(path):
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    return ckpt['state_dict']


def _last(work):
    return (Path(work) / 'last_checkpoint').read_text().strip()


def test_benchmark_end_to_end_at_a_toy_budget(tmp_path, in_process):
    work = tmp_path / 'work'
    report = ds.main([
        '--seeds', '0', '--jobs', '1', '--threads', '1', '--workers', '0',
        '--work-dir', str(work), '--data-root', str(tmp_path / 'ms'),
        '--pretrain-root', str(tmp_path / 'pre'), '--num-train', '2',
        '--num-val', '1', '--cfg-options', 'train_cfg.max_epochs=1'
    ])
    names = ['head-only', 'sera-image', 'spectralmoe',
             'spectralmoe-released']
    rows = {r['name']: r for r in report['variants']}
    assert list(rows) == names
    # the table: every variant x domain, mIoU in [0, 100]
    table = (work / 'domain_shift.md').read_text()
    saved = json.loads((work / 'domain_shift.json').read_text())
    assert saved['table'] == report['table']
    for name in names:
        assert sum(line.startswith(f'| {name} |')
                   for line in table.splitlines()) == 1
        for d in ('A', 'B', 'C'):
            stat = rows[name]['summary'][d]
            assert 0. <= stat['min'] <= stat['mean'] <= stat['max'] <= 100.
            assert rows[name]['runs']['0'][d]['mIoU'] == stat['mean']
    # the toy sets: 2 training scenes per domain
    meta = json.loads((tmp_path / 'pre' / 'meta.json').read_text())
    assert meta['seed'] == 1 and len(meta['domains']) == 8
    assert meta['splits'] == {'train': 2, 'val': 1}

    # the foundation files hold the pretrained towers
    found = report['foundations']
    assert set(found) == {'main', 'second'}
    tower = torch.load(found['main']['file'], weights_only=True)['state_dict']
    rgb = torch.load(found['second']['file'], weights_only=True)['state_dict']
    pre = _state(found['main']['checkpoint'])
    for k, v in tower.items():
        assert torch.equal(pre['backbone.backbone.' + k], v), k
    assert tower['patch_embed.proj.weight'].shape[1] == 6
    assert rgb['patch_embed.proj.weight'].shape[1] == 3

    # (a fresh model's tower is not the foundation: equality below means
    # the file was loaded)
    from mmseg_sera.apis.config import build_model, load_config
    fresh = build_model(load_config(str(ROOT / ds.VARIANTS[0])))
    assert not torch.equal(fresh.backbone.backbone.blocks[0].attn.qkv.weight,
                           tower['blocks.0.attn.qkv.weight'])

    # each variant: the foundation loaded and unchanged (frozen), the head
    # (and the adapters) trained
    for name in names:
        config = rows[name]['config']
        state = _state(_last(work / osp.splitext(osp.basename(config))[0] /
                             'seed0'))
        for k, v in tower.items():
            assert torch.equal(state['backbone.backbone.' + k], v), (name, k)
        head = [k for k in state if k.startswith('decode_head.')]
        assert head and any(not torch.equal(state[k], pre[k])
                            for k in head if k in pre)
        if name.startswith('spectralmoe'):
            for k, v in rgb.items():
                assert torch.equal(state['backbone.second.' + k], v), k
        adapters = [k for k in state if '.adapters.' in k]
        assert bool(adapters) == (name != 'head-only')
        if name.startswith('spectralmoe'):  # E x T x r: released 6, 100, 16
            assert state['backbone.backbone.adapters.0.experts.tokens_a'
                         ].shape == ((6, 100, 16) if name.endswith('released')
                                     else (4, 16, 8))
        if name == 'sera-image':  # zero-initialised, so it trained
            assert state['backbone.backbone.adapters.0.up_proj.weight'].abs(
            ).sum() > 0

    # trainable parameters: the head everywhere, plus the adapters
    p = {name: rows[name]['params'] for name in names}
    for name in names:
        assert p[name]['backbone_trainable'] == 0
        assert p[name]['second_trainable'] == 0
        assert p[name]['backbone'] == p['head-only']['backbone']
        assert p[name]['head_trainable'] == p['head-only']['head_trainable']
        assert p[name]['trainable'] == (p[name]['head_trainable'] +
                                        p[name]['adapters_trainable'])
    assert p['head-only']['adapters_trainable'] == 0
    assert p['head-only']['trainable'] == p['head-only']['head']
    assert 0 < p['sera-image']['adapters_trainable']
    assert p['sera-image']['frozen'] == p['head-only']['frozen']
    for name in ('spectralmoe', 'spectralmoe-released'):
        assert 0 < p[name]['adapters_trainable']
        assert p[name]['frozen'] == (p['head-only']['frozen'] +
                                     p[name]['second'])
        assert p[name]['second'] == sum(v.numel() for k, v in rgb.items()
                                        if k != 'pos_resampling')
    assert (p['spectralmoe-released']['adapters_trainable'] !=
            p['spectralmoe']['adapters_trainable'])


def test_counts_of_a_built_variant():
    from mmseg_sera.apis.config import build_model, load_config
    model = build_model(load_config(str(ROOT / ds.VARIANTS[1])))
    counts = count_parts(model)
    assert counts['backbone_trainable'] == 0 < counts['backbone']
    assert counts['adapters'] == counts['adapters_trainable'] > 0
    assert counts['trainable'] + counts['frozen'] == sum(
        p.numel() for p in model.parameters())


def test_usage_errors_and_a_set_of_another_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        ds.main(['--variants', 'configs/no_such.py'])
    assert err.value.code == 2
    assert 'config not found' in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        ds.main(['--source', 'D'])
    assert err.value.code == 2
    assert '--source D is not one of --domains' in capsys.readouterr().err
    generate_multispectral_set(str(tmp_path), num_train=1, num_val=1,
                               img_size=28, seed=3, progress=False)
    with pytest.raises(ValueError, match='written with seed 3'):
        ensure_set(str(tmp_path), seed=0, names=['A', 'B'])
    assert ensure_set(str(tmp_path), seed=3, names=['A'])['seed'] == 3
