"""Train several configs over several seeds and compare them on held-out
splits, with the spread over seeds.

    python tools/analysis_tools/compare_methods.py CONFIG [CONFIG ...]
        [--seeds 0 1] [--splits testA testB] [--jobs 2] [--threads 1]
        [--workers 0] [--work-dir work_dirs/compare] [--reuse]
        [--json FILE] [--cfg-options KEY=VALUE ...]

Each (config, seed) is trained by ``tools/train.py`` with
``randomness.seed=SEED`` and a fixed thread / worker count (so that a run's
random stream does not depend on how busy the machine was), in
``WORK_DIR/<config name>/seed<SEED>``, then its last checkpoint is tested on
every split by ``tools/test.py``. ``--jobs`` runs that many trainings at
once (with ``--threads 1`` two jobs use the two cores of a small machine
without stalling each other). ``--reuse`` skips trainings and tests whose
outputs exist. The table gives, per config and split, the mean over seeds
and the range (min - max) of mIoU, oIoU, Pr@0.5 and the per-kind mIoU.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
KEYS = ('mIoU', 'oIoU', 'Pr@0.5', 'mIoU_attribute', 'mIoU_position',
        'mIoU_relation')


def _run(cmd: List[str], log: str) -> None:
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}); '
                           f'log {log}:\n{tail}')


def run_one(args, config: str, seed: int, *, options: Sequence[str] = (),
            tests: Optional[Dict[str, List[str]]] = None
            ) -> Dict[str, Dict[str, float]]:
    """Train one (config, seed) and test it; test name -> metrics.

    Args:
        options: more ``KEY=VALUE`` overrides of this run (training and
            tests), after ``args.cfg_options``.
        tests: test name -> its own ``KEY=VALUE`` overrides (e.g. another
            ``test_dataloader.dataset.data_root``); default: one test per
            ``args.splits``, ``test_dataloader.dataset.split=SPLIT``. An
            empty mapping only trains.
    """
    name = osp.splitext(osp.basename(config))[0]
    work = osp.join(args.work_dir, name, f'seed{seed}')
    os.makedirs(work, exist_ok=True)
    env_opts = [f'env_cfg.cpu_threads={args.threads}',
                f'env_cfg.cpu_workers={args.workers}']
    extra = [f'{k}={v}' for k, v in (args.cfg_options or {}).items()]
    extra += list(options)
    if tests is None:
        tests = {split: [f'test_dataloader.dataset.split={split}']
                 for split in args.splits}
    last = osp.join(work, 'last_checkpoint')
    if not (args.reuse and osp.isfile(last)):
        _run([sys.executable, 'tools/train.py', config, '--work-dir', work,
              '--cfg-options', f'randomness.seed={seed}', *env_opts, *extra],
             osp.join(work, 'train.log'))
    with open(last) as f:
        ckpt = f.read().strip()
    out = {}
    for split, test_opts in tests.items():
        metrics = osp.join(work, split, 'metrics.json')
        if not (args.reuse and osp.isfile(metrics)):
            _run([sys.executable, 'tools/test.py', config, ckpt,
                  '--work-dir', osp.join(work, f'test_{split}'), '--out',
                  osp.join(work, split), '--cfg-options', *test_opts,
                  *env_opts, *extra], osp.join(work, f'test_{split}.log'))
        with open(metrics) as f:
            out[split] = json.load(f)
    print(f'done: {name} seed {seed}: ' + ', '.join(
        f'{s} mIoU {m.get("mIoU", float("nan")):.2f}'
        for s, m in out.items()), flush=True)
    return out


def summarise(results: Dict, configs: List[str], seeds: List[int],
              splits: List[str]) -> List[str]:
    """Markdown rows: mean over seeds and the range, per config and split."""
    head = ('| config | split | seeds | ' + ' | '.join(KEYS) + ' |')
    lines = [head, '|' + '---|' * 3 + '---:|' * len(KEYS)]
    for config in configs:
        name = osp.splitext(osp.basename(config))[0]
        for split in splits:
            cells = []
            for key in KEYS:
                vals = [results[(config, s)][split].get(key) for s in seeds]
                vals = [v for v in vals if v is not None]
                if not vals:
                    cells.append('')
                    continue
                cells.append(f'{statistics.fmean(vals):.2f} '
                             f'({min(vals):.1f}-{max(vals):.1f})')
            lines.append(f'| {name} | {split} | {len(seeds)} | ' +
                         ' | '.join(cells) + ' |')
    return lines


def main(argv=None) -> int:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('configs', nargs='+')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--splits', nargs='+', default=['testA', 'testB'])
    p.add_argument('--jobs', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--work-dir', default='work_dirs/compare')
    p.add_argument('--reuse', action='store_true')
    p.add_argument('--json', help='write all metrics to this file')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = p.parse_args(argv)
    for config in args.configs:
        if not osp.isfile(osp.join(ROOT, config)) and not osp.isfile(config):
            p.error(f'config not found: {config}')
    runs = [(c, s) for s in args.seeds for c in args.configs]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {run: pool.submit(run_one, args, *run) for run in runs}
        results = {run: f.result() for run, f in futures.items()}
    print('\n'.join(summarise(results, args.configs, args.seeds,
                              args.splits)))
    if args.json:
        import mmengine
        mmengine.dump(
            dict(threads=args.threads, workers=args.workers,
                 runs=[dict(config=c, seed=s, metrics=results[(c, s)])
                       for c, s in runs]), args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
