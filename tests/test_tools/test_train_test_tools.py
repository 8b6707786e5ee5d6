"""End to end through tools/train.py, tools/test.py and tools/dist_train.sh
with the tiny SERA config on a synthetic refer set."""
import glob
import json
import os
import os.path as osp
import sys

import pytest
import torch

from ..conftest import TINY_CONFIG, run_tool, tiny_cfg_options


def _train_losses(work_dir: str) -> list:
    """(iter, loss) of every logged training step, over all runs in the
    work dir (a resumed run logs into a new timestamped folder)."""
    rows = []
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data',
                                          'scalars.json'))):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if 'loss' in rec:
                    rows.append((rec['iter'], rec['loss']))
    return rows


def _last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


@pytest.fixture(scope='module')
def uninterrupted(synthetic_root, tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('run_full'))
    run_tool(['tools/train.py', TINY_CONFIG, '--work-dir', work_dir] +
             tiny_cfg_options(synthetic_root, **{'train_cfg.max_epochs': 2}))
    return work_dir


def test_resume_continues_and_matches_uninterrupted(synthetic_root,
                                                    uninterrupted, tmp_path):
    work_dir = str(tmp_path / 'run_resumed')
    run_tool(['tools/train.py', TINY_CONFIG, '--work-dir', work_dir] +
             tiny_cfg_options(synthetic_root, **{'train_cfg.max_epochs': 1}))
    first = _train_losses(work_dir)
    ckpt = torch.load(_last_checkpoint(work_dir), weights_only=True)
    assert ckpt['meta']['epoch'] == 1 and 'rng_state' in ckpt

    run_tool(['tools/train.py', TINY_CONFIG, '--work-dir', work_dir,
              '--resume'] +
             tiny_cfg_options(synthetic_root, **{'train_cfg.max_epochs': 2}))
    resumed = _train_losses(work_dir)
    full = _train_losses(uninterrupted)

    iters_per_epoch = len(first)
    assert iters_per_epoch > 1
    # The iteration count continues where the first run stopped ...
    assert [it for it, _ in resumed] == list(range(1, 2 * iters_per_epoch + 1))
    assert [it for it, _ in full] == [it for it, _ in resumed]
    # ... and every loss after the resume equals the uninterrupted run's.
    for (it_a, loss_a), (it_b, loss_b) in zip(full, resumed):
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-6), it_a
    final = torch.load(_last_checkpoint(work_dir), weights_only=True)
    assert final['meta']['iter'] == 2 * iters_per_epoch


def _scalars(work_dir: str) -> list:
    rows = []
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                   'scalars.json')):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    return rows


def test_training_logs_expert_utilisation(uninterrupted):
    rows = [r for r in _scalars(uninterrupted) if 'loss' in r]
    assert rows
    for row in rows:
        util = {k: v for k, v in row.items() if k.startswith('util_')}
        # 4 fusion experts and 2 light experts in each of blocks 1 and 3
        assert len(util) == 8, sorted(util)
        for module in ('neck', 'adapter1', 'adapter3'):
            shares = [v for k, v in util.items()
                      if k.startswith(f'util_{module}_')]
            assert all(0.0 <= v <= 1.0 for v in shares)
            assert sum(shares) == pytest.approx(1.0), (module, row['iter'])


def test_amp_on_cpu_trains_in_bfloat16(synthetic_root, tmp_path):
    work_dir = str(tmp_path / 'amp')
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    run_tool(['tools/train.py', TINY_CONFIG, '--work-dir', work_dir,
              '--amp'] +
             tiny_cfg_options(synthetic_root, **{'train_cfg.max_epochs': 1}),
             env=env)
    dumped = glob.glob(osp.join(work_dir, '*.py'))
    assert len(dumped) == 1
    with open(dumped[0]) as f:
        text = f.read()
    assert "type='CPUAmpOptimWrapper'" in text
    assert "dtype='bfloat16'" in text
    losses = [loss for _, loss in _train_losses(work_dir)]
    assert losses and all(0.0 < loss < 10.0 for loss in losses)
    ckpt = torch.load(_last_checkpoint(work_dir), weights_only=True)
    assert all(v.dtype == torch.float32
               for v in ckpt['state_dict'].values() if v.is_floating_point())


def test_tools_test_evaluates_checkpoint(synthetic_root, uninterrupted,
                                         tmp_path):
    ckpt = _last_checkpoint(uninterrupted)
    out_dir = tmp_path / 'out'
    show_dir = tmp_path / 'show'
    run_tool(['tools/test.py', TINY_CONFIG, ckpt, '--work-dir',
              str(tmp_path / 'eval'), '--out', str(out_dir), '--show-dir',
              str(show_dir), '--show-interval', '1'] +
             tiny_cfg_options(synthetic_root))
    logs = glob.glob(str(tmp_path / 'eval' / '*' / '*.json'))
    assert logs, 'tools/test.py wrote no metrics'
    with open(logs[0]) as f:
        metrics = json.loads(f.readline())
    for key in ('mIoU', 'oIoU', 'Pr@0.5', 'Pr@0.9'):
        assert 0.0 <= metrics[key] <= 100.0
    with open(out_dir / 'metrics.json') as f:
        assert json.load(f)['mIoU'] == pytest.approx(metrics['mIoU'])
    with open(out_dir / 'per_expression.json') as f:
        per_expr = json.load(f)
    num_val_sentences = len(per_expr)
    assert num_val_sentences > 0
    mean_iou = 100 * sum(r['iou'] for r in per_expr) / num_val_sentences
    assert metrics['mIoU'] == pytest.approx(mean_iou, abs=1e-3)
    pictures = glob.glob(str(show_dir / '**' / '*.png'), recursive=True)
    assert pictures, '--show-dir wrote no picture'


def test_dist_train_two_cpu_processes(synthetic_root, tmp_path):
    work_dir = str(tmp_path / 'dist')
    env = dict(os.environ, PYTHON=sys.executable, PORT='29517',
               CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    proc = run_tool(['tools/dist_train.sh', TINY_CONFIG, '2', '--work-dir',
                     work_dir] +
                    tiny_cfg_options(synthetic_root,
                                     **{'train_cfg.max_epochs': 1}),
                    env=env)
    assert 'gloo' in proc.stdout + proc.stderr
    ckpt = torch.load(_last_checkpoint(work_dir), weights_only=True)
    assert ckpt['meta']['epoch'] == 1
    assert any(k.startswith('neck.router') for k in ckpt['state_dict'])


@pytest.mark.parametrize('argv,missing', [
    (['tools/train.py', 'configs/sera/no_such_config.py'],
     'configs/sera/no_such_config.py'),
    (['tools/test.py', TINY_CONFIG, '/nonexistent/ckpt.pth'],
     '/nonexistent/ckpt.pth'),
])
def test_missing_files_are_named(argv, missing):
    proc = run_tool(argv, check=False)
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert 'not found' in proc.stderr


def test_missing_dataset_root_is_named(tmp_path):
    root = str(tmp_path / 'no_data_here')
    proc = run_tool(['tools/train.py', TINY_CONFIG, '--work-dir',
                     str(tmp_path / 'wd')] + tiny_cfg_options(root),
                    check=False)
    assert proc.returncode != 0
    assert root in proc.stderr
