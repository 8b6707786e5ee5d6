"""Draw the expert routing of a trained referring segmentor.

For each chosen image and sentence, one PNG with

* the image, the predicted mask and the sentence;
* a heat map of the SERA-Adapter routing weights, one row per adapted
  block, one column per light expert (spatial, boundary);
* the SERA-Fusion expert weights: a one-row heat map for per-sample
  routing, or, for per-token routing, one map per expert over the image;

and ``summary.png``: every sample (rows) against every routed module and
expert (columns), plus ``routing.json`` with the numbers.

``routing_stats.json`` (also printed) says per routed module how much the
routing follows the expression: the mean and spread of each expert's weight
over the sentences, the share of that spread found between sentences of
the same image (``sentence_share``: 1 = the sentence alone decides, 0 = the
image alone), and the mean weights per sentence kind where the dataset
gives kinds. ``--all-sentences`` routes every sentence of each item, so
that images have several; ``--stats-only`` skips the pictures.

Examples::

    # samples 0..7 of the config's test split
    python tools/analysis_tools/visualize_routing.py CONFIG CHECKPOINT \\
        --out-dir work_dirs/routing --num-samples 8
    # chosen dataset items of another split
    python tools/analysis_tools/visualize_routing.py CONFIG CHECKPOINT \\
        --split testA --indices 3 17 42
    # how the routing follows the sentence, over 300 items of testB
    python tools/analysis_tools/visualize_routing.py CONFIG CHECKPOINT \\
        --split testB --num-samples 300 --all-sentences --stats-only
    # your own image and sentences
    python tools/analysis_tools/visualize_routing.py CONFIG CHECKPOINT \\
        --img demo.jpg --texts "the red circle" "the leftmost shape"
"""
import argparse
import json
import os
import os.path as osp
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import mmcv  # noqa: E402
import numpy as np  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmseg.registry import DATASETS  # noqa: E402

from mmseg_sera.apis import inference_model, init_model  # noqa: E402
from mmseg_sera.engine.routing import (RoutingRecorder,  # noqa: E402
                                       routing_statistics, short_name)
from mmseg_sera.visualization import draw_refer_overlay  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Heat maps of the SERA-Adapter and SERA-Fusion routing')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-dir', default='work_dirs/routing',
                        help='folder for the PNG files and routing.json')
    parser.add_argument('--device', default='cpu')
    src = parser.add_argument_group(
        'samples (default: the first --num-samples items of the split)')
    src.add_argument('--split', default=None,
                     help='dataset split (default: the test dataloader\'s)')
    src.add_argument('--indices', type=int, nargs='+', default=None,
                     help='dataset item indices')
    src.add_argument('--num-samples', type=int, default=8)
    src.add_argument('--img', default=None,
                     help='an image file instead of dataset items')
    src.add_argument('--texts', nargs='+', default=None,
                     help='sentences for --img')
    src.add_argument('--all-sentences', action='store_true',
                     help='every sentence of each dataset item (default: '
                     'the first)')
    parser.add_argument('--stats-only', action='store_true',
                        help='write routing_stats.json only, no pictures')
    return parser.parse_args(argv)


def dataset_samples(cfg, split, indices, num, all_sentences=False
                    ) -> List[Tuple[str, str, Optional[str]]]:
    """(image path, sentence, kind or None) of dataset items."""
    ds_cfg = ConfigDict(cfg.test_dataloader.dataset)
    if split is not None:
        ds_cfg.split = split
    ds_cfg.pipeline = []
    dataset = DATASETS.build(ds_cfg)
    if indices is None:
        indices = range(min(num, len(dataset)))
    out = []
    for i in indices:
        if not 0 <= i < len(dataset):
            raise IndexError(f'index {i} is out of range: the '
                             f'{ds_cfg.split!r} split has {len(dataset)} '
                             'items')
        info = dataset.get_data_info(i)
        sentences = info['sentences'] if all_sentences else \
            info['sentences'][:1]
        kinds = info.get('sentence_kinds') or [None] * len(sentences)
        out += [(info['img_path'], t, k) for t, k in zip(sentences, kinds)]
    return out


def run(model, pairs: Sequence[Tuple[str, str]]) -> List[dict]:
    """Predict every pair (sentences of one image in one batch) and keep the
    routing of each sentence; results in the order of ``pairs``."""
    by_image: Dict[str, List[int]] = OrderedDict()
    for i, (img, _) in enumerate(pairs):
        by_image.setdefault(img, []).append(i)
    results: List[Optional[dict]] = [None] * len(pairs)
    with RoutingRecorder(model) as rec:
        if not rec.modules:
            raise ValueError('the model has no routed module (no '
                             'SERA-Adapter or SERA-Fusion router): nothing '
                             'to draw')
        for img, order in by_image.items():
            rec.clear()
            samples = inference_model(model, img,
                                      [pairs[i][1] for i in order])
            for b, (i, sample) in enumerate(zip(order, samples)):
                routing = OrderedDict()
                for r in rec.records:
                    routing[r.module] = dict(
                        experts=list(r.experts),
                        weights=r.weights[b].numpy(),
                        indices=None if r.indices is None else
                        r.indices[b].numpy())
                results[i] = dict(
                    img=img, text=sample.metainfo['text'],
                    meta=sample.metainfo,
                    mask=sample.pred_sem_seg.data[0].cpu().numpy() > 0,
                    routing=routing)
    return results


def _heat(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
          title: str) -> None:
    ax.imshow(values, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto')
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha='right',
                  fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7,
                color='black' if v > 0.6 else 'white')
    ax.set_title(title, fontsize=9)


def token_map_on_image(weights: np.ndarray, meta: dict) -> np.ndarray:
    """Per-token weights of one expert (N = h x w over the network input)
    as an H x W map over the original image: the letterbox and batch
    padding are cut as ``ReferringEncoderDecoder.postprocess_result`` cuts
    them from the logits."""
    in_h, in_w = meta['pad_shape'][:2]  # the network input
    gh = max(1, int(round(np.sqrt(weights.size * in_h / in_w))))
    wmap = mmcv.imresize(
        weights.reshape(gh, -1).astype(np.float32), (in_w, in_h))
    for key in ('img_padding_size', 'padding_size'):
        if key in meta:
            left, right, top, bottom = meta[key]
            h, w = wmap.shape
            wmap = wmap[top:h - bottom, left:w - right]
    ori_h, ori_w = meta['ori_shape'][:2]
    return mmcv.imresize(wmap, (ori_w, ori_h))


def draw_sample(result: dict, out_file: str) -> None:
    """One figure: overlay, adapter heat map, fusion weights."""
    image = mmcv.imread(result['img'], channel_order='rgb')
    adapters = [(m, r) for m, r in result['routing'].items()
                if r['weights'].ndim == 1 and 'adapters' in m]
    adapter_names = {m for m, _ in adapters}
    fusion = [(m, r) for m, r in result['routing'].items()
              if m not in adapter_names]
    token_maps = [(m, r) for m, r in fusion if r['weights'].ndim == 2]
    ncols = 1 + bool(adapters) + sum(
        1 if r['weights'].ndim == 1 else len(r['experts'])
        for _, r in fusion)
    fig, axes = plt.subplots(1, ncols, figsize=(3.2 * ncols, 3.6),
                             squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    ax.imshow(draw_refer_overlay(image, result['mask'], result['text']))
    ax.set_axis_off()
    if adapters:
        experts = adapters[0][1]['experts']
        _heat(axes.pop(0), np.stack([r['weights'] for _, r in adapters]),
              [short_name(m) for m, _ in adapters], experts,
              'SERA-Adapter routing')
    for module, r in fusion:
        if r['weights'].ndim == 1:
            _heat(axes.pop(0), r['weights'][None], [short_name(module)],
                  r['experts'], 'SERA-Fusion expert weights')
    for module, r in token_maps:
        for e, name in enumerate(r['experts']):
            ax = axes.pop(0)
            ax.imshow(image)
            ax.imshow(token_map_on_image(r['weights'][:, e], result['meta']),
                      cmap='magma', vmin=0, vmax=1, alpha=0.6)
            ax.set_title(f'{short_name(module)}: {name}', fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def draw_summary(results: List[dict], out_file: str) -> None:
    """Samples x (module, expert) heat map of the mean routing weights."""
    cols, values = [], []
    for r in results[0]['routing'].items():
        cols += [f'{short_name(r[0])}.{e}' for e in r[1]['experts']]
    for res in results:
        row = []
        for r in res['routing'].values():
            w = r['weights']
            row += list(w if w.ndim == 1 else w.mean(0))
        values.append(row)
    values = np.asarray(values)
    labels = [res['text'][:40] for res in results]
    fig, ax = plt.subplots(
        figsize=(1.0 + 0.55 * len(cols) + 2.5, 1.0 + 0.32 * len(results)))
    _heat(ax, values, labels, cols, 'routing weights per sample')
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def statistics(results: List[dict], kinds: Sequence[Optional[str]]
               ) -> Dict[str, dict]:
    """Routed module -> :func:`routing_statistics` of its per-sentence
    weights (per-token weights averaged over the tokens)."""
    groups = list(kinds) if all(k is not None for k in kinds) else None
    images = [res['img'] for res in results]
    out = OrderedDict()
    for module, r in results[0]['routing'].items():
        weights = [res['routing'][module]['weights'] for res in results]
        weights = [w if w.ndim == 1 else w.mean(0) for w in weights]
        out[module] = dict(experts=r['experts'], **routing_statistics(
            np.stack(weights), images, groups))
    return out


def format_statistics(stats: Dict[str, dict]) -> str:
    lines = []
    for module, st in stats.items():
        share = st['sentence_share']
        lines.append(
            f'{short_name(module)}: sentence share of the spread '
            f'{"n/a" if share is None else f"{share:.2f}"}')
        rows = [('all', st['mean'], st['std'])] + [
            (f'{g} (n={v["n"]})', v['mean'], None)
            for g, v in st['by_group'].items()]
        for label, mean, std in rows:
            cells = [f'{e} {m:.2f}' + ('' if std is None else f' ± {s:.2f}')
                     for e, m, s in zip(st['experts'], mean,
                                        std or [0] * len(mean))]
            lines.append(f'  {label:18s} ' + '  '.join(cells))
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if (args.img is None) != (args.texts is None):
        raise SystemExit('--img and --texts go together')
    model = init_model(args.config, args.checkpoint, device=args.device)
    if args.img is not None:
        samples = [(args.img, t, None) for t in args.texts]
    else:
        samples = dataset_samples(model.cfg, args.split, args.indices,
                                  args.num_samples, args.all_sentences)
    results = run(model, [(img, text) for img, text, _ in samples])
    os.makedirs(args.out_dir, exist_ok=True)
    stats = statistics(results, [kind for _, _, kind in samples])
    with open(osp.join(args.out_dir, 'routing_stats.json'), 'w') as f:
        json.dump(stats, f, indent=1)
    print(format_statistics(stats))
    if args.stats_only:
        return
    dump = []
    for i, res in enumerate(results):
        stem = osp.splitext(osp.basename(res['img']))[0]
        draw_sample(res, osp.join(args.out_dir, f'{i:03d}_{stem}.png'))
        dump.append(
            dict(img=res['img'], text=res['text'],
                 routing={
                     m: dict(experts=r['experts'],
                             weights=r['weights'].tolist(),
                             indices=None if r['indices'] is None else
                             r['indices'].tolist())
                     for m, r in res['routing'].items()
                 }))
    draw_summary(results, osp.join(args.out_dir, 'summary.png'))
    with open(osp.join(args.out_dir, 'routing.json'), 'w') as f:
        json.dump(dump, f, indent=1)
    print(f'{len(results)} samples drawn to {args.out_dir}')


if __name__ == '__main__':
    main()
