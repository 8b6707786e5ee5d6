"""Time a referring segmentor against its own frozen backbone.

    python tools/analysis_tools/benchmark.py CONFIG [CONFIG2]
        [--batch-size 2] [--img-size 448] [--device cpu|cuda]
        [--repeats 3] [--warmup 1] [--max-iqr 0.1] [--max-time 30]
        [--interleave] [--threads N] [--amp bf16|fp16] [--breakdown]
        [--profile N] [--explicit-attn-ref] [--json FILE]
        [--cfg-options KEY=VALUE ...] [--cfg-options2 KEY=VALUE ...]

Times (a) the frozen backbone forward, (b) the floor, (c) a training step,
(d) inference and, with ``--explicit-attn-ref``, (a') and (b'), as medians
and ratios to (a) (and (a')); CONFIG2 or ``--cfg-options2`` (CONFIG again
plus these options) adds a second model and B / A.  ``--repeats`` is the
minimum number of timed runs: ``Timer.adaptive_autorange`` adds runs while
IQR / median >= ``--max-iqr``, up to ``--max-time`` seconds per phase
(``--interleave``: in rounds over all phases, by the same rule).
``--max-spread`` and ``--max-attempts``, the old re-measuring rule, are
accepted and ignored.  What is measured and how:
:mod:`mmseg_sera.apis.benchmark` and docs/benchmarks.md.  On a shared CPU
machine pass ``--threads 1``.
"""
import argparse
import os.path as osp
from typing import Dict, List, Optional

import mmengine
from mmengine.config import DictAction
from prettytable import PrettyTable
from torch.utils import benchmark as tbench

from mmseg_sera.apis import benchmark as bench

MEM_HEAD = {'cuda_allocated': 'peak CUDA MB', 'cpu_rss': 'peak RSS MB',
            'cpu_ru_maxrss': 'process peak RSS MB'}
TRAIN_PARTS = ('forward', 'fwd_text_encoder', 'fwd_backbone_blocks',
               'fwd_adapters', 'fwd_neck', 'fwd_head', 'fwd_losses',
               'fwd_other', 'backward', 'bwd_losses', 'bwd_head',
               'bwd_neck', 'bwd_adapters', 'bwd_backbone_blocks',
               'bwd_text_encoder_other', 'optimizer', 'step')
INFERENCE_PARTS = ('text_encoder', 'backbone_blocks', 'adapters', 'neck',
                   'head', 'other', 'inference')


def _mem(r: Dict) -> str:
    inc = r['mem_increase_mb']
    return f'{r["peak_mem_mb"]:.0f}' + (
        f' (+{inc:.0f})' if inc is not None else '')


def _parts_table(title: str, parts: Dict, keys, total: str) -> str:
    table = PrettyTable(['part', 'seconds', f'% of {total}'], title=title)
    for key in keys:
        text = key.replace('_', ' ')
        table.add_row([('  ' + text[4:]) if key[:4] in ('fwd_', 'bwd_')
                       else text, f'{parts[key]:.3f}',
                       f'{100 * parts[key] / parts[total]:.1f}'])
    table.align['part'] = 'l'
    return table.get_string()


def format_tables(report: Dict) -> str:
    """The ``Compare`` table of the medians; per config the ratios to (a)
    (``*``: disturbed), the IQR, the runs and the peak memory, and B / A;
    the ratios to (a'), the breakdowns and the top operators."""
    runs, env = report['results'], report['env']
    lines = [
        f'{tag}: {r["label"]} (params {r["params"]["total"]:,}, trainable '
        f'{r["params"]["trainable"]:,}, backbone trainable '
        f'{r["params"]["backbone_trainable_percent"]:.3f} %)'
        for tag, r in zip('AB', runs)]
    lines.append(', '.join(f'{k} {v}' for k, v in env.items()))
    cmp = tbench.Compare([m for r in runs for m in r['measurements'].values()])
    cmp.trim_significant_figures()
    lines.append(str(cmp))
    tags = 'AB'[:len(runs)]
    mem_head = MEM_HEAD[runs[0]['phases']['frozen_forward']['mem_kind']]
    table = PrettyTable(
        ['phase'] + [f'{t} x (a)' for t in tags] + [f'{t} IQR %' for t in tags]
        + [f'{t} runs' for t in tags] + ['B / A'] * (len(runs) - 1) +
        [f'{t} {mem_head} (+incr.)' for t in tags])
    for name in runs[0]['phases']:
        rs = [r['phases'][name] for r in runs]
        table.add_row(
            [bench.PHASE_LABELS[name]] +
            [f'{r["ratio"]:.2f}' + (' *' if r['disturbed'] else '')
             for r in rs] +
            [f'{100 * r["iqr_s"] / r["median_s"]:.1f}' for r in rs] +
            [r['runs'] for r in rs] +
            [f'{report["b_over_a"][name]:.2f}' for _ in runs[1:]] +
            [_mem(r) for r in rs])
    table.align = 'r'
    table.align['phase'] = 'l'
    lines.append(table.get_string())
    lines.append('* = disturbed (IQR / median above --max-iqr when '
                 '--max-time ran out). load average before '
                 f'{report["loadavg_before"]}, after '
                 f'{report["loadavg_after"]}')
    for tag, run in zip(tags, runs):
        r = run['phases']
        if 'frozen_forward_explicit' in r:
            lines.append(f"{tag}: x (a') = ratio to the explicit-attention "
                         'frozen forward: ' + ', '.join(
                             f'{bench.PHASE_LABELS[n].split(" ")[0]} '
                             f'{r[n]["ratio_explicit"]:.2f}'
                             for n in ('frozen_fwd_bwd_explicit',
                                       'train_step', 'inference')))
        if 'breakdown' in run:
            lines.append(_parts_table(
                f'training step breakdown: {run["label"]}',
                run['breakdown'], TRAIN_PARTS, 'step'))
            lines.append(_parts_table(
                f'inference breakdown: {run["label"]}',
                run['breakdown_inference'], INFERENCE_PARTS, 'inference'))
        if 'profile' in run:
            table = PrettyTable(['op', 'calls', 'self CPU s', 'share %',
                                 'self CPU MB', 'input shapes'], title=(
                                     'top operators, one training step: '
                                     + run['label']))
            for row in run['profile']:
                table.add_row([row['op'], row['calls'],
                               f'{row["self_cpu_s"]:.3f}',
                               f'{100 * row["share"]:.1f}',
                               f'{row["self_cpu_mem_mb"]:.1f}',
                               str(row['input_shapes'])[:60]])
            table.align = 'l'
            lines.append(table.get_string())
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Time training and inference of a referring segmentor '
        'against its frozen backbone')
    p.add_argument('config', help='config file path')
    p.add_argument('config2', nargs='?',
                   help='second config, measured on the same batch')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--img-size', type=int, default=448)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--repeats', type=int, default=3,
                   help='minimum number of timed runs per phase')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed calls per phase before timing')
    p.add_argument('--max-iqr', type=float, default=0.1,
                   help='time more runs while IQR / median is at least '
                   'this (adaptive_autorange threshold)')
    p.add_argument('--max-time', type=float, default=30.,
                   help='stop adding runs once a phase\'s timed total '
                   'exceeds this many seconds')
    p.add_argument('--max-spread', type=float,
                   help='ignored (old re-measuring rule; see --max-iqr)')
    p.add_argument('--max-attempts', type=int,
                   help='ignored (old re-measuring rule; see --max-time)')
    p.add_argument('--interleave', action='store_true',
                   help='time the phases round-robin (robust ratios on a '
                   'machine whose speed drifts)')
    p.add_argument('--threads', type=int,
                   help='torch.set_num_threads (default: torch\'s)')
    p.add_argument('--amp', choices=sorted(bench.AMP_DTYPES),
                   help='torch.autocast with this dtype')
    p.add_argument('--breakdown', action='store_true',
                   help='split a training step and predict per component')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help='list the N operators with most self CPU time')
    p.add_argument('--explicit-attn-ref', action='store_true',
                   help="also time (a') and (b'): (a) and (b) with the "
                   'backbone attention as explicit matmuls (the official '
                   'DINOv2 path without xFormers)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', metavar='FILE', help='write the results here')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override entries of both configs')
    p.add_argument('--cfg-options2', nargs='+', action=DictAction,
                   help='override entries of the second config only (the '
                   'second config defaults to the first)')
    args = p.parse_args(argv)
    if args.cfg_options2 and args.config2 is None:
        args.config2 = args.config
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    report = bench.run(
        args.config, args.config2, cfg_options2=args.cfg_options2,
        batch_size=args.batch_size, img_size=args.img_size,
        device=args.device, threads=args.threads,
        cfg_options=args.cfg_options, amp=args.amp,
        explicit_ref=args.explicit_attn_ref, breakdown=args.breakdown,
        profile_top=args.profile, seed=args.seed, repeats=args.repeats,
        warmup=args.warmup, max_iqr=args.max_iqr, max_time=args.max_time,
        interleave=args.interleave)
    print(format_tables(report))
    if args.json:
        mmengine.mkdir_or_exist(osp.dirname(osp.abspath(args.json)))
        mmengine.dump(bench.to_json(report), args.json, indent=2)
        print(f'written {args.json}')
    return report


if __name__ == '__main__':
    main()
