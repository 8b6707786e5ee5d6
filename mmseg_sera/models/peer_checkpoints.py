"""The authors' DETRIS and ETRIS checkpoints <-> mmseg_sera's state dicts.

Pure functions (state dict in, state dict out), as timm's
``checkpoint_filter_fn``; ``tools/model_converters/{detris,etris}_to_sera.py``
are their command lines and ``docs/checkpoints.md`` their user guide.

What the authors' ``train.py`` saves (both repositories, read at the commits
of PEERS.md §0): ``torch.save({'epoch', 'cur_iou', 'best_iou', 'prec',
'state_dict': model.state_dict(), 'optimizer', 'scheduler'})`` where
``model`` is the ``DistributedDataParallel`` wrapper, so every key of
``state_dict`` starts with ``module.``; their ``test.py`` wraps the model in
``DataParallel`` and loads that dict strictly. The frozen towers are part of
the model, so they are in the file:

* DETRIS: ``txt_backbone.*`` (the CLIP text tower with the Text Adapters;
  its image tower is deleted at build time; ``logit_scale`` stays),
  ``dinov2.*`` (DINOv2 with the Dense Aligners, ``mask_token`` included),
  ``neck.*``, ``decoder.*``, ``proj.*``. The ``Fusion`` module has no
  parameters.
* ETRIS: ``backbone.*`` (the whole CLIP: ``visual.*``, the text tower,
  ``logit_scale``), with the two *trained* position tables
  (``backbone.visual.positional_embedding``, (26^2 + 1) x 768 for 416 px,
  and ``backbone.positional_embedding``, 77 x 512), ``bridger.*``,
  ``neck.*``, ``decoder.*``, ``proj.*``.

Every key is renamed by exactly one rule of :data:`RULES` (a prefix on
each side, integer placeholders such as ``{i}`` carried over, and the
allowed remainders of the key), so the map is a bijection on the keys it
accepts; no tensor changes shape or layout (the peers' packed attention
projections, the dynamic-kernel ``Linear`` and the position tables are
stored as ours). A few tensors exist on one side only (:data:`EXTRAS`):
``dinov2.mask_token`` and ``*.logit_scale`` are unused at inference and
dropped (kept aside by :func:`peer_extras` so that the way back is exact),
and our DINOv2's ``pos_resampling`` buffer records DETRIS's position-table
resampling (offset 0.1, no antialias).
"""
import math
import re
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

PEERS = ('detris', 'etris')

# Allowed remainders after a rule's prefix.
_LIN = r'(weight|bias)'
_BN = r'(weight|bias|running_mean|running_var|num_batches_tracked)'
_MHA = r'(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)'
_CLIP_BLOCK = (r'transformer\.resblocks\.\d+\.(ln_[12]\.' + _LIN + r'|attn\.'
               + _MHA + r'|mlp\.c_(fc|proj)\.' + _LIN + ')')
_CLIP_TEXT = (r'(token_embedding\.weight|positional_embedding|ln_final\.'
              + _LIN + r'|text_projection|' + _CLIP_BLOCK + ')')
_CLIP_VISUAL = (r'(conv1\.weight|class_embedding|positional_embedding|ln_'
                r'(pre|post)\.' + _LIN + r'|proj|' + _CLIP_BLOCK + ')')
_DINOV2 = (r'(cls_token|register_tokens|pos_embed|patch_embed\.proj\.' + _LIN
           + r'|norm\.' + _LIN + r'|blocks\.\d+\.(norm[12]\.' + _LIN
           + r'|attn\.(qkv|proj)\.' + _LIN + r'|ls[12]\.gamma|mlp\.fc[12]\.'
           + _LIN + '))')

Rule = Tuple[str, str, str]  # (authors' prefix, our prefix, remainder)


def _dense_moc(theirs: str, ours: str, cross: bool) -> List[Rule]:
    """A DETRIS adapter (``DenseAligner`` with ``cross``, else
    ``TextAdapter``) -> ``DETRISDenseAligner`` / ``DETRISTextAdapter``.

    Their ``dense_branch1`` is one conv block (``conv``, ``bn``), branches 2
    and 3 are two in a ``Sequential``; ours are ``dmoc.branches.{k}`` of
    ``Sequential(conv, bn, relu)`` (indices 0, 1).
    """
    rules = [
        (theirs + 'D_fc1.', ours + 'fc1.', _LIN),
        (theirs + 'D_fc2.', ours + 'fc2.', _LIN),
        (theirs + 'dense_branch1.conv.', ours + 'dmoc.branches.0.0.', _LIN),
        (theirs + 'dense_branch1.bn.', ours + 'dmoc.branches.0.1.', _BN),
    ]
    for k in (2, 3):
        rules += [
            (f'{theirs}dense_branch{k}.{{c}}.conv.',
             f'{ours}dmoc.branches.{k - 1}.{{c}}.0.', _LIN),
            (f'{theirs}dense_branch{k}.{{c}}.bn.',
             f'{ours}dmoc.branches.{k - 1}.{{c}}.1.', _BN),
        ]
    if cross:
        rules += [
            (theirs + 'cross.multihead_attn.', ours + 'cross_attn.', _MHA),
            (theirs + 'cross.image_proj.', ours + 'img_proj.', _LIN),
            (theirs + 'cross.text_proj.', ours + 'text_proj.', _LIN),
            (theirs + 'cross.back_proj.', ours + 'back_proj.', _LIN),
        ]
    return rules


def _cbr(theirs: str, ours: str, conv_rest: str = 'weight') -> List[Rule]:
    """Their ``Sequential(conv, bn, relu)`` (indices 0, 1) -> our
    ``Sequential(conv=, bn=, act=)``."""
    return [(theirs + '0.', ours + 'conv.', conv_rest),
            (theirs + '1.', ours + 'bn.', _BN)]


def _cris_rules() -> List[Rule]:
    """Neck (``Neck`` / ``HA``), decoder (``Decoder`` / ``GA``) and
    ``Projector``, identical in both peers -> ``HierarchicalAlignNeck``
    (``gate='mha'``) and ``CRISHead``."""
    rules = [('neck.txt_proj.', 'neck.txt_proj.', _LIN)]
    for i, level in enumerate((3, 4, 5)):
        rules.append((f'neck.fusion{level}.multihead_attn.',
                      f'neck.gates.{i}.attn.', _MHA))
        rules += _cbr(f'neck.f{level}_proj.', f'neck.projs.{i}.')
    rules += _cbr('neck.aggr.', 'neck.aggr.')
    rules += _cbr('neck.coordconv.0.conv1.', 'neck.coord_convs.0.')
    rules += _cbr('neck.coordconv.1.', 'neck.coord_convs.1.')
    dec, ours = 'decoder.layers.{n}.', 'decode_head.decoder.layers.{n}.'
    rules += [
        (dec + 'self_attn_norm.', ours + 'norm_sa.', _LIN),
        (dec + 'cross_attn_norm.', ours + 'norm_ca.', _LIN),
        (dec + 'self_attn.', ours + 'self_attn.', _MHA),
        (dec + 'multihead_attn.', ours + 'cross_attn.', _MHA),
        (dec + 'ffn.', ours + 'ffn.', r'[034]\.' + _LIN),
        (dec + 'norm', ours + 'norm', r'[123]\.' + _LIN),
        ('decoder.norm.', 'decode_head.decoder.norm.', _LIN),
    ]
    proj = 'decode_head.projector.'
    rules += _cbr('proj.vis.1.', proj + 'up_convs.0.')
    rules += _cbr('proj.vis.3.', proj + 'up_convs.1.')
    rules += [('proj.vis.4.', proj + 'visual_proj.', _LIN),
              ('proj.txt.', proj + 'dynamic.fc.', _LIN)]
    return rules


def _detris_rules() -> List[Rule]:
    rules = _dense_moc('dinov2.blocks.{i}.adapter.',
                       'backbone.adapters.parallel_mlp.{i}.', cross=True)
    rules += _dense_moc('txt_backbone.transformer.resblocks.{j}.adapter.',
                        'text_encoder.adapters.parallel_mlp_text.{j}.',
                        cross=False)
    rules += [('dinov2.', 'backbone.', _DINOV2),
              ('txt_backbone.', 'text_encoder.', _CLIP_TEXT)]
    return rules + _cris_rules()


def _etris_rules() -> List[Rule]:
    bridge, stage = 'backbone.adapters.bridge.', (
        'backbone.adapters.bridge.stages.{s}.')
    rules = [
        ('bridger.zoom_in.{s}.0.', stage + 'zoom_in.0.', 'weight'),
        ('bridger.zoom_in.{s}.1.', stage + 'zoom_in.1.', _BN),
        ('bridger.zoom_out.{s}.0.', stage + 'zoom_out.0.', 'weight'),
        ('bridger.zoom_out.{s}.1.', stage + 'zoom_out.1.', _BN),
        ('bridger.linear1.{s}.', stage + 'text_in.', _LIN),
        ('bridger.linear2.{s}.', stage + 'text_out.', _LIN),
        ('bridger.fusion_v.{s}.multihead_attn.', stage + 'attn_v.', _MHA),
        ('bridger.fusion_t.{s}.multihead_attn.', stage + 'attn_t.', _MHA),
        ('bridger.ln_v.{s}.', bridge + 'norms_v.{s}.', _LIN),
        ('bridger.ln_t.{s}.', bridge + 'norms_t.{s}.', _LIN),
        ('backbone.visual.', 'backbone.', _CLIP_VISUAL),
        ('backbone.', 'text_encoder.', _CLIP_TEXT),
    ]
    return rules + _cris_rules()


#: peer -> ordered rules (authors' prefix, our prefix, allowed remainder)
RULES: Dict[str, List[Rule]] = dict(detris=_detris_rules(),
                                    etris=_etris_rules())

#: authors' keys with no counterpart in our models (unused at inference)
EXTRAS: Dict[str, Tuple[str, ...]] = dict(
    detris=('dinov2.mask_token', 'txt_backbone.logit_scale'),
    etris=('backbone.logit_scale', ))

#: our DINOv2's record of DETRIS's resampling: [round(0.1 * 1e4), antialias]
DETRIS_RESAMPLING_KEY = 'backbone.pos_resampling'
DETRIS_RESAMPLING = (1000, 0)

#: our keys a tower checkpoint may fill when the authors' file lacks them
#: (never trained by the peer); ETRIS's position tables are trained, so
#: they must come from the ETRIS file
_FROZEN = dict(
    detris=re.compile(r'^(backbone\.' + _DINOV2 + r'|text_encoder\.'
                      + _CLIP_TEXT + ')$'),
    etris=re.compile(r'^(backbone\.(?!positional_embedding$)' + _CLIP_VISUAL
                     + r'|text_encoder\.(?!positional_embedding$)'
                     + _CLIP_TEXT + ')$'))

# What identifies a state dict (after unwrapping).
_SIGNS = dict(
    detris=('dinov2.', 'txt_backbone.'),
    etris=('bridger.', 'backbone.visual.'),
    sera=('decode_head.', 'text_encoder.', 'backbone.adapters.'),
    dinov2=('blocks.0.', 'register_tokens', 'mask_token', 'cls_token'),
    clip=('visual.', 'token_embedding.', 'transformer.resblocks.'),
)
_ADVICE = dict(
    detris='a DETRIS model: convert it with '
    'tools/model_converters/detris_to_sera.py',
    etris='an ETRIS model: convert it with '
    'tools/model_converters/etris_to_sera.py',
    sera='already an mmseg_sera checkpoint (load it as it is; --reverse '
    "writes it in the authors' layout)",
    dinov2='a DINOv2 tower checkpoint, not a DETRIS model (give it with '
    '--dinov2 to fill a DETRIS file without its image tower)',
    clip='a CLIP checkpoint, not a DETRIS / ETRIS model (give it with '
    '--clip to fill a file without its frozen towers)',
)


def _compile(template: str) -> str:
    """``'a.{i}.b.'`` -> regex source with a named group per placeholder."""
    out, pos = '', 0
    for m in re.finditer(r'\{(\w+)\}', template):
        out += re.escape(template[pos:m.start()]) + f'(?P<{m.group(1)}>\\d+)'
        pos = m.end()
    return out + re.escape(template[pos:])


@lru_cache(maxsize=None)
def _compiled(peer: str, reverse: bool):
    check_peer(peer)
    return [(re.compile('^' + _compile(ours if reverse else theirs)
                        + f'(?P<rest>{rest})$'),
             theirs if reverse else ours)
            for theirs, ours, rest in RULES[peer]]


def check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise ValueError(f'peer must be one of {PEERS}, got {peer!r}')


def rename_key(key: str, peer: str, reverse: bool = False) -> Optional[str]:
    """The key on the other side (authors' -> ours, or ours -> authors'
    with ``reverse``); ``None`` when no rule accepts it."""
    for pattern, target in _compiled(peer, reverse):
        m = pattern.match(key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if k != 'rest'}
            return target.format(**groups) + m.group('rest')
    return None


def kind_of(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """``'detris' | 'etris' | 'sera' | 'dinov2' | 'clip'`` or ``None``:
    which model an (unwrapped) state dict holds, by its key prefixes."""
    keys = list(state_dict)
    for kind in ('sera', 'detris', 'etris', 'dinov2', 'clip'):
        if any(k.startswith(_SIGNS[kind]) for k in keys):
            # an ETRIS file has backbone.visual.*, ours has backbone.* and
            # decode_head.*: the first match in this order decides
            return kind
    return None


def unwrap_peer_checkpoint(ckpt, peer: str) -> Dict[str, Tensor]:
    """The model state inside a file of the authors' ``train.py``.

    Accepts the saved dict (``state_dict`` beside ``optimizer``,
    ``scheduler``, ``epoch``, ...) or a bare state dict; strips the
    ``module.`` prefix of the DDP / DataParallel wrapper.

    Raises:
        ValueError: not a dict of tensors, or the state dict is not the
            ``peer``'s (another peer's, ours, a tower checkpoint: the
            message says which and what to do).
    """
    check_peer(peer)
    if not isinstance(ckpt, dict):
        raise ValueError(f'expected a checkpoint dict, got a '
                         f'{type(ckpt).__name__}')
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict) or not state:
        raise ValueError("no 'state_dict' dict in the checkpoint (entries "
                         f'{sorted(map(str, ckpt))[:8]})')
    state = {(k[len('module.'):] if k.startswith('module.') else k): v
             for k, v in state.items()}
    bad = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f'entries {bad[:8]} of the state dict are not '
                         'tensors')
    kind = kind_of(state)
    if kind == peer == 'etris' and any(
            k.startswith(('backbone.visual.layer', 'backbone.visual.attnpool'))
            for k in state):
        raise ValueError('an ETRIS checkpoint of a CLIP ResNet (RN50 / RN101: '
                         'backbone.visual.layer*, attnpool): its ResNet '
                         'Bridger is not built in mmseg_sera; only the ViT '
                         'variant converts')
    if kind != peer:
        article = 'an' if peer == 'etris' else 'a'
        raise ValueError(f'not {article} {peer.upper()} checkpoint: it is '
                         f'{describe_kind(kind)} (first keys: '
                         f'{sorted(state)[:4]})')
    return state


def peer_extras(state_dict: Mapping[str, Tensor],
                peer: str) -> Dict[str, Tensor]:
    """The authors' tensors that our model does not hold (:data:`EXTRAS`),
    to keep beside a converted checkpoint for an exact way back."""
    check_peer(peer)
    return {k: state_dict[k].clone() for k in EXTRAS[peer] if k in state_dict}


def _unknown_error(keys: Sequence[str], side: str, peer: str) -> ValueError:
    keys = sorted(keys)
    more = ' ...' if len(keys) > 12 else ''
    return ValueError(
        f'{len(keys)} key(s) of the {side} state dict have no place in the '
        f'{peer.upper()} key map: {keys[:12]}{more}'
        ' (a model variant this map does not cover, e.g. another fusion or '
        'a zero_init_out bridge, or a file of another model)')


def peer_to_sera(state_dict: Mapping[str, Tensor],
                 peer: str,
                 towers: Optional[Mapping[str, Tensor]] = None
                 ) -> Dict[str, Tensor]:
    """The authors' model state dict (``module.`` already stripped, see
    :func:`unwrap_peer_checkpoint`) -> our segmentor's state dict.

    Args:
        state_dict: DETRIS or ETRIS ``model.state_dict()``.
        peer: ``'detris'`` or ``'etris'``.
        towers: our-layout tensors of the frozen towers (keys
            ``backbone.*`` / ``text_encoder.*``), used only for frozen keys
            the file lacks (a file saved without its towers). ETRIS's
            position tables are trained and never taken from here.

    Returns:
        A new dict; every key renamed by one rule, the unused extras
        dropped, DETRIS's resampling record added.

    Raises:
        ValueError: keys no rule accepts (listed).
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key in EXTRAS[peer]:
            continue
        new = rename_key(key, peer)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value.clone()
    if unknown:
        raise _unknown_error(unknown, f'{peer.upper()}', peer)
    for key in tower_keys_to_fill(out, towers or {}, peer):
        out[key] = towers[key].clone()
    if peer == 'detris':
        out[DETRIS_RESAMPLING_KEY] = torch.tensor(DETRIS_RESAMPLING)
    return out


def tower_keys_to_fill(converted: Mapping[str, Tensor],
                       towers: Mapping[str, Tensor], peer: str) -> List[str]:
    """Keys of ``towers`` that :func:`peer_to_sera` takes: frozen tower
    tensors (never the trained ones: adapters, ETRIS's position tables)
    that ``converted`` lacks."""
    frozen = _FROZEN[peer]
    return [k for k in towers if k not in converted and frozen.match(k)]


def describe_kind(kind: Optional[str]) -> str:
    """What a file of :func:`kind_of` ``kind`` is and what to do with it."""
    return _ADVICE.get(kind, 'of no model this tool knows')


def sera_to_peer(state_dict: Mapping[str, Tensor],
                 peer: str,
                 extras: Optional[Mapping[str, Tensor]] = None
                 ) -> Dict[str, Tensor]:
    """Our segmentor's state dict -> the authors' ``model.state_dict()``
    (without ``module.``; see :func:`wrap_peer_state`).

    The authors load strictly, so the extras are written too: from
    ``extras`` (what :func:`peer_extras` kept) where given, else
    ``mask_token`` zeros (1 x C; DETRIS never masks at inference) and
    ``logit_scale`` = ln(1 / 0.07) (CLIP's initial value; unused).

    Raises:
        ValueError: keys no rule accepts (listed), or a DINOv2 that
            resamples its position table otherwise than DETRIS does.
    """
    state = dict(state_dict)
    marks = dict(detris='backbone.adapters.parallel_mlp.',
                 etris='backbone.adapters.bridge.')
    other = [p for p, mark in marks.items()
             if p != peer and any(k.startswith(mark) for k in state)]
    if other and not any(k.startswith(marks[peer]) for k in state):
        raise ValueError(
            f'an mmseg_sera {other[0].upper()} model, not {peer.upper()}: '
            f'write it with tools/model_converters/{other[0]}_to_sera.py '
            '--reverse')
    if peer == 'detris':
        rec = state.pop(DETRIS_RESAMPLING_KEY, None)
        if rec is not None and tuple(rec.tolist()) != DETRIS_RESAMPLING:
            raise ValueError(
                f'{DETRIS_RESAMPLING_KEY} = {rec.tolist()}: this model '
                'resamples its position table with interpolate_offset='
                f'{rec[0].item() / 1e4}, antialias={bool(rec[1])}; DETRIS\'s '
                'code always uses 0.1 without antialias, so its outputs '
                'would differ')
    out, unknown = {}, []
    for key, value in state.items():
        new = rename_key(key, peer, reverse=True)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value.clone()
    if unknown:
        raise _unknown_error(unknown, 'mmseg_sera', peer)
    extras = dict(extras or {})
    for key in EXTRAS[peer]:
        if key in extras:
            out[key] = extras[key].clone()
        elif key.endswith('mask_token'):
            width = out['dinov2.cls_token'].shape[-1]
            out[key] = out['dinov2.cls_token'].new_zeros(1, width)
        else:
            out[key] = torch.tensor(math.log(1 / 0.07))
    return out


def wrap_peer_state(state_dict: Mapping[str, Tensor]) -> Dict:
    """``{'state_dict': {'module.' + key: tensor}}``: what the authors'
    ``test.py`` (``DataParallel``, strict load) reads."""
    return dict(state_dict={'module.' + k: v for k, v in state_dict.items()})


def check_keys(state_dict: Mapping[str, Tensor],
               expected: Mapping[str, Tuple[int, ...]], peer: str) -> None:
    """Compare a converted state dict with a model's (key -> shape).

    Raises:
        ValueError: listing the missing keys (with the authors' names), the
            unexpected ones and the shape mismatches, so that a checkpoint
            of another size or variant than the config is named as such.
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f'{k}: checkpoint {tuple(state_dict[k].shape)}, model '
        f'{tuple(expected[k])}' for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or shapes):
        return
    lines = [f'the converted {peer.upper()} checkpoint does not match the '
             'model of the config:']
    if missing:
        named = [f'{k} (theirs: {rename_key(k, peer, reverse=True)})'
                 for k in missing[:10]]
        lines.append(f'  {len(missing)} missing: {named}'
                     f'{" ..." if len(missing) > 10 else ""}')
        if any(_FROZEN[peer].match(k) for k in missing):
            lines.append('  (frozen tower tensors are among them: for a file '
                         'saved without its towers, give the DINOv2 / CLIP '
                         'files: --dinov2 / --clip, or the config\'s tower '
                         'checkpoints in place)')
    if unexpected:
        lines.append(f'  {len(unexpected)} unexpected: {unexpected[:10]}'
                     f'{" ..." if len(unexpected) > 10 else ""}')
    if shapes:
        lines.append(f'  {len(shapes)} of another shape (another model '
                     f'size or width than the config?): {shapes[:6]}'
                     f'{" ..." if len(shapes) > 6 else ""}')
    raise ValueError('\n'.join(lines))


def key_table(keys: Sequence[str], peer: str,
              reverse: bool = False) -> List[Tuple[str, str]]:
    """(source key, target key) for each key, in order; extras and our
    resampling record are shown as ``'(dropped)'`` / ``'(written)'``."""
    rows = []
    for key in keys:
        if not reverse and key in EXTRAS[peer]:
            rows.append((key, '(dropped: unused at inference)'))
        elif reverse and key == DETRIS_RESAMPLING_KEY and peer == 'detris':
            rows.append((key, '(dropped: DETRIS always resamples so)'))
        else:
            rows.append((key, rename_key(key, peer, reverse) or '(UNKNOWN)'))
    return rows
