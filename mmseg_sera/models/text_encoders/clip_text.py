"""CLIP text tower (open_clip) as an mmseg model component.

The tower is built by open_clip's own text-tower builder from one of its
bundled model configs (``'ViT-B-16'`` for the paper), tokenised by its bundled
BPE tokenizer, and never touches the network: pretrained weights are a local
file loaded in :meth:`OpenCLIPTextEncoder.init_weights`.

Shapes: B sentences, L = ``context_length`` tokens, Ct = tower width,
Cp = ``embed_dim`` (the joint CLIP space).
"""
import dataclasses
import warnings
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor

from mmseg.registry import MODELS
from ..backbones.slots import TRAINABLE_MODES, AdapterSlots, set_trainable
from ..clip_checkpoint import read_clip_checkpoint
from ..structures import TextFeatures

# Keys of an open_clip ``CLIP`` state dict that belong to the text tower.
TEXT_KEY_PREFIXES = ('token_embedding.', 'positional_embedding',
                     'transformer.', 'ln_final.', 'text_projection')


# text_cfg options of open_clip that this encoder does not implement.
_UNSUPPORTED_TEXT_CFG = dict(
    hf_model_name='a Hugging Face text model (needs the hub)',
    hf_tokenizer_name='a Hugging Face tokenizer (needs the hub)',
    embed_cls='an appended class token (CoCa)',
    no_causal_mask='bidirectional attention',
)


def extract_text_state_dict(
        state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Pick the text-tower entries out of an open_clip checkpoint.

    Pure function: state dict in, state dict out. Accepts

    * the full open_clip ``CLIP`` state dict (``token_embedding.weight``,
      ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final.*``,
      ``text_projection``, plus ``visual.*`` / ``logit_scale`` which are
      dropped),
    * the same wrapped in ``{'state_dict': ...}`` (mmengine) or
      ``{'model': ...}``,
    * the text-only subset,
    * keys prefixed with ``module.`` (DDP), ``text_encoder.`` (a whole
      mmseg_sera segmentor checkpoint) or ``text.`` (open_clip's
      ``CustomTextCLIP`` layout).

    Raises:
        ValueError: if no text-tower key is found.
    """
    for wrapper in ('state_dict', 'model'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', 'text_encoder.', 'text.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(TEXT_KEY_PREFIXES):
            out[key] = value
    if not out:
        raise ValueError(
            'no CLIP text-tower keys (token_embedding.weight, '
            'positional_embedding, transformer.resblocks.*, ln_final.*, '
            'text_projection) found in the checkpoint; first keys: '
            f'{list(state_dict)[:5]}')
    return out


@dataclasses.dataclass
class TextStream:
    """The text tower part-way through its blocks (lock-step mode).

    Made by :meth:`OpenCLIPTextEncoder.begin`, advanced block by block with
    :meth:`OpenCLIPTextEncoder.step` (or :meth:`step`), closed with
    :meth:`OpenCLIPTextEncoder.end`. A value: each step returns a new
    stream, nothing is stored in the encoder. A bridge may replace ``x``
    between blocks (:meth:`with_x`).

    Attributes:
        encoder: the tower that runs the blocks (not owned).
        x: B x L x Ct, the residual stream after ``next_block`` blocks.
        ids: B x L token ids.
        attn_mask: L x L additive causal mask.
        next_block: index of the next text block to run (0 after begin).
    """
    encoder: 'OpenCLIPTextEncoder' = dataclasses.field(repr=False)
    x: Tensor
    ids: Tensor
    attn_mask: Tensor
    next_block: int = 0

    @property
    def mask(self) -> Tensor:
        """B x L bool, True at padding (token id 0)."""
        return self.ids == 0

    @property
    def num_layers(self) -> int:
        """Number of text blocks."""
        return len(self.encoder.blocks)

    def step(self, j: Optional[int] = None) -> 'TextStream':
        """Run text block j (default: the next one)."""
        return self.encoder.step(self, self.next_block if j is None else j)

    def with_x(self, x: Tensor) -> 'TextStream':
        """The same stream with the residual stream replaced by ``x``."""
        if x.shape != self.x.shape:
            raise ValueError(f'TextStream: x must keep shape '
                             f'{tuple(self.x.shape)}, got {tuple(x.shape)}')
        return dataclasses.replace(self, x=x)

    def end(self) -> TextFeatures:
        """Final :class:`TextFeatures` (all blocks must have run)."""
        return self.encoder.end(self)


def build_causal_mask(length: int) -> Tensor:
    """Additive causal mask as CLIP uses it: L x L, 0 on and below the
    diagonal, -inf above (token i attends to tokens 0..i)."""
    return torch.full((length, length), float('-inf')).triu_(1)


@MODELS.register_module()
class OpenCLIPTextEncoder(BaseModule):
    """The text tower of an open_clip CLIP model, offline.

    ``forward(texts)`` tokenises the sentences (SOT ... EOT, zero-padded to
    L = ``context_length``) and returns :class:`TextFeatures`:

    * ``tokens``: B x L x Ct, ``ln_final`` output of every token (not
      projected),
    * ``mask``: B x L bool, ``token id == 0`` (True at padding),
    * ``pooled``: B x Cp, the end-of-text token (the largest id, argmax) of
      ``ln_final`` output, times ``text_projection``.

    The positional table keeps the tower's native length (77) so checkpoints
    load unchanged; the first L rows are used (sliced, not retrained). The
    causal mask is built for L tokens. With L < 77 the result equals CLIP's
    own output on the same tokens, because the causal mask makes token i
    independent of positions after i.

    The blocks run in an explicit loop (:meth:`forward_tokens`), split into
    :meth:`embed`, :meth:`run_block` and :meth:`finalize`. The same loop is
    offered as a *stream*, so that a bridge (ETRIS) can run the text blocks
    in lock-step with image blocks and write into the text stream between
    them::

        s = enc.begin(texts or ids)        # embed; TextStream, next_block 0
        s = enc.step(s, j)                 # text block j (with its adapters)
        s = s.with_x(s.x + update)         # (what a bridge does)
        feats = enc.end(s)                 # ln_final, pooled, mask

    ``forward(texts)`` equals ``end`` of ``begin`` followed by every step.

    Adapters (slot kind ``parallel_mlp_text``, e.g. the DETRIS Text Adapter)
    run beside the MLP of their block j, on the un-normalised stream x after
    the attention half::

        x = x + ls_1(attn(ln_1 x))
        x = x + ls_2(mlp(ln_2 x)) + sum_a s_a * A_a(x)

    They are built in ``adapters.parallel_mlp_text.{j}``, always train
    (``requires_grad``, and they follow ``train()`` even when the tower is
    frozen) and are not part of a pretrained checkpoint. Blocks without an
    adapter run open_clip's own block.

    Args:
        model_name: name of a bundled open_clip model config (see
            ``open_clip.list_models()``); its ``text_cfg`` and ``embed_dim``
            define the tower. Hub/local-dir schemas are refused (offline).
        text_cfg: overrides merged onto the named ``text_cfg`` (e.g.
            ``dict(width=64, layers=2, heads=2)`` for a tiny test tower).
        embed_dim: override of the joint-space width Cp.
        quick_gelu: QuickGELU activations. ``None`` takes the named config's
            value. OpenAI's CLIP weights need ``True`` (open_clip does this
            for ``pretrained='openai'``; or use ``'ViT-B-16-quickgelu'``).
        pretrained: path of a LOCAL open_clip checkpoint (full CLIP or its
            text part, ``.pt/.bin/.pth`` or ``.safetensors``), loaded in
            :meth:`init_weights`; ``None`` keeps open_clip's random init.
        context_length: L, tokens per sentence including SOT and EOT,
            2 <= L <= the tower's native length (77).
        trainable: ``'frozen'`` (no gradients, eval mode kept, forward under
            ``torch.no_grad()``), ``'ln_bias'`` (only LayerNorm weights and
            biases and every bias train) or ``'full'``.
        max_words_warning: warn (once per sentence) when a sentence is
            truncated to fit L.
        train_pos_embed: the positional table trains whatever
            ``trainable`` says (ETRIS trains CLIP's text positions). The
            parameter keeps its native 77 rows (77 x 512 = 39,424 for
            ViT-B-16, the count ETRIS reports); only the first L rows are
            used, so only they get a gradient.
        adapters: text adapters, a list of ``dict(type=..., insert=(j,
            ...), scale=..., **kwargs)`` (``slot`` defaults to the class's
            ``slot_kind``; only ``'parallel_mlp_text'`` is supported);
            ``embed_dims`` defaults to the tower width. See
            :class:`~mmseg_sera.models.backbones.slots.AdapterSlots`.
        init_cfg: mmengine init config.
    """
    SLOT_KINDS = ('parallel_mlp_text', )

    def __init__(self,
                 *,
                 model_name: str = 'ViT-B-16',
                 text_cfg: Optional[dict] = None,
                 embed_dim: Optional[int] = None,
                 quick_gelu: Optional[bool] = None,
                 pretrained: Optional[str] = None,
                 context_length: int = 20,
                 trainable: str = 'frozen',
                 max_words_warning: bool = True,
                 adapters: Sequence[Dict] = (),
                 train_pos_embed: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        # Imported here: open_clip pulls in timm/torchvision, which only the
        # text encoder needs.
        from open_clip import get_model_config
        from open_clip.model import _build_text_tower
        from open_clip.transformer import ResidualAttentionBlock

        if ':' in model_name:
            raise ValueError(
                'OpenCLIPTextEncoder: '
                f'model_name={model_name!r} names a hub or '
                'local-dir model; only open_clip\'s bundled configs are '
                'supported (offline), e.g. "ViT-B-16"')
        model_cfg = get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(
                'OpenCLIPTextEncoder: '
                f'unknown open_clip model {model_name!r}; '
                'see open_clip.list_models()')
        cfg = dict(model_cfg['text_cfg'])
        cfg.update(text_cfg or {})
        for key, what in _UNSUPPORTED_TEXT_CFG.items():
            if cfg.get(key):
                raise ValueError(
                    'OpenCLIPTextEncoder: '
                    f'text_cfg {key}={cfg[key]!r} ({what}) '
                    'is not supported; use a CLIP-style tower such as '
                    '"ViT-B-16"')
        if cfg.get('pool_type', 'argmax') != 'argmax':
            raise ValueError(
                'OpenCLIPTextEncoder: only pool_type="argmax" (end-of-text '
                f'token) is supported, got {cfg["pool_type"]!r}')
        if cfg.get('proj_type', 'linear') != 'linear':
            raise ValueError(
                'OpenCLIPTextEncoder: a text projection is required '
                f'(proj_type="linear"), got {cfg["proj_type"]!r}')
        if trainable not in TRAINABLE_MODES:
            raise ValueError(f'OpenCLIPTextEncoder: trainable={trainable!r}, '
                             f'expected one of {TRAINABLE_MODES}')
        native_length = int(cfg.get('context_length', 77))
        if not 2 <= context_length <= native_length:
            raise ValueError(
                'OpenCLIPTextEncoder: '
                f'context_length={context_length} must be '
                f'in [2, {native_length}] (the tower\'s positional table has '
                f'{native_length} rows; it is sliced, not extended)')

        embed_dim = int(embed_dim or model_cfg['embed_dim'])
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get('quick_gelu', False))
        tower = _build_text_tower(embed_dim, cfg, quick_gelu=quick_gelu)

        # The tower's parts sit at the top level, as in open_clip's CLIP,
        # so our state dict keys are exactly CLIP's text keys.
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding  # 77 x Ct
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection  # Ct x Cp or Linear
        self.register_buffer(
            'attn_mask', build_causal_mask(context_length), persistent=False)

        self.model_name = model_name
        self.native_context_length = native_length
        self.context_length = context_length
        self.vocab_size = int(cfg.get('vocab_size', 49408))
        self.tokenizer_kwargs = dict(cfg.get('tokenizer_kwargs') or {})
        self.embed_dims = tower.width
        self.pooled_dims = embed_dim
        self.pretrained = pretrained
        self.trainable = trainable
        self.train_pos_embed = bool(train_pos_embed)
        self.max_words_warning = max_words_warning
        self._tokenizer = None  # built on first use (reads bundled vocab)
        self.adapters = AdapterSlots(
            owner='OpenCLIPTextEncoder', kinds=self.SLOT_KINDS,
            num_layers=len(self.blocks), embed_dims=self.embed_dims)
        self.adapters.build(adapters)
        for j in self.adapters.indices('parallel_mlp_text'):
            if not isinstance(self.blocks[j], ResidualAttentionBlock):
                raise ValueError(
                    'OpenCLIPTextEncoder: text adapters need open_clip\'s '
                    f'ResidualAttentionBlock; block {j} is a '
                    f'{type(self.blocks[j]).__name__}')
        self._set_trainable()

    # ------------------------------------------------------------------
    # trainability
    def _set_trainable(self) -> None:
        set_trainable(self, self.trainable)  # adapters always train
        if self.train_pos_embed:
            self.positional_embedding.requires_grad_(True)

    def train(self, mode: bool = True) -> 'OpenCLIPTextEncoder':
        """A frozen tower stays in eval mode; adapters follow ``mode``."""
        super().train(mode and self.trainable != 'frozen')
        if len(self.adapters):  # (an empty slot set has no mode to follow)
            self.adapters.train(mode)
        return self

    # ------------------------------------------------------------------
    # weights
    def init_weights(self) -> None:
        """Random init comes from open_clip's builder; with ``pretrained``
        the local checkpoint is loaded here (never downloaded)."""
        was_init = self._is_init
        super().init_weights()
        if self.pretrained is not None and not was_init:
            self.load_pretrained(self.pretrained)

    def load_pretrained(self, path: str) -> None:
        """Load a local open_clip checkpoint (see
        :func:`extract_text_state_dict` for the accepted layouts).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: unreadable file, missing text keys or wrong shapes.
        """
        raw = read_clip_checkpoint(path, 'OpenCLIPTextEncoder')
        state = extract_text_state_dict(raw)
        own = {  # adapters are not part of a CLIP checkpoint
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith('adapters.')
        }
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(
                'OpenCLIPTextEncoder: '
                f'checkpoint {path!r} lacks text-tower keys '
                f'{missing[:8]}{" ..." if len(missing) > 8 else ""} '
                f'({len(missing)} missing); does it match model_name='
                f'{self.model_name!r} and text_cfg?')
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ValueError(
                'OpenCLIPTextEncoder: '
                f'checkpoint {path!r} has text-tower keys '
                f'this tower lacks: {unexpected[:8]} (more layers than '
                'configured?)')
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError(
                    'OpenCLIPTextEncoder: '
                    f'checkpoint {path!r}: {key} has shape '
                    f'{tuple(value.shape)}, the tower expects '
                    f'{tuple(own[key].shape)}')
        missing, _ = self.load_state_dict(state, strict=False)
        assert all(k.startswith('adapters.') for k in missing), missing
        print_log(
            'OpenCLIPTextEncoder: '
            f'loaded {len(state)} text-tower tensors from '
            f'{path}', logger='current')

    # ------------------------------------------------------------------
    # tokenisation
    @property
    def tokenizer(self):
        """open_clip's bundled BPE ``SimpleTokenizer`` (offline)."""
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer
            self._tokenizer = SimpleTokenizer(
                context_length=self.context_length, **self.tokenizer_kwargs)
        return self._tokenizer

    def tokenize(self, texts: Union[str, Sequence[str]]) -> Tensor:
        """Sentences -> B x L token ids (CPU ``LongTensor``).

        Each row is ``SOT, BPE ids..., EOT, 0, ...``, identical to open_clip's
        tokenizer at the same L. A sentence with more than L - 2 BPE tokens is
        cut to L with EOT forced into the last slot (a warning names it, once
        per sentence).

        Raises:
            TypeError: a sentence is not a ``str``.
            ValueError: a sentence is empty (no BPE token).
        """
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer
        length = self.context_length
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f'OpenCLIPTextEncoder: sentence {i} is a '
                                f'{type(text).__name__}, expected str')
            words = tok.encode(text)
            if not words:
                raise ValueError(
                    'OpenCLIPTextEncoder: '
                    f'sentence {i} ({text!r}) is empty after '
                    'tokenisation. The data pipeline drops empty sentences '
                    'before the model, so this is a bug upstream.')
            row = [tok.sot_token_id] + words + [tok.eot_token_id]
            if len(row) > length:
                row = row[:length]
                row[-1] = tok.eot_token_id
                if self.max_words_warning:
                    # Python's warning registry keys on the message, so each
                    # distinct sentence is reported once.
                    warnings.warn(
                        f'OpenCLIPTextEncoder: sentence {text!r} has '
                        f'{len(words)} BPE tokens, more than the '
                        f'{length - 2} that fit context_length={length}; '
                        'truncated (end-of-text kept in the last slot).',
                        UserWarning, stacklevel=2)
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    # ------------------------------------------------------------------
    # forward
    @property
    def blocks(self) -> nn.ModuleList:
        """The residual attention blocks, in order."""
        return self.transformer.resblocks

    def embed(self, ids: Tensor) -> Tensor:
        """B x L ids -> B x L x Ct: token embedding + first L positional
        rows."""
        if ids.dim() != 2 or ids.shape[1] != self.context_length:
            raise ValueError(
                'OpenCLIPTextEncoder: '
                f'token ids must be B x {self.context_length}'
                f', got {tuple(ids.shape)}')
        x = self.token_embedding(ids)
        return x + self.positional_embedding[:ids.shape[1]].to(x.dtype)

    def finalize(self, x: Tensor, ids: Tensor) -> TextFeatures:
        """Last block output B x L x Ct -> :class:`TextFeatures`:
        ``tokens = LN(x)``, ``pooled = LN(x)[b, argmax ids_b] @ P``,
        ``mask = ids == 0``."""
        tokens = self.ln_final(x)
        eot = tokens[torch.arange(tokens.shape[0], device=tokens.device),
                     ids.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(eot)
        else:
            pooled = eot @ self.text_projection
        return TextFeatures(tokens=tokens, mask=ids == 0, pooled=pooled)

    def run_block(self, j: int, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Text block j on B x L x Ct, with its ``parallel_mlp_text``
        adapters (see the class docstring); open_clip's own block when it
        has none. ``attn_mask``: the L x L causal mask."""
        block = self.blocks[j]
        parallel = self.adapters.branches('parallel_mlp_text', j)
        if not parallel:
            return block(x, attn_mask=attn_mask)
        x = x + block.ls_1(
            block.attention(q_x=block.ln_1(x), attn_mask=attn_mask))
        return x + block.ls_2(block.mlp(block.ln_2(x))) + sum(
            branch(x) for branch in parallel)

    def forward_tokens(self, ids: Tensor) -> TextFeatures:
        """Token ids B x L (on the module's device) -> TextFeatures."""
        x = self.embed(ids)
        attn_mask = self.attn_mask.to(x.dtype)
        for j in range(len(self.blocks)):
            x = self.run_block(j, x, attn_mask)
        return self.finalize(x, ids)

    # ------------------------------------------------------------------
    # lock-step stream
    def begin(self, texts: Union[str, Sequence[str], Tensor]) -> TextStream:
        """Start a stream: sentences (tokenised here) or B x L token ids
        -> :class:`TextStream` with ``x = embed(ids)``, no block run yet.

        Unlike :meth:`forward`, autograd is not switched off for a frozen
        tower: a bridge writes trainable updates into the stream, and the
        frozen blocks after it must pass their gradient on.
        """
        if isinstance(texts, Tensor):
            ids = texts.to(self.token_embedding.weight.device)
        else:
            ids = self.tokenize(texts).to(self.token_embedding.weight.device)
        x = self.embed(ids)
        return TextStream(encoder=self, x=x, ids=ids,
                          attn_mask=self.attn_mask.to(x.dtype))

    def step(self, state: TextStream, j: int) -> TextStream:
        """Run text block j (with its ``parallel_mlp_text`` adapters) on
        the stream: B x L x Ct -> B x L x Ct. Blocks run in order.

        Raises:
            ValueError: j is not the stream's next block.
        """
        if state.encoder is not self:
            raise ValueError('OpenCLIPTextEncoder.step: the stream was '
                             'started by another encoder')
        if j != state.next_block or not 0 <= j < len(self.blocks):
            raise ValueError(
                f'OpenCLIPTextEncoder.step: block {j} requested, the '
                f'stream\'s next block is {state.next_block} (of '
                f'{len(self.blocks)}); blocks run once, in order')
        x = self.run_block(j, state.x, state.attn_mask)
        return dataclasses.replace(state, x=x, next_block=j + 1)

    def end(self, state: TextStream) -> TextFeatures:
        """Close the stream: :meth:`finalize` (``ln_final``, pooled = EOT
        @ ``text_projection``, mask = ids == 0) after the last block.

        Raises:
            ValueError: not every block has run.
        """
        if state.next_block != len(self.blocks):
            raise ValueError(
                f'OpenCLIPTextEncoder.end: only {state.next_block} of '
                f'{len(self.blocks)} text blocks have run')
        return self.finalize(state.x, state.ids)

    def forward(self, texts: Union[str, Sequence[str]]) -> TextFeatures:
        """Sentences (B of them) -> TextFeatures (tokens B x L x Ct, mask
        B x L, pooled B x Cp). Runs without autograd when no parameter
        requires a gradient (the frozen default)."""
        ids = self.tokenize(texts).to(self.token_embedding.weight.device)
        needs_grad = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            return self.forward_tokens(ids)
