"""Count total and trainable parameters of a referring segmentor, per part.

    python tools/analysis_tools/count_params.py CONFIG [--json FILE]
        [--cfg-options KEY=VALUE ...]

Builds the model of CONFIG with random weights (``init_weights`` is not
run, so no checkpoint is read) and prints, for each part, the number of
parameters and how many of them have ``requires_grad``:

    backbone       the backbone's own parameters (``backbone.adapters``
                   excluded)
    adapters       ``backbone.adapters`` and ``text_encoder.adapters``
                   (SERA-Adapter and the peers' adapters)
    text_encoder   the sentence encoder
    neck           the neck (SERA-Fusion)
    head           ``decode_head`` (and ``auxiliary_head`` if any)
    other          anything else (normally nothing)

plus the total and the trainable share of the backbone's own parameters
(``100 * trainable / total`` over ``backbone`` above, in percent).  Each
parameter tensor is counted once, in the first part that owns it.

A second table splits some parts into sub-parts (``subparts`` in the
JSON): the adapters by tower and slot kind (``adapters.backbone.
parallel_mlp``, ``adapters.text_encoder.parallel_mlp_text``,
``adapters.backbone.post_block``; ``modules`` = how many adapters), and
the neck and the head by child module (``head.decoder``,
``head.projector``, ``neck.gates``, ...; ``auxiliary_head.*``).
"""
import argparse
import os.path as osp
from typing import Dict, List, Optional, Tuple

import mmengine
import torch.nn as nn
from mmengine.config import DictAction

# (part, parameter-name prefixes), checked in this order
PARTS = (
    ('backbone', None),  # filled in by _part_of: backbone.* not adapters
    ('adapters', ('backbone.adapters.', 'text_encoder.adapters.')),
    ('text_encoder', ('text_encoder.', )),
    ('neck', ('neck.', )),
    ('head', ('decode_head.', 'auxiliary_head.')),
    ('other', ()),
)
PART_NAMES = tuple(name for name, _ in PARTS)


def _part_of(name: str) -> str:
    """Part of a parameter named as in ``model.named_parameters()``."""
    if name.startswith(('backbone.adapters.', 'text_encoder.adapters.')):
        return 'adapters'
    if name.startswith('backbone.'):
        return 'backbone'
    for part, prefixes in PARTS[2:-1]:
        if name.startswith(prefixes):
            return part
    return 'other'


def _subpart_of(name: str) -> Optional[Tuple[str, Optional[str]]]:
    """(sub-part, module key) of a parameter, or None.

    The module key names one adapter (``backbone.adapters.parallel_mlp.3``)
    so that the adapters of a sub-part can be counted.
    """
    fields = name.split('.')
    for tower in ('backbone', 'text_encoder'):
        if name.startswith(tower + '.adapters.') and len(fields) > 3:
            # post_block adapters sit at adapters.{i}, the other kinds at
            # adapters.{kind}.{i}
            if fields[2].isdigit():
                return (f'adapters.{tower}.post_block',
                        '.'.join(fields[:3]))
            # one module per block index; a module without one (an ETRIS
            # bridge spans its blocks) counts once
            depth = 4 if fields[3].isdigit() else 3
            return (f'adapters.{tower}.{fields[2]}',
                    '.'.join(fields[:depth]))
    prefixes = (('neck', 'neck'), ('decode_head', 'head'),
                ('auxiliary_head', 'auxiliary_head'))
    for prefix, part in prefixes:
        if fields[0] == prefix and len(fields) > 2:
            return f'{part}.{fields[1]}', None
    return None


def count_subparts(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """Sub-part counts (see the module docstring): sub-part ->
    ``{'total', 'trainable', 'modules'}``, in order of first appearance;
    ``modules`` is the number of adapters (1 for a neck or head child)."""
    rows: Dict[str, Dict[str, int]] = {}
    keys: Dict[str, set] = {}
    for name, p in model.named_parameters():
        found = _subpart_of(name)
        if found is None:
            continue
        sub, key = found
        row = rows.setdefault(sub, dict(total=0, trainable=0, modules=1))
        row['total'] += p.numel()
        if p.requires_grad:
            row['trainable'] += p.numel()
        if key is not None:
            keys.setdefault(sub, set()).add(key)
            row['modules'] = len(keys[sub])
    return rows


def count_parameters(model: nn.Module) -> Dict:
    """Per-part parameter counts of a segmentor.

    Args:
        model: a segmentor with ``backbone`` (optionally
            ``backbone.adapters``), ``text_encoder``, ``neck`` and
            ``decode_head`` children; missing parts count 0.

    Returns:
        dict with

        - ``parts``: part name (``PART_NAMES``) -> ``{'total': int,
          'trainable': int}``; the parts sum to ``total``;
        - ``total``: ``{'total': int, 'trainable': int}`` over every
          distinct parameter tensor;
        - ``backbone_trainable_percent``: ``100 * trainable / total`` of
          the backbone's own parameters (0.0 when it has none);
        - ``subparts``: :func:`count_subparts`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError('count_parameters expects a torch.nn.Module, got '
                        f'{type(model).__name__}')
    parts = {name: dict(total=0, trainable=0) for name in PART_NAMES}
    # named_parameters() yields each tensor once (shared ones too).
    for name, p in model.named_parameters():
        row = parts[_part_of(name)]
        row['total'] += p.numel()
        if p.requires_grad:
            row['trainable'] += p.numel()
    total = dict(
        total=sum(r['total'] for r in parts.values()),
        trainable=sum(r['trainable'] for r in parts.values()))
    bb = parts['backbone']
    share = 100. * bb['trainable'] / bb['total'] if bb['total'] else 0.
    return dict(parts=parts, total=total, backbone_trainable_percent=share,
                subparts=count_subparts(model))


def _fmt(n: int) -> str:
    return f'{n:,} ({n / 1e6:.3f} M)'


def format_table(counts: Dict, title: Optional[str] = None) -> str:
    """The counts of :func:`count_parameters` as a text table."""
    from prettytable import PrettyTable
    table = PrettyTable(['part', 'parameters', 'trainable', 'trainable %'])
    if title:
        table.title = title
    rows = [(k, v) for k, v in counts['parts'].items()
            if k != 'other' or v['total']]
    rows.append(('total', counts['total']))
    for name, r in rows:
        pct = 100. * r['trainable'] / r['total'] if r['total'] else 0.
        table.add_row([name, _fmt(r['total']), _fmt(r['trainable']),
                       f'{pct:.3f}'])
    table.align['parameters'] = 'r'
    table.align['trainable'] = 'r'
    table.align['trainable %'] = 'r'
    text = (table.get_string() + '\nbackbone (own parameters, adapters '
            f'excluded) trainable share: '
            f'{counts["backbone_trainable_percent"]:.4f} %')
    subparts = counts.get('subparts')
    if subparts:
        sub = PrettyTable(['sub-part', 'modules', 'parameters',
                           'trainable'])
        for name, r in subparts.items():
            sub.add_row([name, r['modules'], _fmt(r['total']),
                         _fmt(r['trainable'])])
        for col in ('modules', 'parameters', 'trainable'):
            sub.align[col] = 'r'
        text += '\n' + sub.get_string()
    return text


def build_model(config: str, cfg_options: Optional[dict] = None
                ) -> nn.Module:
    """Build the model of ``config`` with random weights (no
    ``init_weights``: no checkpoint is read)."""
    from mmseg_sera.apis.config import build_model as build, load_config
    return build(load_config(config, cfg_options))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Count total and trainable parameters per part')
    p.add_argument('config', help='config file path')
    p.add_argument('--json', metavar='FILE',
                   help='also write the counts to this JSON file')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config entries, e.g. '
                   'model.backbone.adapter_indices=()')
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    model = build_model(args.config, args.cfg_options)
    counts = count_parameters(model)
    counts['config'] = osp.abspath(args.config)
    print(format_table(counts, title=osp.basename(args.config)))
    if args.json:
        mmengine.mkdir_or_exist(osp.dirname(osp.abspath(args.json)))
        mmengine.dump(counts, args.json, indent=2)
        print(f'written {args.json}')
    return counts


if __name__ == '__main__':
    main()
