"""Pieces of the domain-shift benchmark (``tools/analysis_tools/
domain_shift.py``) that train nothing: writing or checking its generated
sets, exporting a pretrained tower as a foundation file, counting a
variant's trainable and frozen parameters, and the per-domain table over
seeds.

The benchmark: a tiny 6-band DINOv2 is pretrained on other scenes and
random sensors (the stand-in foundation), then frozen; three variants
(head only, + image-only SERA-Adapter, + SpectralMoE adapters) train on
domain A of the synthetic multispectral set and are tested on every
domain. See ``configs/_base_/domain_shift_synthetic-multispectral.py``.
"""
import json
import os
import os.path as osp
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = [
    'VARIANT_PREFIX', 'variant_name', 'ensure_set', 'export_backbone',
    'count_parts', 'summarise_domains', 'format_markdown'
]

#: file-name prefix of the benchmark's variant configs
VARIANT_PREFIX = 'domain-shift_'


def variant_name(config: str) -> str:
    """Short name of a variant config: the field after ``domain-shift_``
    (``domain-shift_sera-image_dinov2-...py`` -> ``sera-image``), else the
    file name without ``.py``."""
    stem = osp.splitext(osp.basename(config))[0]
    if stem.startswith(VARIANT_PREFIX):
        return stem[len(VARIANT_PREFIX):].split('_')[0]
    return stem


def export_backbone(checkpoint: str, out: str,
                    prefix: str = 'backbone.backbone.') -> Dict[str, int]:
    """Write the ``prefix`` part of a training checkpoint (a DINOv2 tower,
    adapters excluded) as a file that ``DINOv2``'s
    ``init_cfg=dict(type='Pretrained', checkpoint=out)`` loads.

    Args:
        checkpoint: an MMEngine checkpoint written by ``tools/train.py``
            (read with ``weights_only=False``: only for files of one's own
            runs).
        out: the foundation file, ``{'state_dict': ..., 'meta': ...}``
            (tensors and strings only, so it loads with
            ``weights_only=True``).
        prefix: the tower's key prefix in the segmentor
            (``PyramidDINOv2`` and ``DualStreamDINOv2`` keep it under
            ``backbone.backbone.``).

    Returns:
        ``{'tensors': n, 'numel': values}`` of the exported state
        (parameters and buffers).

    Raises:
        KeyError: no key of the checkpoint starts with ``prefix``.
    """
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=False)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
    tower = {
        k[len(prefix):]: v.detach().clone()
        for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix):].startswith(
            'adapters.')
    }
    if not tower:
        raise KeyError(f'{checkpoint} has no key starting with {prefix!r}')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    meta = dict(source=osp.abspath(checkpoint), prefix=prefix,
                source_layout='mmseg_sera')
    torch.save(dict(state_dict=tower, meta=meta), out)
    return dict(tensors=len(tower),
                numel=sum(v.numel() for v in tower.values()))


def ensure_set(root: str, *, seed: int, num_domains: int = 3,
               random_domains: int = 0, num_train: Optional[int] = None,
               num_val: Optional[int] = None,
               names: Optional[List[str]] = None) -> Dict:
    """The ``meta.json`` of the generated multispectral set at ``root``,
    written first if missing (``generate_multispectral_set``; sizes: its
    defaults unless given).

    Raises:
        ValueError: an existing set was written with another seed or lacks
            one of the domains ``names``.
    """
    from ..datasets.multispectral import generate_multispectral_set
    meta_file = osp.join(root, 'meta.json')
    if not osp.isfile(meta_file):
        sizes = {k: v for k, v in (('num_train', num_train),
                                   ('num_val', num_val)) if v}
        print(f'writing {root} (seed {seed}, ' + (
            f'{random_domains} random domains' if random_domains else
            f'{num_domains} domains') + f', {sizes or "default sizes"})',
            flush=True)
        generate_multispectral_set(root, seed=seed, num_domains=num_domains,
                                   random_domains=random_domains,
                                   progress=False, **sizes)
    with open(meta_file) as f:
        meta = json.load(f)
    have = [d['name'] for d in meta['domains']]
    missing = [n for n in names or () if n not in have]
    if meta['seed'] != seed or missing:
        raise ValueError(
            f'{root} was written with seed {meta["seed"]} and domains '
            f'{have}; this run needs seed {seed} and {names}: remove it or '
            'pass another root')
    return meta


def _part(name: str) -> str:
    if name.startswith(('decode_head.', 'auxiliary_head.')):
        return 'head'
    if '.adapters.' in name:
        return 'adapters'
    if name.startswith('backbone.second.'):
        return 'second'
    if name.startswith('backbone.'):
        return 'backbone'
    return 'other'


def count_parts(model: nn.Module) -> Dict[str, int]:
    """Parameter counts of a benchmark segmentor.

    Returns:
        ``trainable`` / ``frozen`` (``requires_grad`` or not, all
        parameters) and, per part, ``{part}`` (all) and
        ``{part}_trainable``, for the parts ``backbone`` (the foundation
        tower), ``adapters`` (any ``*.adapters.*``), ``second`` (a
        dual-stream model's second tower), ``head`` (decode and auxiliary
        heads) and ``other``.
    """
    counts = dict(trainable=0, frozen=0)
    for part in ('backbone', 'adapters', 'second', 'head', 'other'):
        counts[part] = counts[f'{part}_trainable'] = 0
    for name, p in model.named_parameters():
        part = _part(name)
        counts[part] += p.numel()
        if p.requires_grad:
            counts[f'{part}_trainable'] += p.numel()
            counts['trainable'] += p.numel()
        else:
            counts['frozen'] += p.numel()
    return counts


def summarise_domains(runs: Mapping[int, Mapping[str, Mapping[str, float]]],
                      domains: Sequence[str], source: str,
                      key: str = 'mIoU') -> Dict[str, Dict]:
    """Mean and range over seeds of ``key`` per domain, for one variant.

    Args:
        runs: seed -> domain -> metrics (of ``tools/test.py --out``).
        domains: the tested domains, in table order.
        source: the training domain; the others are targets.

    Returns:
        domain -> ``{'mean', 'min', 'max', 'values'}`` (values in seed
        order), plus ``'targets'``: the same over seeds of each seed's mean
        over the target domains (absent when none is tested).
    """
    seeds = sorted(runs)
    out: Dict[str, Dict] = {}

    def stats(values: List[float]) -> Dict:
        return dict(mean=statistics.fmean(values), min=min(values),
                    max=max(values), values=values)

    for d in domains:
        out[d] = stats([float(runs[s][d][key]) for s in seeds])
    targets = [d for d in domains if d != source]
    if targets:
        out['targets'] = stats([
            statistics.fmean(float(runs[s][d][key]) for d in targets)
            for s in seeds
        ])
    return out


def _cell(stat: Optional[Dict]) -> str:
    if not stat:
        return ''
    return f'{stat["mean"]:.2f} ({stat["min"]:.1f}-{stat["max"]:.1f})'


def format_markdown(rows: Sequence[Dict], domains: Sequence[str],
                    source: str, num_seeds: int) -> List[str]:
    """The benchmark table as markdown lines.

    Args:
        rows: one per variant, ``{'name', 'params': count_parts(...),
            'summary': summarise_domains(...)}``.
        domains: the tested domains (columns, in order).
        source: the training domain (marked in its column head).
        num_seeds: seeds per variant (a column).

    Columns: variant, seeds, trainable parameters (adapters, head), frozen
    parameters, then per domain ``mean (min-max)`` of mIoU over seeds, and
    the targets' mean (the mean over the non-source domains).
    """
    heads = [f'{d} (source)' if d == source else d for d in domains]
    has_targets = any(d != source for d in domains)
    if has_targets:
        heads.append('targets')
    lines = [
        '| variant | seeds | trainable (adapters + head) | frozen | ' +
        ' | '.join(heads) + ' |',
        '|---|---:|---:|---:|' + '---:|' * len(heads),
    ]
    for row in rows:
        p = row['params']
        cells = [_cell(row['summary'].get(d)) for d in domains]
        if has_targets:
            cells.append(_cell(row['summary'].get('targets')))
        lines.append(
            f'| {row["name"]} | {num_seeds} | {p["trainable"]:,} '
            f'({p["adapters_trainable"]:,} + {p["head_trainable"]:,}) | '
            f'{p["frozen"]:,} | ' + ' | '.join(cells) + ' |')
    return lines
