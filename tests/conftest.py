"""Fixtures shared by the end-to-end tests."""
import contextlib
import glob
import json
import os.path as osp
import subprocess
import sys
from typing import Iterator, List

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_CONFIG = osp.join(
    REPO, 'configs', 'sera',
    'sera_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')


# Tensor methods that read a tensor's values on the host: on a GPU each call
# waits for the device to catch up.
HOST_READS = ('__bool__', 'item', 'tolist', 'cpu', 'numpy', 'nonzero')


@contextlib.contextmanager
def count_host_reads() -> Iterator[List[str]]:
    """Inside the block every call of a :data:`HOST_READS` method is
    appended (by name) to the yielded list, and still does its work."""
    reads: List[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)

            def read(self, *args, _name=name, _real=real, **kwargs):
                reads.append(_name)
                return _real(self, *args, **kwargs)

            mp.setattr(torch.Tensor, name, read)
        yield reads


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory) -> str:
    """A small synthetic refer set written once per test session."""
    from mmseg_sera.datasets.synthetic import generate_refer_set
    root = str(tmp_path_factory.mktemp('synthetic_refer'))
    generate_refer_set(root, num_images=24, seed=0, progress=False)
    return root


def tiny_cfg_options(data_root: str, **extra) -> list:
    """``--cfg-options`` that point the tiny config at ``data_root`` and keep
    runs short and deterministic (no workers, no validation in training)."""
    opts = {
        'train_dataloader.dataset.data_root': data_root,
        'val_dataloader.dataset.data_root': data_root,
        'test_dataloader.dataset.data_root': data_root,
        'train_dataloader.batch_size': 8,
        'train_dataloader.num_workers': 0,
        'val_dataloader.num_workers': 0,
        'test_dataloader.num_workers': 0,
        'train_dataloader.persistent_workers': False,
        'val_dataloader.persistent_workers': False,
        'test_dataloader.persistent_workers': False,
        'train_cfg.val_interval': 1000,
        'default_hooks.logger.interval': 1,
    }
    opts.update(extra)
    return ['--cfg-options'] + [f'{k}={v}' for k, v in opts.items()]


def run_tool(args: list, timeout: int = 600, env: dict = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python tools/...`` (or a shell script) from the repository."""
    cmd = args if args[0].endswith('.sh') else [sys.executable] + args
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


def run_test_tool(config: str, ckpt: str, work_dir, options: list,
                  keys=('mIoU', 'oIoU', 'Pr@0.5')) -> dict:
    """Run ``tools/test.py`` and return the metrics it logged; each of
    ``keys`` must be a percentage."""
    run_tool(['tools/test.py', config, ckpt, '--work-dir', str(work_dir)] +
             list(options))
    logs = glob.glob(osp.join(str(work_dir), '*', '*.json'))
    assert logs, 'tools/test.py wrote no metrics'
    with open(logs[0]) as f:
        metrics = json.loads(f.readline())
    for key in keys:
        assert 0.0 <= metrics[key] <= 100.0, key
    return metrics
