"""Command line shared by ``detris_to_sera.py`` and ``etris_to_sera.py``.

The key map itself is ``mmseg_sera.models.peer_checkpoints`` (pure
functions); this module reads and writes the files, builds the config's
model (without weights) to check every key and shape against it, and fills
frozen towers from DINOv2 / CLIP files where the authors' file lacks them.
"""
import argparse
import collections
import os.path as osp
import sys
from typing import Dict, Optional

import torch
from torch import Tensor

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
if HERE not in sys.path:  # dinov2_to_sera beside this file
    sys.path.insert(0, HERE)

#: the config whose model a conversion is checked against by default, per
#: peer and --backbone
DEFAULT_CONFIGS = dict(
    detris=dict(
        base='configs/detris/'
        'detris_dinov2-b14-reg4_clip-b16_1xb32-65e_refcoco-448x448.py',
        large='configs/detris/'
        'detris_dinov2-l14-reg4_clip-b16_1xb32-50e_refcoco-448x448.py'),
    etris=dict(
        base='configs/etris/etris_clip-vit-b16_1xb32-50e_refcoco-416x416.py'))


def read_checkpoint(path: str) -> Dict:
    """The file as a dict (tensors and plain containers only), or a
    ValueError that names it and says what is wrong with it."""
    from mmseg_sera.engine.checkpoint import CheckpointError
    from mmseg_sera.engine.checkpoint import read_checkpoint as read
    try:
        # the authors' scheduler state holds a collections.Counter
        return read(path, allow=(collections.Counter, ))
    except CheckpointError as err:
        raise ValueError(str(err)) from err


def load_config(config: str):
    """The config (a path, or relative to the repository)."""
    from mmengine.config import Config
    path = config if osp.isfile(config) else osp.join(REPO, config)
    if not osp.isfile(path):
        raise ValueError(f'config not found: {config}')
    return Config.fromfile(path)


def config_towers(cfg, peer: str) -> Dict[str, Optional[str]]:
    """The tower files a config names (``--dinov2`` / ``--clip`` when not
    given): DETRIS's backbone ``init_cfg`` checkpoint, the CLIP
    ``pretrained`` paths."""
    model = cfg.model
    init = model.backbone.get('init_cfg') or {}
    dinov2 = init.get('checkpoint') if peer == 'detris' else None
    clip = model.text_encoder.get('pretrained') or (
        model.backbone.get('pretrained') if peer == 'etris' else None)
    return dict(dinov2=dinov2, clip=clip)


def expected_shapes(cfg) -> Dict[str, tuple]:
    """key -> shape of the state dict of the config's model (built without
    loading any weights)."""
    import copy

    from mmengine.registry import init_default_scope

    from mmseg.registry import MODELS
    from mmseg_sera.apis.inference import _strip_pretrained
    import mmseg_sera  # noqa: F401  (registers the components)

    cfg = copy.deepcopy(cfg)
    _strip_pretrained(cfg.model)
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tower_tensors(peer: str, dinov2: Optional[str],
                  clip: Optional[str]) -> Dict[str, Tensor]:
    """Our-layout tensors of the frozen towers from the files the user
    names: ``--dinov2`` (official or timm DINOv2, converted by
    ``dinov2_to_sera.convert_dinov2``) and ``--clip`` (an open_clip CLIP
    state dict: its text tower, and for ETRIS its image tower)."""
    out: Dict[str, Tensor] = {}
    if dinov2:
        if peer != 'detris':
            raise ValueError('--dinov2 is for DETRIS (ETRIS uses CLIP\'s '
                             'image tower: give --clip)')
        from dinov2_to_sera import convert_dinov2
        sd = convert_dinov2(read_checkpoint(dinov2))
        out.update({'backbone.' + k: v for k, v in sd.items()})
    if clip:
        from mmseg_sera.models.backbones.clip_vit import \
            extract_visual_state_dict
        from mmseg_sera.models.text_encoders.clip_text import \
            extract_text_state_dict
        raw = read_checkpoint(clip)
        out.update({'text_encoder.' + k: v
                    for k, v in extract_text_state_dict(raw).items()})
        if peer == 'etris':
            out.update({'backbone.' + k: v
                        for k, v in extract_visual_state_dict(raw).items()})
    return out


def _check_towers(towers: Dict[str, Tensor], used, expected, args) -> None:
    """A tower file of another size than the config is named as such."""
    wrong = [k for k in used if tuple(towers[k].shape) != expected.get(k)]
    if wrong:
        k = wrong[0]
        src = args.dinov2 if k.startswith('backbone.') and \
            getattr(args, 'dinov2', None) else args.clip
        found = 'no such tensor' if k not in expected else expected[k]
        raise ValueError(
            f'{src}: {len(wrong)} tower tensor(s) that do not fit the model '
            f'of {args.config}, e.g. {k} {tuple(towers[k].shape)} vs '
            f'{found}: a tower of another size (e.g. ViT-L for a ViT-B '
            'model, or more blocks)?')


def forward(peer: str, args) -> None:
    from mmseg_sera.models import peer_checkpoints as pc
    ckpt = read_checkpoint(args.src)
    state = pc.unwrap_peer_checkpoint(ckpt, peer)
    if args.dry_run:
        for theirs, ours in pc.key_table(list(state), peer):
            print(f'{theirs:70s} -> {ours}')
    cfg = load_config(args.config)
    expected = expected_shapes(cfg)
    out = pc.peer_to_sera(state, peer)
    dinov2 = getattr(args, 'dinov2', None)
    if not (dinov2 or args.clip) and set(expected) - set(out):
        # a file without its towers: the config's own tower files, if here
        named = config_towers(cfg, peer)
        dinov2 = named['dinov2'] if named['dinov2'] and osp.isfile(
            named['dinov2']) else None
        args.clip = named['clip'] if named['clip'] and osp.isfile(
            named['clip']) else None
        args.dinov2 = dinov2
    towers = tower_tensors(peer, dinov2, args.clip)
    if towers:
        used = pc.tower_keys_to_fill(out, towers, peer)
        _check_towers(towers, used, expected, args)
        out = pc.peer_to_sera(state, peer, towers=towers)
        names = ', '.join(p for p in (dinov2, args.clip) if p)
        print(f'{len(used)} frozen tower tensors taken from {names}')
    try:
        pc.check_keys(out, expected, peer)
    except ValueError as err:
        if peer == 'detris' and not getattr(args, 'backbone', None):
            raise ValueError(f'{err}\n  (a DETRIS-L file: --backbone large; '
                             'another variant: --config with its model)'
                             ) from err
        raise
    if args.dry_run:
        print(f'{len(state)} tensors -> {len(out)}; matches {args.config} '
              '(dry run: nothing written)')
        return
    meta = dict(peer=peer, source=osp.basename(args.src),
                peer_extras=pc.peer_extras(state, peer),
                config=args.config)
    for key in ('epoch', 'best_iou', 'cur_iou'):
        if isinstance(ckpt.get(key), (int, float)):
            meta[key] = ckpt[key]
    torch.save(dict(state_dict=out, meta=meta), args.dst)
    print(f'converted {len(state)} {peer.upper()} tensors into {len(out)} '
          f'({args.dst}); loads with init_model({args.config!r}, '
          f'{args.dst!r}) and tools/test.py')


def reverse(peer: str, args) -> None:
    from mmseg_sera.models import peer_checkpoints as pc
    ckpt = read_checkpoint(args.src)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{args.src}: not a checkpoint dict')
    state = ckpt.get('state_dict', ckpt)
    kind = pc.kind_of({k[len('module.'):] if k.startswith('module.') else k:
                       v for k, v in state.items()}) \
        if isinstance(state, dict) else None
    if kind != 'sera':
        raise ValueError(f'{args.src}: --reverse reads an mmseg_sera '
                         f'checkpoint; this one is '
                         f'{pc.describe_kind(kind)}')
    meta = ckpt.get('meta') or {}
    extras = meta.get('peer_extras') if meta.get('peer') == peer else None
    out = pc.sera_to_peer(state, peer, extras=extras)
    if args.dry_run:
        for ours, theirs in pc.key_table(list(state), peer, reverse=True):
            print(f'{ours:70s} -> {theirs}')
        print(f'{len(state)} tensors -> {len(out)} (dry run: nothing '
              'written)')
        return
    torch.save(pc.wrap_peer_state(out), args.dst)
    print(f'wrote {len(out)} tensors in the {peer.upper()} layout '
          f"('state_dict', keys under 'module.') to {args.dst}")


def main(peer: str, doc: str, argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help=f'{peer.upper()} checkpoint of the '
                        "authors' train.py (or, with --reverse, an "
                        'mmseg_sera checkpoint)')
    parser.add_argument('dst', help='output file')
    sizes = DEFAULT_CONFIGS[peer]
    parser.add_argument('--config', help='config whose model the result '
                        'must match key for key and shape for shape '
                        f'(default: {sizes["base"]})')
    if peer == 'detris':
        parser.add_argument('--backbone', choices=tuple(sizes),
                            help='DINOv2 size of the checkpoint: picks the '
                            'RefCOCO config of that size when --config is '
                            'not given (large: ' + sizes['large'] + ')')
        parser.add_argument('--dinov2', help='official/timm DINOv2 file for '
                            'the image tower, if SRC lacks it')
    parser.add_argument('--clip', help='open_clip CLIP state dict for the '
                        'frozen CLIP tower(s), if SRC lacks them')
    parser.add_argument('--reverse', action='store_true',
                        help="mmseg_sera -> the authors' layout")
    parser.add_argument('--dry-run', action='store_true',
                        help='print the key map and check it; write nothing')
    args = parser.parse_args(argv)
    backbone = getattr(args, 'backbone', None)
    if args.config and backbone:
        parser.error('give --backbone or --config, not both (--config '
                     'names the model, size included)')
    args.config = args.config or sizes[backbone or 'base']
    try:
        (reverse if args.reverse else forward)(peer, args)
    except ValueError as err:
        parser.error(str(err))
    return 0
