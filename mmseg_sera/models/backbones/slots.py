"""Adapter slots of a transformer block loop, shared by every tower.

A *slot kind* says where an adapter sits in a pre-norm block and what it
gets. With z the token stream of block i::

    z = z + ls1(attn(norm1 z))
    h = norm2 z
    z = z + ls2(mlp(h) + sum_a s_a * A_a(h, ctx))   # 'parallel_mlp'
    z = post_block adapters (patch tokens only)      # 'post_block'

and for a CLIP text block j (no LayerScale), x the raw residual stream::

    x = x + attn(ln_1 x)
    x = x + mlp(ln_2 x) + sum_a s_a * A_a(x)        # 'parallel_mlp_text'

=====================  ==================================================
kind                   call and return value
=====================  ==================================================
``post_block``         ``A(patches, hw=(h, w), text=T)`` after block i;
                       patches B x N x C -> :class:`AdapterOutput`
``parallel_mlp``       ``A(h, hw=(h, w), text=T, num_prefix=P)`` beside
                       the MLP of block i, inside ``ls2``; h = LN2(z) of
                       all P + N tokens -> B x (P + N) x C
``parallel_mlp_text``  ``A(x)`` beside the MLP of text block j; x the
                       un-normalised stream after attention, B x L x Ct
                       -> B x L x Ct
``bridge``             reserved (ETRIS: a text block beside image block i)
=====================  ==================================================

:class:`AdapterSlots` is the one implementation: a tower declares the kinds
it supports, the slots build and validate the adapter configs and hand the
block loop what it needs (:meth:`AdapterSlots.branches`,
:meth:`AdapterSlots.run_post_block`). State-dict keys: ``post_block``
adapters sit at ``adapters.{i}`` (the established layout), every other kind
at ``adapters.{kind}.{i}``.
"""
from functools import partial
from typing import (Callable, Dict, List, Optional, Sequence, Tuple, Type,
                    Union)

import torch
import torch.nn as nn
from mmengine.model import ModuleDict
from torch import Tensor

from mmseg.registry import MODELS
from ..structures import AdapterOutput, TextFeatures

#: every slot kind mmseg_sera knows, and where it sits
SLOT_KINDS: Dict[str, str] = {
    'post_block': 'after block i, on the patch tokens',
    'parallel_mlp': 'beside the MLP of block i, inside LayerScale 2, on '
    'LN2(z) of all tokens',
    'parallel_mlp_text': 'beside the MLP of text block j, on the raw '
    'residual stream after attention',
    'bridge': 'after image block i, with a text block beside it (ETRIS)',
}

#: kinds whose adapters return an update that is scaled and summed
PARALLEL_KINDS = ('parallel_mlp', 'parallel_mlp_text')


def _adapter_class(type_: Union[str, Type[nn.Module]],
                   owner: str) -> Type[nn.Module]:
    if isinstance(type_, type):
        return type_
    cls = MODELS.get(type_)
    if cls is None:
        raise ValueError(f'{owner}: unknown adapter type {type_!r} (not in '
                         'the mmseg MODELS registry; is its module imported?)')
    return cls


class AdapterSlots(ModuleDict):
    """The adapters of one tower, by slot kind and block index.

    Args:
        owner: the tower's name, for error messages.
        kinds: the slot kinds this tower supports (subset of
            :data:`SLOT_KINDS`).
        num_layers: number of blocks; ``insert`` indices may be negative
            (counted from the end).
        embed_dims: the tower's width, filled into every adapter config as
            ``embed_dims`` unless the config sets it.
        last_index: the last block that runs (an adapter after it would
            never run); default ``num_layers - 1``.

    A config entry (see :meth:`build`)::

        dict(type='DETRISDenseAligner', insert=(1, 3, 5), slot='parallel_mlp',
             scale=0.2, **adapter_kwargs)

    ``slot`` defaults to the adapter class's ``slot_kind`` attribute; a class
    that declares one refuses other slots. ``scale`` (parallel kinds only,
    default 1.0) multiplies the adapter's output. One adapter module is built
    per insert index (no sharing). Errors raise ``ValueError``: a missing
    ``type``, an unknown or unsupported slot kind, indices out of range or
    after ``last_index``, duplicated indices (within or across entries of one
    kind).
    """

    def __init__(self, *, owner: str, kinds: Sequence[str], num_layers: int,
                 embed_dims: int, last_index: Optional[int] = None) -> None:
        super().__init__()
        unknown = set(kinds) - set(SLOT_KINDS)
        if unknown:
            raise ValueError(f'{owner}: unknown slot kinds {sorted(unknown)}')
        self.owner = owner
        self.kinds = tuple(kinds)
        self.num_layers = num_layers
        self.embed_dims = embed_dims
        self.last_index = num_layers - 1 if last_index is None else last_index
        # (kind, block) -> output scale of a parallel adapter
        self.scales: Dict[Tuple[str, int], float] = {}

    # ------------------------------------------------------------------
    # building
    # ------------------------------------------------------------------
    def resolve_index(self, i: int, what: str) -> int:
        """Block index (negative from the end) -> 0..num_layers-1."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f'{self.owner}: {what} index {i!r} is not an int')
        j = i + self.num_layers if i < 0 else i
        if not 0 <= j < self.num_layers:
            raise ValueError(f'{self.owner}: {what} index {i} is out of '
                             f'range for {self.num_layers} blocks')
        if j > self.last_index:
            raise ValueError(
                f'{self.owner}: {what} index {i} is after the last block '
                f'that runs ({self.last_index}): such an adapter would not '
                'change any output')
        return j

    def build(self, cfgs: Sequence[Dict]) -> None:
        """Build every entry of ``cfgs`` (see the class docstring)."""
        if isinstance(cfgs, dict):
            cfgs = [cfgs]
        for n, entry in enumerate(cfgs):
            if not isinstance(entry, dict):
                raise ValueError(f'{self.owner}: adapters[{n}] must be a '
                                 f'dict, got {type(entry).__name__}')
            cfg = dict(entry)
            if 'type' not in cfg:
                raise ValueError(f'{self.owner}: adapters[{n}] has no '
                                 f"'type' ({entry})")
            cls = _adapter_class(cfg['type'], self.owner)
            declared = getattr(cls, 'slot_kind', None)
            kind = cfg.pop('slot', declared)
            what = f'adapters[{n}] ({getattr(cls, "__name__", cls)})'
            if kind is None:
                raise ValueError(f"{self.owner}: {what} needs a 'slot' "
                                 f'(one of {self.kinds})')
            if declared is not None and kind != declared:
                raise ValueError(
                    f'{self.owner}: {what} is a {declared!r} adapter and '
                    f'cannot go in slot {kind!r}')
            if 'insert' not in cfg:
                raise ValueError(f"{self.owner}: {what} has no 'insert' "
                                 '(block indices)')
            insert = cfg.pop('insert')
            if isinstance(insert, int):
                insert = (insert, )
            if not insert:
                raise ValueError(f"{self.owner}: {what} has an empty "
                                 "'insert'")
            scale = cfg.pop('scale', None)
            for i in insert:
                self.add(kind, i, cfg, scale=scale, what=what)

    def add(self, kind: str, index: int, cfg: Union[Dict, nn.Module], *,
            scale: Optional[float] = None, what: str = 'adapter') -> None:
        """Place one adapter (a config, built here, or a module)."""
        if kind not in SLOT_KINDS:
            raise ValueError(f'{self.owner}: unknown slot kind {kind!r}; '
                             f'known: {tuple(SLOT_KINDS)}')
        if kind not in self.kinds:
            raise ValueError(f'{self.owner} has no {kind!r} slot '
                             f'({SLOT_KINDS[kind]}); its slots: {self.kinds}')
        if kind == 'bridge':
            raise ValueError(f"{self.owner}: slot 'bridge' is reserved and "
                             'not implemented yet')
        if scale is not None and kind not in PARALLEL_KINDS:
            raise ValueError(f"{self.owner}: {what}: 'scale' applies to "
                             f'{PARALLEL_KINDS} slots, not {kind!r}')
        i = self.resolve_index(index, what)
        if self.adapter(kind, i) is not None:
            raise ValueError(f'{self.owner}: {what}: block {i} already has a '
                             f'{kind!r} adapter (duplicate insert index)')
        if isinstance(cfg, nn.Module):
            module = cfg
        else:
            cfg = dict(cfg)
            cfg.setdefault('embed_dims', self.embed_dims)
            module = MODELS.build(cfg)
        if kind == 'post_block':
            self[str(i)] = module
            return
        if kind not in self:
            self[kind] = ModuleDict()
        self[kind][str(i)] = module
        self.scales[(kind, i)] = 1.0 if scale is None else float(scale)

    # ------------------------------------------------------------------
    # lookup
    # ------------------------------------------------------------------
    def adapter(self, kind: str, i: int) -> Optional[nn.Module]:
        """The ``kind`` adapter of block i, or None."""
        group = self if kind == 'post_block' else (
            self[kind] if kind in self else None)
        if group is None or str(i) not in group:
            return None
        return group[str(i)]

    def indices(self, kind: str) -> Tuple[int, ...]:
        """Blocks that have a ``kind`` adapter, in increasing order."""
        if kind == 'post_block':
            keys = [k for k in self if k.isdigit()]
        else:
            keys = list(self[kind]) if kind in self else []
        return tuple(sorted(int(k) for k in keys))

    def branches(self, kind: str, i: int,
                 **ctx) -> List[Callable[[Tensor], Tensor]]:
        """Parallel branches of block i: ``[h -> s * A(h, **ctx)]`` (empty
        when block i has no ``kind`` adapter)."""
        module = self.adapter(kind, i)
        if module is None:
            return []
        return [partial(_scaled, module, self.scales[(kind, i)], ctx)]

    def run_post_block(
            self, i: int, tokens: Tensor, *, num_prefix: int,
            hw: Tuple[int, int], text: Optional[TextFeatures]
    ) -> Tuple[Tensor, Optional[AdapterOutput]]:
        """Apply the ``post_block`` adapter of block i to the patch tokens
        of ``tokens`` (B x (P + N) x C); prefix tokens pass through.

        Returns the tokens and the adapter's output (None without one).
        """
        module = self.adapter('post_block', i)
        if module is None:
            return tokens, None
        P = num_prefix
        out: AdapterOutput = module(tokens[:, P:], hw=hw, text=text)
        return torch.cat([tokens[:, :P], out.tokens], dim=1), out

    def emptied(self) -> 'AdapterSlots':
        """A slot set of the same tower with no adapters (to run the tower
        bare, e.g. for a frozen-backbone benchmark)."""
        return AdapterSlots(owner=self.owner, kinds=self.kinds,
                            num_layers=self.num_layers,
                            embed_dims=self.embed_dims,
                            last_index=self.last_index)

    def extra_repr(self) -> str:
        return f'owner={self.owner}, kinds={self.kinds}'


def _scaled(module: nn.Module, scale: float, ctx: Dict, h: Tensor) -> Tensor:
    """``scale * module(h, **ctx)`` (a parallel branch)."""
    out = module(h, **ctx)
    return out if scale == 1.0 else scale * out
