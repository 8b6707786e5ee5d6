"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [options]``.

Flags as MMSegmentation's ``tools/test.py``.
"""
import argparse
import json
import os
import os.path as osp

from mmengine.config import DictAction
from mmengine.runner import Runner

from mmseg_sera.apis.config import load_run_config  # registers components
from mmseg_sera.engine import (CheckpointError, close_process_group,
                               read_checkpoint)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Test a referring segmentor')
    p.add_argument('config', help='config file path')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--work-dir', help='directory for the evaluation logs')
    p.add_argument('--out', help='directory for the results: OUT/metrics.json '
                   '(mIoU, oIoU, Pr@X; gIoU, cIoU, N-acc, T-acc with a GRES '
                   'protocol) and OUT/per_expression.json (ref_id, sent_id, '
                   'IoU, I, U, no_target, pred_no_target of every sentence)')
    p.add_argument('--show', action='store_true', help='show predictions')
    p.add_argument('--show-dir', help='directory to save overlay pictures')
    p.add_argument('--show-interval', type=int, default=None,
                   help='draw every N-th test batch (default: the interval '
                   'of the visualization hook in the config)')
    p.add_argument('--wait-time', type=float, default=2,
                   help='seconds each picture is shown with --show')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config entries')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                   default='none', help='job launcher')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def enable_visualization(cfg, args) -> None:
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise RuntimeError('--show/--show-dir need a "visualization" entry in '
                           'default_hooks (SegVisualizationHook)')
    hook = hooks.visualization
    hook.draw = True
    if args.show_interval is not None:
        hook.interval = args.show_interval
    if args.show:
        hook.show = True
        hook.wait_time = args.wait_time
    if args.show_dir:
        cfg.visualizer.save_dir = args.show_dir
        cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]


def main(argv=None) -> None:
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    try:  # a damaged file is named in one line, not deep in the runner
        read_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise SystemExit(f'error: {exc}') from None
    cfg = load_run_config(args.config, args.cfg_options, args.launcher,
                          args.work_dir)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, args)
    if args.out is not None:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(
            cfg.test_evaluator, dict) else list(cfg.test_evaluator)
        for evaluator in cfg.test_evaluator:
            if evaluator.get('type') == 'ReferSegMetric':
                evaluator['out_file'] = osp.join(args.out,
                                                 'per_expression.json')
    runner = Runner.from_cfg(cfg)
    try:
        metrics = runner.test()
        if args.out is not None and runner.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(osp.join(args.out, 'metrics.json'), 'w') as f:
                json.dump({k: float(v) for k, v in metrics.items()}, f,
                          indent=1)
    finally:
        close_process_group()


if __name__ == '__main__':
    main()
