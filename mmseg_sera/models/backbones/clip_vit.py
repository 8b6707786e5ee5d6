"""CLIP ViT image tower (open_clip) as a backbone with adapter slots.

The tower is built by open_clip's own vision-tower builder from one of its
bundled model configs (``'ViT-B-16'`` by default), offline; pretrained
weights are a local open_clip checkpoint loaded in
:meth:`CLIPViT.init_weights`. Parameter names are open_clip's ``visual.*``
names without the prefix::

    conv1                    Conv2d(3, C, p, stride p, no bias)
    class_embedding          C
    positional_embedding     (1 + gh * gw) x C   (class position first)
    ln_pre                   LayerNorm
    transformer.resblocks.N  ln_1 / attn (nn.MultiheadAttention) / ln_2 /
                             mlp.c_fc / mlp.c_proj
    ln_post                  LayerNorm
    proj                     C x Cp               (joint CLIP space)

The block loop is written out in :meth:`CLIPViT.forward_features`; adapters
run in the slots of :class:`~mmseg_sera.models.backbones.slots.AdapterSlots`
(``post_block``, ``parallel_mlp``, ``bridge``). See ``docs/backbone.md``
and, for ETRIS, ``docs/peers.md``.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from ..clip_checkpoint import read_clip_checkpoint
from ..structures import BackboneOutput, TextFeatures, merge_losses
from .slots import (TRAINABLE_MODES, AdapterSlots, resolve_block_indices,
                    set_trainable)

# vision_cfg options of open_clip that this backbone does not implement
_UNSUPPORTED_VISION_CFG = dict(
    timm_model_name='a timm trunk',
    attentional_pool='an attentional pooler (CoCa)',
    final_ln_after_pool='ln_post after pooling',
)

VISUAL_KEYS = ('conv1.', 'class_embedding', 'positional_embedding',
               'ln_pre.', 'transformer.', 'ln_post.', 'proj')


def extract_visual_state_dict(
        state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The image-tower entries of a checkpoint, in this backbone's layout.

    Pure function: state dict in, state dict out. Accepts

    * a full open_clip ``CLIP`` state dict: the ``visual.*`` keys, prefix
      stripped (the text tower, ``logit_scale`` etc. are dropped);
    * the same wrapped in ``{'state_dict': ...}`` or ``{'model': ...}``,
      keys prefixed with ``module.`` (DDP);
    * a whole mmseg_sera segmentor checkpoint: the ``backbone.*`` keys
      (adapters dropped);
    * a state dict already in this layout (``conv1.weight`` ...).

    Raises:
        ValueError: no image-tower key found.
    """
    for wrapper in ('state_dict', 'model'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    state_dict = {(k[len('module.'):] if k.startswith('module.') else k): v
                  for k, v in state_dict.items()}
    for prefix in ('visual.', 'backbone.'):
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {
                k[len(prefix):]: v
                for k, v in state_dict.items() if k.startswith(prefix)
            }
            break
    out = {
        k: v
        for k, v in state_dict.items()
        if k.startswith(VISUAL_KEYS) and not k.startswith('adapters.')
    }
    if 'conv1.weight' not in out:
        raise ValueError(
            'no CLIP image-tower keys (visual.conv1.weight, '
            'visual.positional_embedding, visual.transformer.resblocks.*, '
            'visual.ln_post.*, visual.proj) found in the checkpoint; first '
            f'keys: {list(state_dict)[:5]}')
    return out


def resize_pos_table(table: Tensor, src_grid: Tuple[int, int],
                     dst_grid: Tuple[int, int]) -> Tensor:
    """Resample a CLIP position table (1 + gh * gw) x C to another grid.

    The class row is kept; the gh x gw grid rows are resized bicubically
    (``align_corners=False``, no antialias, in float32) to h x w, the way
    ETRIS resizes the 14 x 14 table to 26 x 26 when it loads CLIP. The same
    function resamples at run time, so resizing at load and at run time
    give the same table. Pure function; returns ``table`` itself when the
    grids agree.
    """
    (gh, gw), (h, w) = tuple(src_grid), tuple(dst_grid)
    if (gh, gw) == (h, w):
        return table
    C = table.shape[-1]
    if table.shape[0] != 1 + gh * gw:
        raise ValueError(f'position table has {table.shape[0]} rows, a '
                         f'{gh} x {gw} grid needs {1 + gh * gw}')
    grid = table[1:].float().reshape(1, gh, gw, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode='bicubic',
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, C).to(table.dtype)
    return torch.cat([table[:1], grid], dim=0)


def _pair(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f'expected an int or a pair, got {x}')
    return x


@MODELS.register_module()
class CLIPViT(BaseModule):
    """CLIP vision transformer (open_clip) with adapter slots.

    Per image, with h x w = the patch grid::

        z = [cls, conv1(x) patches] + pos(h, w)       B x (1 + N) x C
        z = ln_pre(z)
        for block i:  z = resblock_i(z)  (+ adapters, lock-step text)
        level i       = patches(z)                     B x C x h x w
        last level    = ln_post(patches(z)) [@ proj]   B x (C | Cp) x h x w

    The position table covers a stored gh x gw grid (the checkpoint's
    14 x 14 for ViT-B/16 at 224, or ``pos_embed_size``) and is resampled
    bicubically at run time to any h x w (non-square too); a stored grid
    equal to h x w is used as is.

    Args:
        model_name: a bundled open_clip model config (``'ViT-B-16'``); its
            ``vision_cfg`` and ``embed_dim`` define the tower. Hub/local-dir
            schemas are refused (offline).
        vision_cfg: overrides merged onto the named ``vision_cfg`` (tests:
            ``dict(width=32, layers=4, head_width=16, patch_size=16)``).
        embed_dim: override of Cp, the width of ``proj``.
        quick_gelu: QuickGELU activations; ``None`` takes the named config's
            value. OpenAI's CLIP weights (ETRIS) need ``True``.
        pretrained: path of a LOCAL checkpoint (a full open_clip CLIP state
            dict, its ``visual.*`` part, or this layout), loaded in
            :meth:`init_weights`; ``None`` keeps open_clip's random init.
        pos_embed_size: side (or (gh, gw)) of the stored position grid.
            ``None``: the config's ``image_size / patch_size`` (14 for
            ViT-B-16). A checkpoint with another grid is resized to it at
            load time (ETRIS: 26 for 416 px, so that its trained table has
            (26^2 + 1) x 768 = 519,936 entries).
        out_indices: blocks whose outputs are returned (negative from the
            end), in increasing order, as B x C x h x w maps (patch tokens
            only; ETRIS: ``(3, 7, 11)``).
        out_norm: ``'last'`` (``ln_post`` on the last level), ``'all'`` or
            ``'none'``.
        out_proj: also multiply the last level by ``proj`` (C -> Cp), i.e.
            ``ln_post(patches) @ proj`` as ETRIS's third level (512-d for
            ViT-B/16). Needs ``out_norm`` != ``'none'``.
        adapters: adapters of the slot kinds ``post_block``,
            ``parallel_mlp`` and ``bridge`` (see
            :class:`~mmseg_sera.models.backbones.slots.AdapterSlots`).
        trainable: ``'frozen'``, ``'ln_bias'`` (every LayerNorm weight/bias
            and every bias) or ``'full'``. Adapters always train; unless
            ``'full'`` the tower's own modules stay in eval mode.
        train_pos_embed: the position table trains whatever ``trainable``
            says (ETRIS).
        with_cp: gradient checkpointing per block (training with grad).
        init_cfg: mmengine init config; ``dict(type='Pretrained',
            checkpoint=PATH)`` is the same as ``pretrained=PATH``.
    """
    SLOT_KINDS = ('post_block', 'parallel_mlp', 'bridge')
    TRAINABLE = TRAINABLE_MODES
    OUT_NORM = ('last', 'all', 'none')

    def __init__(self,
                 *,
                 model_name: str = 'ViT-B-16',
                 vision_cfg: Optional[dict] = None,
                 embed_dim: Optional[int] = None,
                 quick_gelu: Optional[bool] = None,
                 pretrained: Optional[str] = None,
                 pos_embed_size: Optional[Union[int, Sequence[int]]] = None,
                 out_indices: Sequence[int] = (-1, ),
                 out_norm: str = 'last',
                 out_proj: bool = False,
                 adapters: Sequence[Dict] = (),
                 trainable: str = 'frozen',
                 train_pos_embed: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[Union[Dict, List[Dict]]] = None) -> None:
        if isinstance(init_cfg, dict) and init_cfg.get(
                'type') == 'Pretrained':
            if pretrained is not None:
                raise ValueError('CLIPViT: give the checkpoint either as '
                                 'pretrained or as init_cfg, not both')
            pretrained, init_cfg = init_cfg.get('checkpoint'), None
        super().__init__(init_cfg=init_cfg)
        from open_clip import get_model_config
        from open_clip.model import _build_vision_tower
        from open_clip.transformer import ResidualAttentionBlock

        if ':' in model_name:
            raise ValueError(
                f'CLIPViT: model_name={model_name!r} names a hub or '
                'local-dir model; only open_clip\'s bundled configs are '
                'supported (offline), e.g. "ViT-B-16"')
        model_cfg = get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f'CLIPViT: unknown open_clip model '
                             f'{model_name!r}; see open_clip.list_models()')
        cfg = dict(model_cfg['vision_cfg'])
        cfg.update(vision_cfg or {})
        for key, what in _UNSUPPORTED_VISION_CFG.items():
            if cfg.get(key):
                raise ValueError(f'CLIPViT: vision_cfg {key}={cfg[key]!r} '
                                 f'({what}) is not supported')
        if isinstance(cfg.get('layers', 12), (tuple, list)):
            raise ValueError('CLIPViT: a ResNet tower (layers as a tuple) is '
                             'not a ViT')
        if cfg.get('pos_embed_type', 'learnable') != 'learnable':
            raise ValueError('CLIPViT: only a learnable position table is '
                             f'supported, got {cfg["pos_embed_type"]!r}')
        if cfg.get('patch_dropout', 0.):
            raise ValueError('CLIPViT: patch_dropout drops patch tokens and '
                             'breaks the dense maps; set it to 0')
        if trainable not in self.TRAINABLE:
            raise ValueError(f'CLIPViT: trainable must be one of '
                             f'{self.TRAINABLE}, got {trainable!r}')
        if out_norm not in self.OUT_NORM:
            raise ValueError(f'CLIPViT: out_norm must be one of '
                             f'{self.OUT_NORM}, got {out_norm!r}')
        if out_proj and out_norm == 'none':
            raise ValueError("CLIPViT: out_proj=True projects ln_post's "
                             "output; it needs out_norm='last' or 'all'")
        patch = _pair(cfg.get('patch_size', 16))
        native_grid = tuple(
            s // p for s, p in zip(_pair(cfg.get('image_size', 224)), patch))
        grid = native_grid if pos_embed_size is None else _pair(
            pos_embed_size)
        # the tower allocates its table for image_size / patch_size
        cfg['image_size'] = tuple(g * p for g, p in zip(grid, patch))
        embed_dim = int(embed_dim or model_cfg['embed_dim'])
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get('quick_gelu', False))
        tower = _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu)

        # open_clip's parts at the top level: our keys are its visual keys
        self.conv1 = tower.conv1
        self.class_embedding = tower.class_embedding  # C
        self.positional_embedding = tower.positional_embedding  # 1+gh*gw x C
        self.ln_pre = tower.ln_pre
        self.transformer = tower.transformer
        self.ln_post = tower.ln_post
        self.proj = tower.proj  # C x Cp

        self.model_name = model_name
        self.patch_size = patch
        self.pos_grid = grid
        self._embed_dims = tower.transformer.width
        self.output_dims = embed_dim
        self.num_layers = len(self.blocks)
        self.out_indices = resolve_block_indices(
            out_indices, self.num_layers, 'CLIPViT: out_indices')
        if not self.out_indices:
            raise ValueError('CLIPViT: out_indices must name at least one '
                             'block')
        self.out_norm = out_norm
        self.out_proj = bool(out_proj)
        self.pretrained = pretrained
        self.trainable = trainable
        self.train_pos_embed = bool(train_pos_embed)
        self.with_cp = with_cp

        self.adapters = AdapterSlots(
            owner='CLIPViT', kinds=self.SLOT_KINDS,
            num_layers=self.num_layers, embed_dims=self._embed_dims,
            last_index=self.out_indices[-1])
        self.adapters.build(adapters)
        for i in self.adapters.indices('parallel_mlp'):
            if not isinstance(self.blocks[i], ResidualAttentionBlock):
                raise ValueError(
                    'CLIPViT: parallel_mlp adapters need open_clip\'s '
                    f'ResidualAttentionBlock; block {i} is a '
                    f'{type(self.blocks[i]).__name__}')
        self._apply_trainable()

    @property
    def blocks(self) -> nn.ModuleList:
        """open_clip's residual attention blocks, in order."""
        return self.transformer.resblocks

    @property
    def embed_dims(self) -> int:
        """Token width C."""
        return self._embed_dims

    @property
    def num_prefix_tokens(self) -> int:
        """The class token (CLIP has no registers)."""
        return 1

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each returned level (ETRIS: (768, 768, 512))."""
        chans = [self._embed_dims] * len(self.out_indices)
        if self.out_proj:
            chans[-1] = self.output_dims
        return tuple(chans)

    def backbone_named_parameters(self):
        """The tower's own parameters (adapters excluded)."""
        for name, p in self.named_parameters():
            if not name.startswith('adapters.'):
                yield name, p

    def _apply_trainable(self) -> None:
        set_trainable(self, self.trainable)
        if self.train_pos_embed:
            self.positional_embedding.requires_grad_(True)

    def train(self, mode: bool = True) -> 'CLIPViT':
        """Unless ``trainable='full'`` the tower stays in eval mode and only
        the adapters follow ``mode``."""
        super().train(mode)
        if self.trainable != 'full':
            for name, m in self.named_children():
                if name != 'adapters':
                    m.eval()
        return self

    # ------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------
    def init_weights(self) -> None:
        """open_clip's random init comes from its builder (adapters init
        themselves); with ``pretrained`` the local checkpoint is loaded
        here (never downloaded)."""
        was_init = self._is_init
        super().init_weights()
        if self.pretrained is not None and not was_init:
            self.load_pretrained(self.pretrained)

    def load_pretrained(self, path: str) -> None:
        """Load a local checkpoint (see :func:`extract_visual_state_dict`).

        A position table stored for another grid is resized to
        ``pos_grid`` with :func:`resize_pos_table` (ETRIS's load-time
        resize); every other tensor must match exactly.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: unreadable file, missing or unexpected keys (listed)
                or wrong shapes.
        """
        raw = read_clip_checkpoint(path, 'CLIPViT')
        state = extract_visual_state_dict(raw)
        own = dict(self.backbone_named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f'CLIPViT: checkpoint {path!r} does not match this tower '
                f'(model_name={self.model_name!r}): missing keys '
                f'{missing[:8]}{" ..." if len(missing) > 8 else ""}, '
                f'unexpected keys {unexpected[:8]}'
                f'{" ..." if len(unexpected) > 8 else ""}')
        table = state['positional_embedding']
        C = own['positional_embedding'].shape[-1]
        side = round((table.shape[0] - 1)**0.5)
        if table.dim() == 2 and table.shape[-1] == C and \
                side * side + 1 == table.shape[0] and \
                (side, side) != self.pos_grid:
            state['positional_embedding'] = resize_pos_table(
                table, (side, side), self.pos_grid)
            print_log(
                f'CLIPViT: position table resized from {side} x {side} to '
                f'{self.pos_grid[0]} x {self.pos_grid[1]} (bicubic)',
                logger='current')
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError(
                    f'CLIPViT: checkpoint {path!r}: {key} has shape '
                    f'{tuple(value.shape)}, the tower expects '
                    f'{tuple(own[key].shape)}')
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        print_log(f'CLIPViT: loaded {len(state)} image-tower tensors from '
                  f'{path}', logger='current')

    # ------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------
    def interpolate_pos_embed(self, h: int, w: int,
                              dtype: torch.dtype) -> Tensor:
        """Position table for an h x w grid, (1 + h * w) x C: the stored
        table resampled by :func:`resize_pos_table` (not cached: it may
        train)."""
        return resize_pos_table(self.positional_embedding, self.pos_grid,
                                (h, w)).to(dtype)

    def prepare_tokens(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """B x 3 x H x W -> ``ln_pre([cls, patches] + pos)``,
        B x (1 + h * w) x C, and the grid (h, w). H and W are zero-padded
        at the bottom/right to multiples of the patch size."""
        if x.ndim != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f'CLIPViT expects B x {self.conv1.in_channels} x H x W '
                f'images, got shape {tuple(x.shape)}')
        ph, pw = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % ph, (-x.shape[3]) % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.conv1(x.to(self.conv1.weight.dtype))  # B x C x h x w
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B x hw x C
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)
        x = x + self.interpolate_pos_embed(h, w, x.dtype)
        return self.ln_pre(x), (h, w)

    def _block(self, i: int, x: Tensor, parallel: Sequence) -> Tensor:
        """open_clip block i (batch first), with ``parallel_mlp`` branches
        beside its MLP inside ``ls_2``::

            x = x + ls_1(attn(ln_1 x));  h = ln_2 x
            x = x + ls_2(mlp(h) + sum_a s_a A_a(h))
        """
        block = self.blocks[i]
        if not parallel:
            return block(x)
        x = x + block.ls_1(block.attention(q_x=block.ln_1(x)))
        h = block.ln_2(x)
        update = block.mlp(h)
        for branch in parallel:
            update = update + branch(h)
        return x + block.ls_2(update)

    def _run_block(self, i: int, x: Tensor, parallel: Sequence) -> Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            return cp.checkpoint(self._block, i, x, parallel,
                                 use_reentrant=False)
        return self._block(i, x, parallel)

    def _to_map(self, tokens: Tensor, hw: Tuple[int, int], normed: bool,
                project: bool) -> Tensor:
        """Patch tokens of B x (1 + N) x C -> B x C (or Cp) x h x w."""
        patches = tokens[:, 1:]
        if normed:
            patches = self.ln_post(patches)
        if project:
            patches = patches @ self.proj.to(patches.dtype)
        B, _, C = patches.shape
        return patches.transpose(1, 2).reshape(B, C, *hw).contiguous()

    def forward_features(self,
                         x: Tensor,
                         text: Optional[TextFeatures] = None,
                         text_stream=None) -> BackboneOutput:
        """Run the blocks with the adapter slots (and a lock-step text
        stream).

        Args:
            x: B x 3 x H x W images.
            text: sentence features for ``post_block`` / ``parallel_mlp``
                adapters.
            text_stream: a text stream from the text encoder's ``begin()``
                (needed by a ``bridge``); its blocks run beside these (see
                :class:`~mmseg_sera.models.backbones.slots.LockstepRun`).

        Returns:
            ``BackboneOutput(feats, routing, aux_losses, text)``: the
            ``out_indices`` levels (B x C x h x w, h = ceil(H / p); the last
            one B x Cp x h x w with ``out_proj``), adapter routing, summed
            adapter losses and, with a text stream, the final
            :class:`TextFeatures` of the (bridge-modified) text stream.
        """
        tokens, hw = self.prepare_tokens(x)
        run = self.adapters.start_lockstep(text_stream, num_prefix=1, hw=hw)
        last = self.out_indices[-1]
        feats: List[Tensor] = []
        routing: Dict[int, Tensor] = {}
        losses: List[Dict[str, Tensor]] = []
        for i in range(last + 1):
            parallel = self.adapters.branches(
                'parallel_mlp', i, hw=hw, text=text, num_prefix=1)
            tokens = self._run_block(i, tokens, parallel)
            tokens, out = self.adapters.run_post_block(
                i, tokens, num_prefix=1, hw=hw, text=text)
            if out is not None:
                if out.routing is not None:
                    routing[i] = out.routing
                losses.append(out.aux_losses)
            if run is not None:  # text blocks beside i, then the bridge
                tokens = run.after_block(i, tokens)
            if i in self.out_indices:
                is_last = i == last
                normed = self.out_norm == 'all' or (self.out_norm == 'last'
                                                    and is_last)
                feats.append(
                    self._to_map(tokens, hw, normed, self.out_proj
                                 and is_last))
        return BackboneOutput(
            feats=tuple(feats), routing=routing,
            aux_losses=merge_losses(*losses),
            text=None if run is None else run.finish())

    def forward(self,
                x: Tensor,
                text: Optional[TextFeatures] = None) -> Tuple[Tensor, ...]:
        """B x 3 x H x W -> tuple of maps (``out_indices``). A backbone
        with a ``bridge`` needs :meth:`forward_features` with a text
        stream and raises here."""
        return self.forward_features(x, text).feats
