"""Domain-shift benchmark on the synthetic multispectral set: a frozen
stand-in foundation, three ways to adapt it, trained on one sensor domain
and tested on every domain.

    python tools/analysis_tools/domain_shift.py [--seeds 0 1] [--jobs 2]
        [--threads 1] [--workers 0] [--work-dir work_dirs/domain_shift]
        [--domains A B C] [--source A] [--foundation-seed 0] [--reuse]
        [--variants CFG ...] [--pretrain CFG] [--pretrain-rgb CFG]
        [--data-root DIR] [--pretrain-root DIR] [--num-train N]
        [--num-val N] [--json FILE] [--markdown FILE]
        [--cfg-options KEY=VALUE ...] [--pretrain-cfg-options KEY=VALUE ...]

1. data: writes the benchmark set (``--data-root``, domains A, B, C, seed
   0) and the pretraining set (``--pretrain-root``; other scenes, random
   sensors: the ``pretrain_set`` of the pretraining config) if their
   ``meta.json`` is missing. ``--num-train`` / ``--num-val`` shrink both
   (scenes per domain) for smoke runs.
2. foundation, once for all seeds (``--foundation-seed``, as one released
   model serves every fine-tuning): ``--pretrain`` (the 6-band tower) and,
   when a variant's second tower loads one, ``--pretrain-rgb`` train fully
   on the pretraining set; the tower of each last checkpoint is exported to
   ``WORK_DIR/foundation/dinov2-tiny-{6band,rgb}.pth``.
3. variants: each (variant, seed) trains on ``--source`` with the
   foundation loaded and frozen (``randomness.seed=SEED``, fixed
   ``--threads`` / ``--workers``, ``--jobs`` at once; see
   ``compare_methods.py``), then its last checkpoint is tested on every
   domain (``test_dataloader.dataset.data_root=DATA_ROOT/D``).
4. table: per variant, trainable / frozen parameters and, per domain, the
   mean mIoU over seeds and its range; printed and written as JSON and
   markdown (default ``WORK_DIR/domain_shift.{json,md}``).

Relative paths are relative to the repository root. ``--reuse`` skips
trainings and tests whose outputs exist (the variants are not retrained
when the foundation is). ``--cfg-options`` go to every training and test
(e.g. ``train_cfg.max_epochs=1`` for a smoke run),
``--pretrain-cfg-options`` to the foundation's trainings only.
"""
import argparse
import copy
import importlib.util
import json
import os
import os.path as osp
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
CONFIGS = osp.join('configs', 'spectralmoe')
VARIANTS = [
    osp.join(CONFIGS, f'domain-shift_{v}_dinov2-tiny-frozen_1xb8-20e_'
             'synthetic-multispectral-56x56.py')
    for v in ('head-only', 'sera-image', 'spectralmoe',
              'spectralmoe-released')
]
PRETRAIN = osp.join(CONFIGS, 'pretrain_dinov2-tiny_1xb16-12e_synthetic-'
                    'multispectral-random8-56x56.py')
PRETRAIN_RGB = osp.join(CONFIGS, 'pretrain_dinov2-tiny-rgb_1xb16-12e_'
                        'synthetic-multispectral-random8-56x56.py')
FOUNDATION_FILES = dict(main='dinov2-tiny-6band.pth',
                        second='dinov2-tiny-rgb.pth')
# where a variant loads each foundation file
FOUNDATION_KEYS = dict(main='model.backbone.backbone.init_cfg',
                       second='model.backbone.second.init_cfg')


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name,
                                                  osp.join(HERE, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cm = _load_tool('compare_methods')


def _path(p: str) -> str:
    return p if osp.isabs(p) else osp.join(ROOT, p)


def _config(path: str):
    from mmseg_sera.apis.config import load_config
    return load_config(_path(path))


def _pretrained(cfg, key: str) -> bool:
    node = cfg
    for k in key.split('.'):
        node = node.get(k) if hasattr(node, 'get') else None
        if node is None:
            return False
    return node.get('type') == 'Pretrained'


def pretrain_options(cfg, root: str) -> List[str]:
    """Point every domain dataset of a pretraining config at ``root``."""
    opts = []
    if osp.abspath(_path(root)) == osp.abspath(_path(cfg.pretrain_root)):
        return opts
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        for i, name in enumerate(cfg.pretrain_domains):
            opts.append(f'{loader}.dataset.datasets.{i}.data_root='
                        f'{root}/{name}')
    return opts


def build_foundations(args, needed: Dict[str, str]) -> Dict[str, Dict]:
    """Pretrain the towers of ``needed`` (part -> pretraining config) with
    ``args.foundation_seed`` and export them; part -> record."""
    from mmseg_sera.apis.domain_shift import ensure_set, export_backbone
    fargs = copy.copy(args)
    fargs.cfg_options = {**(args.cfg_options or {}),
                         **(args.pretrain_cfg_options or {})}

    def pretrain_set(cfg) -> None:
        ensure_set(args.pretrain_root, seed=cfg.pretrain_set['seed'],
                   random_domains=cfg.pretrain_set['random_domains'],
                   num_train=args.num_train or cfg.pretrain_set['num_train'],
                   num_val=args.num_val or cfg.pretrain_set['num_val'],
                   names=list(cfg.pretrain_domains))

    def one(part: str) -> Dict:
        config = needed[part]
        cfg = _config(config)
        pretrain_set(cfg)  # written already: checks that it fits cfg
        cm.run_one(fargs, config, args.foundation_seed,
                   options=pretrain_options(cfg, args.pretrain_root),
                   tests={})
        work = osp.join(args.work_dir, osp.splitext(osp.basename(config))[0],
                        f'seed{args.foundation_seed}')
        with open(osp.join(work, 'last_checkpoint')) as f:
            ckpt = f.read().strip()
        out = osp.join(args.work_dir, 'foundation', FOUNDATION_FILES[part])
        exported = export_backbone(_path(ckpt), _path(out))
        print(f'foundation {part}: {out} ({exported["tensors"]} tensors) '
              f'from {ckpt}', flush=True)
        return dict(config=config, checkpoint=ckpt, file=out,
                    seed=args.foundation_seed, **exported)

    # the pretraining set is written before the parallel trainings start
    pretrain_set(_config(next(iter(needed.values()))))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {part: pool.submit(one, part) for part in needed}
        return {part: f.result() for part, f in futures.items()}


def count_params(config: str, cfg_options: Optional[dict]) -> Dict[str, int]:
    """Trainable / frozen parameter counts of a variant (random weights;
    no checkpoint is read)."""
    from mmseg_sera.apis.config import build_model, load_config
    from mmseg_sera.apis.domain_shift import count_parts
    return count_parts(build_model(load_config(_path(config), cfg_options)))


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--variants', nargs='+', default=VARIANTS)
    p.add_argument('--pretrain', default=PRETRAIN)
    p.add_argument('--pretrain-rgb', default=PRETRAIN_RGB)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--foundation-seed', type=int, default=0)
    p.add_argument('--domains', nargs='+', default=['A', 'B', 'C'])
    p.add_argument('--source', default='A', help='training domain')
    p.add_argument('--data-root', default='data/synthetic_multispectral')
    p.add_argument('--pretrain-root',
                   default='data/synthetic_multispectral_pretrain')
    p.add_argument('--num-train', type=int, help='scenes per domain of '
                   'sets written by this run (default: the sets\' own)')
    p.add_argument('--num-val', type=int)
    p.add_argument('--jobs', type=int, default=1)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--work-dir', default='work_dirs/domain_shift')
    p.add_argument('--reuse', action='store_true')
    p.add_argument('--json', help='default WORK_DIR/domain_shift.json')
    p.add_argument('--markdown', help='default WORK_DIR/domain_shift.md')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--pretrain-cfg-options', nargs='+', action=DictAction)
    args = p.parse_args(argv)
    # every path from here on is absolute (relative ones: to the repository
    # root, where the trainings run)
    for key in ('pretrain', 'pretrain_rgb', 'data_root', 'pretrain_root',
                'work_dir', 'json', 'markdown'):
        if getattr(args, key):
            setattr(args, key, _path(getattr(args, key)))
    args.variants = [_path(c) for c in args.variants]
    for config in args.variants + [args.pretrain, args.pretrain_rgb]:
        if not osp.isfile(config):
            p.error(f'config not found: {config}')
    if args.source not in args.domains:
        p.error(f'--source {args.source} is not one of --domains')
    return args


def main(argv=None) -> Dict:
    from mmseg_sera.apis.domain_shift import (ensure_set, format_markdown,
                                              summarise_domains,
                                              variant_name)
    args = parse_args(argv)
    start = time.time()
    timings = {}
    num_domains = max(3, max(ord(d) - ord('A') + 1 for d in args.domains))
    ensure_set(args.data_root, seed=0, num_domains=num_domains,
               num_train=args.num_train, num_val=args.num_val,
               names=args.domains)

    # which foundation files the variants load
    needed = {}
    for config in args.variants:
        cfg = _config(config)
        if not _pretrained(cfg, FOUNDATION_KEYS['main']):
            raise SystemExit(f'{config}: model.backbone.backbone has no '
                             "init_cfg of type 'Pretrained' (the foundation)")
        needed['main'] = args.pretrain
        if _pretrained(cfg, FOUNDATION_KEYS['second']):
            needed['second'] = args.pretrain_rgb
    t = time.time()
    foundations = build_foundations(args, needed)
    timings['foundation_s'] = round(time.time() - t, 1)

    def variant_options(config: str) -> List[str]:
        cfg = _config(config)
        opts = [f'{loader}.dataset.data_root={args.data_root}/{args.source}'
                for loader in ('train_dataloader', 'val_dataloader')]
        for part, record in foundations.items():
            if _pretrained(cfg, FOUNDATION_KEYS[part]):
                opts.append(f'{FOUNDATION_KEYS[part]}.checkpoint='
                            f'{record["file"]}')
        return opts

    tests = {d: [f'test_dataloader.dataset.data_root={args.data_root}/{d}']
             for d in args.domains}
    runs = [(c, s) for s in args.seeds for c in args.variants]
    t = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(c, s): pool.submit(cm.run_one, args, c, s,
                                       options=variant_options(c),
                                       tests=tests)
                   for c, s in runs}
        results = {run: f.result() for run, f in futures.items()}
    timings['variants_s'] = round(time.time() - t, 1)
    timings['total_s'] = round(time.time() - start, 1)

    rows = []
    for config in args.variants:
        per_seed = {s: results[(config, s)] for s in args.seeds}
        rows.append(dict(
            name=variant_name(config), config=osp.relpath(config, ROOT),
            params=count_params(config, args.cfg_options),
            summary=summarise_domains(per_seed, args.domains, args.source),
            runs={str(s): r for s, r in per_seed.items()}))
    table = format_markdown(rows, args.domains, args.source, len(args.seeds))
    print('\n'.join(table))
    report = dict(
        domains=args.domains, source=args.source, seeds=args.seeds,
        threads=args.threads, workers=args.workers, jobs=args.jobs,
        data_root=args.data_root, pretrain_root=args.pretrain_root,
        cfg_options=args.cfg_options or {},
        pretrain_cfg_options=args.pretrain_cfg_options or {},
        foundations=foundations, timings=timings, variants=rows,
        table=table)
    json_file = args.json or osp.join(args.work_dir, 'domain_shift.json')
    md_file = args.markdown or osp.join(args.work_dir, 'domain_shift.md')
    for f in (json_file, md_file):
        os.makedirs(osp.dirname(osp.abspath(_path(f))), exist_ok=True)
    with open(_path(json_file), 'w') as f:
        json.dump(report, f, indent=1)
    with open(_path(md_file), 'w') as f:
        f.write(
            f'Train on {args.source}, test on {", ".join(args.domains)}: '
            f'mIoU, mean over seeds {args.seeds} (min-max); foundation '
            f'seed {args.foundation_seed}; {args.threads} thread(s), '
            f'{args.jobs} job(s); {timings["total_s"]:.0f} s.\n\n' +
            '\n'.join(table) + '\n')
    print(f'written {json_file} and {md_file}')
    return report


if __name__ == '__main__':
    main()
