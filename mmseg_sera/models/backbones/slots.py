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
``post_block``         ``A(patches, hw=(h, w), text=T[, second=S])``
                       after block i; patches B x N x C, S the second
                       modality's B x N2 x C2 tokens for block i (only
                       when the tower is given some, see
                       :meth:`AdapterSlots.run_post_block`)
                       -> :class:`AdapterOutput`
``parallel_mlp``       ``A(h, hw=(h, w), text=T, num_prefix=P)`` beside
                       the MLP of block i, inside ``ls2``; h = LN2(z) of
                       all P + N tokens -> B x (P + N) x C
``parallel_mlp_text``  ``A(x)`` beside the MLP of text block j; x the
                       un-normalised stream after attention, B x L x Ct
                       -> B x L x Ct
``bridge``             ``A(s, patches, x_text, hw=(h, w), text_mask=M,
                       carry=c)`` after image block i, stage s, with the
                       text stream advanced to the text block beside i
                       -> :class:`BridgeOutput` (both streams updated)
=====================  ==================================================

:class:`AdapterSlots` is the one implementation: a tower declares the kinds
it supports, the slots build and validate the adapter configs and hand the
block loop what it needs (:meth:`AdapterSlots.branches`,
:meth:`AdapterSlots.run_post_block`, :meth:`AdapterSlots.start_lockstep`).
State-dict keys: ``post_block`` adapters sit at ``adapters.{i}`` (the
established layout), every other kind at ``adapters.{kind}.{i}``, except the
bridge: one module spans all its blocks (its stages are chained), at
``adapters.bridge``.

Lock-step text (``bridge``): the backbone gets a *text stream* (see
:class:`~mmseg_sera.models.text_encoders.clip_text.TextStream`: ``x``
B x L x Ct, ``mask`` B x L, ``num_layers``, ``next_block``, ``step(j)``,
``with_x(x)``, ``end()``) and runs its blocks beside its own through
:class:`LockstepRun`. With Lv image and Lt text blocks, text block j runs
right after image block ``floor((j + 1) Lv / Lt) - 1`` (j = i for equal
depths; j after 2j + 1 for 24 vs 12), before the bridge of that block.
"""
from functools import partial
from typing import (Any, Callable, Dict, List, NamedTuple, Optional,
                    Sequence, Tuple, Type, Union)

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
    'bridge': 'after image block i, with a text block beside it (ETRIS); '
    'updates the patch tokens and all text tokens',
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


#: what a tower's own parameters do (its adapters always train)
TRAINABLE_MODES = ('frozen', 'ln_bias', 'full')


def set_trainable(tower: nn.Module, mode: str) -> None:
    """``requires_grad`` of a tower's own parameters, ``adapters.*`` left
    alone (they always train): ``'full'`` all, ``'frozen'`` none,
    ``'ln_bias'`` every LayerNorm weight and bias and every other bias term
    (the SERA paper's policy)."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f'trainable must be one of {TRAINABLE_MODES}, got '
                         f'{mode!r}')
    for prefix, m in tower.named_modules():
        if prefix == 'adapters' or prefix.startswith('adapters.'):
            continue
        is_norm = isinstance(m, nn.LayerNorm)
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(mode == 'full' or (
                mode == 'ln_bias' and (is_norm or name.endswith('bias'))))


def resolve_block_indices(indices: Union[int, Sequence[int]], num_layers: int,
                          name: str) -> Tuple[int, ...]:
    """Block indices (negative ones counted from the end) -> sorted
    0..num_layers-1; out-of-range or repeated entries raise ``ValueError``
    naming ``name``."""
    if isinstance(indices, int):
        indices = (indices, )
    out = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f'{name} entry {i} is out of range for '
                             f'{num_layers} blocks')
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f'{name} {tuple(indices)} has duplicates')
    return tuple(sorted(out))


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
    per insert index (no sharing), except for a ``bridge``: one module for
    all its blocks (:meth:`add_bridge`), at most one per tower. Errors raise
    ``ValueError``: a missing ``type``, an unknown or unsupported slot kind,
    indices out of range or after ``last_index``, duplicated indices (within
    or across entries of one kind), a class that is not a bridge in the
    ``bridge`` slot.
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
        classes = []
        for n, entry in enumerate(cfgs):
            if not isinstance(entry, dict):
                raise ValueError(f'{self.owner}: adapters[{n}] must be a '
                                 f'dict, got {type(entry).__name__}')
            cfg = dict(entry)
            if 'type' not in cfg:
                raise ValueError(f'{self.owner}: adapters[{n}] has no '
                                 f"'type' ({entry})")
            cls = _adapter_class(cfg['type'], self.owner)
            classes.append(cls)
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
            if kind == 'bridge':
                self._check_kind(kind)
                if declared != 'bridge':
                    raise ValueError(
                        f"{self.owner}: {what} is not a bridge adapter (a "
                        "'bridge' class declares slot_kind = 'bridge' and "
                        'runs stage by stage, see ETRISBridger)')
                self.add_bridge(insert, cfg, scale=scale, what=what)
                continue
            for i in insert:
                self.add(kind, i, cfg, scale=scale, what=what)
        # a class whose instances share parts across blocks ties them here,
        # once all are built (SpectralMoEAdapter: W_tf, W_df and s)
        for cls in dict.fromkeys(classes):
            hook = getattr(cls, 'after_slots_built', None)
            if hook is not None:
                hook(self)

    def _check_kind(self, kind: str) -> None:
        if kind not in SLOT_KINDS:
            raise ValueError(f'{self.owner}: unknown slot kind {kind!r}; '
                             f'known: {tuple(SLOT_KINDS)}')
        if kind not in self.kinds:
            raise ValueError(f'{self.owner} has no {kind!r} slot '
                             f'({SLOT_KINDS[kind]}); its slots: {self.kinds}')

    def add_bridge(self, insert: Sequence[int], cfg: Dict, *,
                   scale: Optional[float] = None,
                   what: str = 'bridge') -> None:
        """Build the one ``bridge`` module of this tower.

        Its stages are chained (stage s reads stage s - 1), so a single
        module spans every block of ``insert``: it is built with
        ``insert`` = the resolved block indices in increasing order
        (stage s runs after block ``insert[s]``) and ``embed_dims`` = the
        tower width unless set. Stored at ``adapters.bridge``.
        """
        self._check_kind('bridge')
        if scale is not None:
            raise ValueError(f"{self.owner}: {what}: 'scale' applies to "
                             f"{PARALLEL_KINDS} slots, not 'bridge'")
        if 'bridge' in self:
            raise ValueError(f'{self.owner}: {what}: this tower already has '
                             'a bridge (one bridge module spans all its '
                             'blocks)')
        blocks = [self.resolve_index(i, what) for i in insert]
        if len(set(blocks)) != len(blocks):
            raise ValueError(f'{self.owner}: {what}: insert {tuple(insert)} '
                             'names a block twice')
        cfg = dict(cfg)
        cfg['insert'] = tuple(sorted(blocks))
        cfg.setdefault('embed_dims', self.embed_dims)
        module = MODELS.build(cfg)
        if tuple(getattr(module, 'insert', ())) != cfg['insert']:
            raise ValueError(f'{self.owner}: {what} must keep its insert '
                             f"blocks as 'insert' (got "
                             f'{getattr(module, "insert", None)!r})')
        self['bridge'] = module

    def add(self, kind: str, index: int, cfg: Union[Dict, nn.Module], *,
            scale: Optional[float] = None, what: str = 'adapter') -> None:
        """Place one adapter (a config, built here, or a module)."""
        self._check_kind(kind)
        if kind == 'bridge':
            raise ValueError(f"{self.owner}: {what}: a 'bridge' spans "
                             'several blocks; use add_bridge (or declare it '
                             'in adapters=[...])')
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
    @property
    def bridge_adapter(self) -> Optional[nn.Module]:
        """The ``bridge`` module (its stages run after the blocks
        ``.insert``), or None."""
        return self['bridge'] if 'bridge' in self else None

    def adapter(self, kind: str, i: int) -> Optional[nn.Module]:
        """The ``kind`` adapter of block i, or None (for ``bridge``: the
        bridge module if one of its stages runs after block i)."""
        if kind == 'bridge':
            bridge = self.bridge_adapter
            return bridge if bridge is not None and i in bridge.insert \
                else None
        group = self if kind == 'post_block' else (
            self[kind] if kind in self else None)
        if group is None or str(i) not in group:
            return None
        return group[str(i)]

    def indices(self, kind: str) -> Tuple[int, ...]:
        """Blocks that have a ``kind`` adapter, in increasing order."""
        if kind == 'post_block':
            keys = [k for k in self if k.isdigit()]
        elif kind == 'bridge':
            bridge = self.bridge_adapter
            keys = [] if bridge is None else list(bridge.insert)
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
            hw: Tuple[int, int], text: Optional[TextFeatures],
            second: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[AdapterOutput]]:
        """Apply the ``post_block`` adapter of block i to the patch tokens
        of ``tokens`` (B x (P + N) x C); prefix tokens pass through.

        ``second`` (B x N2 x C2, a second modality's tokens for block i,
        e.g. a frozen depth backbone's block-i tokens) reaches the adapter
        as ``second=`` only when it is not None, so adapters without that
        argument (SERAAdapter) keep working; an adapter that needs it
        decides what a missing one means.

        Returns the tokens and the adapter's output (None without one).
        """
        module = self.adapter('post_block', i)
        if module is None:
            return tokens, None
        P = num_prefix
        extra = {} if second is None else {'second': second}
        out: AdapterOutput = module(tokens[:, P:], hw=hw, text=text, **extra)
        return torch.cat([tokens[:, :P], out.tokens], dim=1), out

    def start_lockstep(self, text_stream: Optional[Any], *,
                       num_prefix: int,
                       hw: Tuple[int, int]) -> Optional['LockstepRun']:
        """Begin one forward's lock-step text stream (see
        :class:`LockstepRun`); None when there is neither a stream nor a
        bridge.

        Raises:
            ValueError: a bridge is configured but no text stream was given
                (e.g. the backbone runs in a stock ``EncoderDecoder``, or
                the segmentor's text encoder has no stream API).
        """
        if text_stream is None:
            if self.bridge_adapter is not None:
                raise ValueError(
                    f'{self.owner} has a bridge adapter '
                    f'({type(self.bridge_adapter).__name__}) and needs a '
                    'lock-step text stream: call forward_features(x, '
                    'text_stream=text_encoder.begin(texts)) '
                    '(ReferringEncoderDecoder '
                    'does this with OpenCLIPTextEncoder); a stock '
                    'EncoderDecoder cannot run it')
            return None
        return LockstepRun(self, text_stream, num_prefix=num_prefix, hw=hw)

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


# --------------------------------------------------------------------------
# lock-step text stream and the bridge
# --------------------------------------------------------------------------
class BridgeOutput(NamedTuple):
    """Return value of a ``bridge`` adapter stage.

    Attributes:
        patches: updated image patch tokens, B x N x C.
        text: updated text stream, B x L x Ct (all tokens).
        carry: what the next stage reads (e.g. ETRIS's chained Ṽ, T̃).
    """
    patches: Tensor
    text: Tensor
    carry: Any = None


def text_block_schedule(num_vision: int,
                        num_text: int) -> Dict[int, Tuple[int, ...]]:
    """Image block -> text blocks that run right after it (lock-step).

    Text block j runs after image block ``floor((j + 1) Lv / Lt) - 1``:
    j = i for equal depths, j after 2j + 1 for Lv = 24, Lt = 12 (the last
    blocks of both towers always line up). Key -1 holds the text blocks
    that run before image block 0 (only when Lt > Lv). Pure function.
    """
    if num_vision < 1 or num_text < 1:
        raise ValueError(f'lock-step needs blocks in both towers, got '
                         f'{num_vision} image and {num_text} text blocks')
    out: Dict[int, List[int]] = {}
    for j in range(num_text):
        out.setdefault((j + 1) * num_vision // num_text - 1, []).append(j)
    return {i: tuple(js) for i, js in out.items()}


class LockstepRun:
    """One forward's text stream beside the image blocks, with the bridge.

    Per-call state only (the text stream and the bridge's carry), built by
    :meth:`AdapterSlots.start_lockstep`. The block loop calls
    :meth:`after_block` after each image block i (after its ``post_block``
    adapter) and :meth:`finish` after the loop::

        run text blocks j scheduled after i     (text_block_schedule)
        if the bridge has a stage s at i:
            patches, x_text, carry = bridge(s, patches, x_text, hw=(h, w),
                                            text_mask=M, carry=carry)
        ...
        finish(): run the text blocks left (after the last image block that
                  runs), then the stream's end() -> TextFeatures

    Prefix tokens (class, registers: the first ``num_prefix``) pass through
    the bridge unchanged; every text token is updated.
    """

    def __init__(self, slots: AdapterSlots, stream: Any, *, num_prefix: int,
                 hw: Tuple[int, int]) -> None:
        for attr in ('x', 'mask', 'num_layers', 'next_block', 'step',
                     'with_x', 'end'):
            if not hasattr(stream, attr):
                raise ValueError(
                    f'{slots.owner}: text_stream lacks {attr!r}; pass the '
                    'state returned by the text encoder\'s begin()')
        if stream.next_block != 0:
            raise ValueError(f'{slots.owner}: the text stream has already '
                             f'run {stream.next_block} blocks; start from '
                             'begin()')
        self.bridge = slots.bridge_adapter
        self.owner = slots.owner
        self.num_prefix = num_prefix
        self.hw = tuple(hw)
        self.schedule = text_block_schedule(slots.num_layers,
                                            stream.num_layers)
        self.stages = {} if self.bridge is None else {
            i: s
            for s, i in enumerate(self.bridge.insert)
        }
        self.carry: Any = None
        self.stream = stream
        for j in self.schedule.get(-1, ()):
            self.stream = self.stream.step(j)

    def after_block(self, i: int, tokens: Tensor) -> Tensor:
        """Advance the text stream beside image block i and run the bridge
        stage of block i (if any) on ``tokens`` (B x (P + N) x C)."""
        for j in self.schedule.get(i, ()):
            self.stream = self.stream.step(j)
        stage = self.stages.get(i)
        if stage is None:
            return tokens
        P = self.num_prefix
        out: BridgeOutput = self.bridge(
            stage, tokens[:, P:], self.stream.x, hw=self.hw,
            text_mask=self.stream.mask, carry=self.carry)
        self.carry = out.carry
        self.stream = self.stream.with_x(out.text)
        return torch.cat([tokens[:, :P], out.patches], dim=1)

    def finish(self) -> TextFeatures:
        """Run the remaining text blocks and return the final
        :class:`TextFeatures` of the (bridge-modified) stream."""
        while self.stream.next_block < self.stream.num_layers:
            self.stream = self.stream.step(self.stream.next_block)
        return self.stream.end()
