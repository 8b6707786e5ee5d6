"""End to end through tools/train.py, tools/test.py and tools/dist_train.sh
with the tiny SERA config on a synthetic refer set."""
import glob
import json
import os
import os.path as osp
import shutil
import signal
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


# Runs whose numbers are compared with another process's: the same thread
# and worker counts in both, whatever else the machine is doing (the CPU plan
# would otherwise pick threads from the load, and rounding follows them).
PINNED = {'env_cfg.cpu_threads': 1, 'env_cfg.cpu_workers': 0,
          'default_hooks.checkpoint.interval': 1}


def _train(work_dir: str, data_root: str, epochs: int, *extra: str,
           runner: str = 'tools/train.py', check: bool = True):
    return run_tool([runner, TINY_CONFIG, '--work-dir', work_dir, *extra] +
                    tiny_cfg_options(data_root, **PINNED,
                                     **{'train_cfg.max_epochs': epochs}),
                    check=check)


def _weights(path: str) -> dict:
    return torch.load(path, weights_only=True)['state_dict']


def _assert_same_weights(path_a: str, path_b: str) -> None:
    a, b = _weights(path_a), _weights(path_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope='module')
def uninterrupted(synthetic_root, tmp_path_factory):
    """Two epochs in one go, a checkpoint after each."""
    work_dir = str(tmp_path_factory.mktemp('run_full'))
    _train(work_dir, synthetic_root, 2)
    return work_dir


def test_resume_continues_and_matches_uninterrupted(synthetic_root,
                                                    uninterrupted, tmp_path):
    work_dir = str(tmp_path / 'run_resumed')
    _train(work_dir, synthetic_root, 1)
    first = _train_losses(work_dir)
    ckpt = torch.load(_last_checkpoint(work_dir), weights_only=True)
    assert ckpt['meta']['epoch'] == 1 and 'rng_state' in ckpt

    _train(work_dir, synthetic_root, 2, '--resume')
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
    _assert_same_weights(_last_checkpoint(work_dir),
                         osp.join(uninterrupted, 'epoch_2.pth'))


# Runs tools/train.py and kills it (SIGKILL, as the OOM killer or `kill -9`
# would) while it writes epoch_2.pth: after the bytes went to the temporary
# file, before the rename that publishes them.
KILL_DURING_WRITE = """
import os, runpy, signal, sys
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == 'epoch_2.pth':
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv[0] = 'tools/train.py'
runpy.run_path('tools/train.py', run_name='__main__')
"""


def test_killed_while_writing_a_checkpoint_resumes_exactly(
        synthetic_root, uninterrupted, tmp_path):
    work_dir = str(tmp_path / 'killed')
    killer = tmp_path / 'kill_during_write.py'
    killer.write_text(KILL_DURING_WRITE)
    proc = _train(work_dir, synthetic_root, 2, runner=str(killer),
                  check=False)
    # run_tool puts sys.executable first: python kill_during_write.py ...
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The interrupted write left a partial file, never a damaged
    # epoch_2.pth, and last_checkpoint still names the complete epoch 1.
    assert sorted(f for f in os.listdir(work_dir) if 'pth' in f) == [
        'epoch_1.pth', 'epoch_2.pth.partial']
    assert _last_checkpoint(work_dir).endswith('epoch_1.pth')

    _train(work_dir, synthetic_root, 2, '--resume')
    assert not osp.exists(osp.join(work_dir, 'epoch_2.pth.partial'))
    _assert_same_weights(osp.join(work_dir, 'epoch_2.pth'),
                         osp.join(uninterrupted, 'epoch_2.pth'))


def test_resume_falls_back_past_a_truncated_checkpoint(
        synthetic_root, uninterrupted, tmp_path):
    work_dir = str(tmp_path / 'truncated')
    shutil.copytree(uninterrupted, work_dir)
    newest = osp.join(work_dir, 'epoch_2.pth')
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(newest)  # the copy's own pointer
    with open(newest, 'r+b') as f:  # what a full disk leaves
        f.truncate(osp.getsize(newest) // 3)

    # tools/test.py and init_model name the damaged file in one line.
    proc = run_tool(['tools/test.py', TINY_CONFIG, newest] +
                    tiny_cfg_options(synthetic_root), check=False)
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: cannot read checkpoint ' + newest)

    proc = _train(work_dir, synthetic_root, 2, '--resume')
    log = proc.stdout + proc.stderr
    assert f'skipping {newest}' in log
    assert 'resuming from ' + osp.join(work_dir, 'epoch_1.pth') in log
    _assert_same_weights(newest, osp.join(uninterrupted, 'epoch_2.pth'))


def test_resume_with_no_readable_checkpoint_stops_and_lists_them(
        synthetic_root, tmp_path):
    work_dir = tmp_path / 'broken'
    work_dir.mkdir()
    for name in ('epoch_1.pth', 'epoch_2.pth'):
        (work_dir / name).write_bytes(b'PK\x03\x04 cut short')
    proc = _train(str(work_dir), synthetic_root, 2, '--resume', check=False)
    assert proc.returncode != 0
    assert 'no readable checkpoint' in proc.stderr
    for name in ('epoch_1.pth', 'epoch_2.pth'):
        assert str(work_dir / name) in proc.stderr


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
