"""SpectralMoE's released ``DepthMoE`` weights onto our
:class:`~mmseg_sera.models.adapters.SpectralMoEAdapter` slots (pure
functions, state dict in, state dict out; CLI
``tools/model_converters/spectralmoe_to_sera.py``).

The released module (``SpectralMoE/models/backbones/depthmoe.py``, on a
DINOv3-L; saved under ``backbone.depthmoe.``) holds every layer in one
module; ours is one adapter per block in the tower's ``post_block`` slots
(``adapters.{i}.``), built with ``released_compat=True`` and no second
projection (the depth tokens are as wide as the image tokens). Key map,
for the released layer l on our block i = ``blocks[l]``:

=======================================  ===================================
released                                 ours (``adapters.`` + ...)
=======================================  ===================================
``experts_a.{l}.{e}`` (T x r)            ``{i}.experts.tokens_a[e]``
``experts_b.{l}.{e}`` (r x D)            ``{i}.experts.tokens_b[e]``
``w_gate.{l}.0`` / ``w_noise.{l}.0``     ``{i}.router.gate.weight`` /
(D x E, image stream)                    ``{i}.router.noise_proj.weight``
                                         (E x D: transposed)
``w_gate.{l}.1`` / ``w_noise.{l}.1``     ``{i}.second_router.*`` (depth)
``mlp_token2feat`` / ``mlp_delta_f``     ``{i0}.shared.token_proj`` /
/ ``scale`` (one for all layers)         ``{i0}.shared.out_proj`` /
                                         ``{i0}.shared.scale``
``transform``, ``merge`` (Mask2Former    dropped
query link), ``mean``, ``std``
=======================================  ===================================

i0 is the lowest block: the adapter that owns the tied shared parts
(:func:`~mmseg_sera.models.adapters.spectral_moe.tie_shared_parts`).
Experts of different ranks (``lora_dims`` not all equal) cannot be
stacked and are refused.
"""
import re
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

_RELEASED_RE = re.compile(
    r'^(experts_[ab]\.\d+\.\d+|w_(gate|noise)\.\d+\.[01]|'
    r'mlp_token2feat\.(weight|bias)|mlp_delta_f\.(weight|bias)|scale|'
    r'transform\.(weight|bias)|merge\.(weight|bias)|mean|std)$')
_DROP = re.compile(r'^(transform\.|merge\.|mean$|std$)')


def unwrap_depthmoe(ckpt: Dict) -> Dict[str, Tensor]:
    """The ``DepthMoE`` keys of a released checkpoint: a plain state dict
    of the module, or a training checkpoint (``state_dict`` / ``model``)
    whose keys sit under ``backbone.depthmoe.`` (the other keys, e.g. the
    Mask2Former head's, are left out)."""
    if not isinstance(ckpt, dict):
        raise ValueError(f'expected a dict checkpoint, got {type(ckpt)}')
    for key in ('state_dict', 'model'):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    for prefix in ('module.backbone.depthmoe.', 'backbone.depthmoe.',
                   'depthmoe.'):
        if any(k.startswith(prefix) for k in ckpt):
            return {k[len(prefix):]: v for k, v in ckpt.items()
                    if k.startswith(prefix)}
    return dict(ckpt)


def convert_depthmoe(state_dict: Dict[str, Tensor],
                     blocks: Optional[Sequence[int]] = None,
                     prefix: str = 'adapters.') -> Dict[str, Tensor]:
    """Released ``DepthMoE`` weights -> our adapter keys.

    Args:
        state_dict: the released module's state dict (or a checkpoint
            holding it, see :func:`unwrap_depthmoe`).
        blocks: our block index of each released layer (default: layer l
            on block l, the release's adapter after every block).
        prefix: put before every key: ``'adapters.'`` loads into the
            adapted tower (``DINOv3`` / ``DINOv2``), e.g.
            ``'backbone.backbone.adapters.'`` into a segmentor whose
            backbone is a ``DualStreamDINOv2``.

    Returns:
        The adapters' state dict (every key under ``prefix``).

    Raises:
        ValueError: keys that are not the released module's, a missing
            expert or gate, experts of different ranks, a ``blocks`` of the
            wrong length or with repeats.
    """
    sd = unwrap_depthmoe(state_dict)
    unknown = sorted(k for k in sd if not _RELEASED_RE.match(k))
    if unknown:
        raise ValueError(
            f'{len(unknown)} key(s) are not those of the released DepthMoE '
            f'module: {unknown[:8]}')
    layers = sorted({int(k.split('.')[1]) for k in sd
                     if k.startswith('experts_a.')})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f'expected experts_a.0 .. experts_a.L-1, got '
                         f'layers {layers}')
    L = len(layers)
    if blocks is None:
        blocks = list(range(L))
    blocks = [int(b) for b in blocks]
    if len(blocks) != L or len(set(blocks)) != L:
        raise ValueError(f'blocks must name {L} distinct blocks (one per '
                         f'released layer), got {blocks}')
    experts = sorted({int(k.split('.')[2]) for k in sd
                      if k.startswith('experts_a.0.')})
    E = len(experts)
    out: Dict[str, Tensor] = {}
    for layer, i in enumerate(blocks):
        for part, name in (('a', 'tokens_a'), ('b', 'tokens_b')):
            try:
                mats = [sd[f'experts_{part}.{layer}.{e}'] for e in range(E)]
            except KeyError as err:
                raise ValueError(
                    f'layer {layer}: missing {err.args[0]}') from err
            if len({tuple(m.shape) for m in mats}) != 1:
                raise ValueError(
                    f'layer {layer}: experts of different ranks '
                    f'({[tuple(m.shape) for m in mats]}) cannot be stacked '
                    'into one LowRankTokenExpert')
            out[f'{i}.experts.{name}'] = torch.stack(mats)
        for m, router in ((0, 'router'), (1, 'second_router')):
            for src, dst in (('w_gate', 'gate'), ('w_noise', 'noise_proj')):
                key = f'{src}.{layer}.{m}'
                if key not in sd:
                    raise ValueError(f'layer {layer}: missing {key}')
                out[f'{i}.{router}.{dst}.weight'] = sd[key].t()
    owner = min(blocks)
    for src, dst in (('mlp_token2feat', 'token_proj'),
                     ('mlp_delta_f', 'out_proj')):
        for p in ('weight', 'bias'):
            if f'{src}.{p}' not in sd:
                raise ValueError(f'missing {src}.{p}')
            out[f'{owner}.shared.{dst}.{p}'] = sd[f'{src}.{p}']
    if 'scale' not in sd:
        raise ValueError('missing scale (the released zero_mlp_delta_f '
                         'variant, without it, is not supported)')
    out[f'{owner}.shared.scale'] = sd['scale'].reshape(())
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


def released_adapter_cfg(state_dict: Dict[str, Tensor]) -> Dict:
    """The ``SpectralMoEAdapter`` options that match released weights
    (sizes read from the tensors; everything else ``released_compat``)."""
    sd = unwrap_depthmoe(state_dict)
    a, b = sd['experts_a.0.0'], sd['experts_b.0.0']
    return dict(
        type='SpectralMoEAdapter',
        num_experts=sd['w_gate.0.0'].shape[1],
        token_length=a.shape[0],
        rank=a.shape[1],
        second_source='tokens',
        num_layers=len({k.split('.')[1] for k in sd
                        if k.startswith('experts_a.')}),
        released_compat=True,
        embed_dims=b.shape[1])
