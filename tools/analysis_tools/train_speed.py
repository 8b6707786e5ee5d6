"""Training iterations per second, on a quiet machine and beside another
torch job, for several thread / worker settings side by side.

    python tools/analysis_tools/train_speed.py CONFIG [--iters 30]
        [--warmup 5] [--settings plan default ...] [--no-busy]
        [--competitor-nice 19] [--late-competitor SECONDS [--settle 60]]
        [--json FILE] [--cfg-options KEY=VALUE ...]

Each setting runs in a fresh process (the OpenMP wait policy is read when
torch loads), which builds the runner of CONFIG (model, optimizer, the real
train dataloader) and times ``warmup + iters`` training steps, data loading
included; the median step counts. Settings:

    plan       the thread/worker plan tools/train.py uses (``apply_cpu_plan``)
    default    PyTorch's threads (one per core) and the config's workers
    T,W        T intra-op threads, at most W workers (e.g. ``1,0``)
    +passive   suffix: OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep)
    +noreplan  suffix: env_cfg.cpu_replan=False (no CPUPlanHook)

Busy runs start a competing job first: a torch training loop of a small CNN
with PyTorch's default threads and wait policy, as another user's job would
be (niced with ``nice -n 19`` unless ``--competitor-nice`` says otherwise),
and stop it afterwards. Its own speed is not
reported. Runs go one after the other, never two measured ones at once.

``--late-competitor S`` starts the competitor S seconds *after* the
measured process instead, as when another job starts while a run trains:
the start-up plan saw a quiet machine, and only the re-planning hook
(``CPUPlanHook``, which the child drives as the training loop would) can
react. Steps are then timed from ``--settle`` seconds after the competitor
started.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

COMPETITOR = """
import torch, torch.nn as nn
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32, ))
while True:
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
"""


def parse_setting(text: str) -> Dict:
    """``plan`` | ``default`` | ``T,W``, optionally ``+passive``."""
    name, *suffixes = text.split('+')
    unknown = set(suffixes) - {'passive', 'noreplan'}
    if unknown:
        raise ValueError(f'unknown suffix +{unknown.pop()} in {text!r}')
    out = dict(name=text, passive='passive' in suffixes,
               replan='noreplan' not in suffixes)
    if name == 'plan':
        out.update(plan=True)
    elif name == 'default':
        out.update(plan=False)
    else:
        try:
            threads, workers = (int(v) for v in name.split(','))
        except ValueError:
            raise ValueError(f'setting {text!r} is not plan, default or '
                             'T,W') from None
        out.update(plan=True, threads=threads, workers=workers)
    return out


def child(args) -> None:
    """Time training steps in this process and print one JSON line."""
    import torch
    from mmengine.runner import Runner

    from mmseg_sera.apis.config import load_run_config
    setting = json.loads(args.child)
    opts = dict(args.cfg_options or {})
    opts['env_cfg.cpu_plan'] = setting['plan']
    opts['env_cfg.cpu_replan'] = setting['replan']
    if 'threads' in setting:
        opts['env_cfg.cpu_threads'] = setting['threads']
        opts['env_cfg.cpu_workers'] = setting['workers']
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = load_run_config(args.config, opts, 'none', work_dir)
        cfg.default_hooks.logger.interval = 10**6
        runner = Runner.from_cfg(cfg)
        loader = runner.build_dataloader(cfg.train_dataloader)
        wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
        model = runner.model
        model.train()
        hook = None
        if any(h.get('type') == 'CPUPlanHook'
               for h in cfg.get('custom_hooks', [])):
            from mmseg_sera.engine import CPUPlanHook
            hook = CPUPlanHook()
            hook.before_train(runner)
        # with a late competitor, time the steps from `settle` seconds
        # after it started
        start_at = (args.competitor_at + args.settle
                    if args.competitor_at else 0.)
        times: List[float] = []
        steps = args.warmup + args.iters
        while len(times) < steps:
            it = iter(loader)
            t0 = time.perf_counter()
            for data in it:
                model.train_step(data, wrapper)
                if hook is not None:
                    hook.after_train_iter(runner, len(times))
                t1 = time.perf_counter()
                if time.time() >= start_at:
                    times.append(t1 - t0)
                t0 = t1
                if len(times) == steps:
                    break
        timed = times[args.warmup:]
        print('RESULT ' + json.dumps(dict(
            threads=torch.get_num_threads(),
            workers=cfg.train_dataloader.num_workers,
            median_s=statistics.median(timed),
            mean_s=statistics.fmean(timed))), flush=True)


def run_one(args, setting: Dict, busy: bool) -> Dict:
    env = dict(os.environ)
    env.pop('OMP_WAIT_POLICY', None)
    if setting['passive']:
        env['OMP_WAIT_POLICY'] = 'PASSIVE'
    competitor = None
    late = busy and args.late_competitor is not None

    def start_competitor():
        return subprocess.Popen(
            ['nice', '-n', str(args.competitor_nice), sys.executable, '-c',
             COMPETITOR],
            env={k: v for k, v in os.environ.items()
                 if k != 'OMP_WAIT_POLICY'})

    if busy and not late:
        competitor = start_competitor()
        time.sleep(3)  # let it reach its loop before the plan probes
    cmd = [sys.executable, osp.abspath(__file__), args.config,
           '--iters', str(args.iters), '--warmup', str(args.warmup),
           '--settle', str(args.settle), '--child', json.dumps(setting)]
    if late:
        cmd += ['--competitor-at', str(time.time() + args.late_competitor)]
    if args.cfg_options:
        cmd += ['--cfg-options'] + [f'{k}={v}'
                                    for k, v in args.cfg_options.items()]
    try:
        child_proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        if late:
            try:
                child_proc.wait(timeout=args.late_competitor)
            except subprocess.TimeoutExpired:
                competitor = start_competitor()
        stdout, stderr = child_proc.communicate()
        proc = subprocess.CompletedProcess(cmd, child_proc.returncode,
                                           stdout, stderr)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    lines = [ln for ln in proc.stdout.splitlines()
             if ln.startswith('RESULT ')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f'setting {setting["name"]} failed:\n'
                           f'{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
    out = json.loads(lines[-1][len('RESULT '):])
    out.update(setting=setting['name'], busy=busy)
    return out


def main(argv=None) -> int:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config')
    p.add_argument('--iters', type=int, default=30)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--settings', nargs='+',
                   default=['default', 'plan', 'plan+passive'])
    p.add_argument('--competitor-nice', type=int, default=19,
                   help='niceness of the competing job (0: same priority)')
    p.add_argument('--no-busy', action='store_true',
                   help='only the quiet machine')
    p.add_argument('--late-competitor', type=float, default=None,
                   metavar='SECONDS',
                   help='start the competitor this long after the measured '
                   'run (default: before it)')
    p.add_argument('--settle', type=float, default=60.,
                   help='with --late-competitor: time steps from this long '
                   'after the competitor started')
    p.add_argument('--json', help='write the results to this file')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--competitor-at', type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    try:
        settings = [parse_setting(s) for s in args.settings]
    except ValueError as err:
        p.error(str(err))
    rows = []
    for busy in ((False, ) if args.no_busy else (False, True)):
        for setting in settings:
            rows.append(run_one(args, setting, busy))
            r = rows[-1]
            print(f'{r["setting"]:>14} {"busy " if busy else "quiet"} '
                  f'{r["threads"]} thread(s) {r["workers"]} worker(s): '
                  f'{r["median_s"]:.3f} s/iter, {1 / r["median_s"]:.2f} it/s',
                  flush=True)
    quiet = {r['setting']: r['median_s'] for r in rows if not r['busy']}
    print('\n| setting | threads / workers (quiet, busy) | quiet s/iter '
          '| busy s/iter | busy / quiet |')
    print('|---|---|---:|---:|---:|')
    for s in settings:
        q = next(r for r in rows if r['setting'] == s['name']
                 and not r['busy'])
        b = next((r for r in rows if r['setting'] == s['name']
                  and r['busy']), None)
        tw = f'{q["threads"]}/{q["workers"]}'
        if b is None:
            print(f'| {s["name"]} | {tw} | {q["median_s"]:.3f} | | |')
        else:
            print(f'| {s["name"]} | {tw}, {b["threads"]}/{b["workers"]} | '
                  f'{q["median_s"]:.3f} | {b["median_s"]:.3f} | '
                  f'{b["median_s"] / quiet[s["name"]]:.2f} |')
    if args.json:
        import mmengine
        mmengine.dump(dict(config=args.config, iters=args.iters,
                           warmup=args.warmup, rows=rows), args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
