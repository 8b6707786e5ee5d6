"""Train a referring segmentor: ``python tools/train.py CONFIG [options]``.

The flags are MMSegmentation's; distributed runs use ``tools/dist_train.sh``.
"""
import argparse
import logging
import os

import torch
from mmengine.config import DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

from mmseg_sera.apis.config import load_run_config  # registers components
from mmseg_sera.engine import (CheckpointError, close_process_group,
                               find_resume_checkpoint)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Train a referring segmentor')
    p.add_argument('config', help='config file path')
    p.add_argument('--work-dir', help='directory for logs and checkpoints')
    p.add_argument('--resume', action='store_true',
                   help='resume from the newest readable checkpoint in the '
                   'work dir (a damaged newest one is skipped, with a '
                   'warning naming it)')
    p.add_argument('--amp', action='store_true',
                   help='automatic mixed precision: AmpOptimWrapper (float16 '
                   'with dynamic loss scaling) on a GPU, CPUAmpOptimWrapper '
                   '(bfloat16) without one')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config entries, e.g. '
                   'train_cfg.max_iters=100 model.decode_head.threshold=0.35')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                   default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK.
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def enable_amp(cfg) -> None:
    """Switch the config's ``OptimWrapper`` to mixed precision."""
    wrapper = cfg.optim_wrapper
    kind = wrapper.get('type', 'OptimWrapper')
    if kind in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        print_log('AMP is already enabled in the config.', logger='current',
                  level=logging.WARNING)
        return
    if kind != 'OptimWrapper':
        raise ValueError('--amp needs optim_wrapper.type == "OptimWrapper", '
                         f'got {kind!r}')
    if torch.cuda.is_available():
        wrapper.type = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
    else:
        wrapper.type = 'CPUAmpOptimWrapper'
        wrapper.setdefault('dtype', 'bfloat16')


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.cfg_options, args.launcher,
                          args.work_dir)
    if args.amp:
        enable_amp(cfg)
    cfg.resume = args.resume
    if args.resume and cfg.get('load_from') is None:
        try:
            cfg.load_from = find_resume_checkpoint(cfg.work_dir)
        except CheckpointError as exc:
            raise SystemExit(f'error: {exc}') from None
    runner = Runner.from_cfg(cfg)
    try:
        runner.train()
    finally:
        close_process_group()


if __name__ == '__main__':
    main()
