"""Time a referring segmentor against its own frozen backbone.

    python tools/analysis_tools/benchmark.py CONFIG [CONFIG2]
        [--batch-size 2] [--img-size 448] [--device cpu|cuda]
        [--repeats 3] [--warmup 1] [--amp bf16|fp16] [--breakdown]
        [--profile N] [--explicit-attn-ref] [--json FILE]
        [--cfg-options KEY=VALUE ...] [--cfg-options2 KEY=VALUE ...]

Builds the model of CONFIG with random weights (``init_weights`` is not
run: no checkpoint is read) and times four phases on one fixed batch
(random uint8 images, fixed sentences, random binary masks, passed through
``model.data_preprocessor``):

(a) ``frozen_forward``: the backbone alone, adapters bypassed, under
    ``torch.no_grad()`` in eval mode.  The adapters are bypassed by
    swapping ``backbone.adapters`` for an empty ``ModuleDict`` for the
    duration of the call, so (a) runs the very same weights and block loop
    as the model, only without the adapter slots: the cost of "a frozen
    DINOv2" that every other number is divided by.
(b) ``frozen_fwd_bwd``: the same adapter-free backbone with *every* own
    parameter frozen (``requires_grad=False`` for the call), the
    normalised image made to require a gradient, a forward, the scalar
    ``sum_l mean(feat_l)`` over the returned levels and its ``backward()``
    down to the image.  No weight gradient is computed, only activation
    gradients through every block: the floor for any method that trains
    something at or below the first block (an adapter, the LayerNorm
    and bias terms of ``trainable='ln_bias'``).
(c) ``train_step``: ``model.train()``, ``model(**data, mode='loss')``, the
    sum of the ``loss*`` entries, ``backward()``, ``optimizer.step()``,
    ``optimizer.zero_grad()``; the optimizer is the config's
    ``optim_wrapper.optimizer`` (Adam, lr 1e-4 if none is given) over the
    parameters that require a gradient.
(d) ``inference``: ``model(**data, mode='predict')`` under ``no_grad`` in
    eval mode (including the resize to the original size and the
    threshold).

``--explicit-attn-ref`` adds two reference phases, (a') and (b'): (a)
and (b) with every backbone ``Attention`` switched to explicit matmuls and
softmax (``fused=False``), the path the official DINOv2 code (which the
DINOv2-based peer methods build on) takes without xFormers, e.g. on a
CPU.  The
fused kernel makes (a) faster than (a'), so ratios to (a) are stricter
than the peers' own ratios; the report also gives (b), (c) and (d) as
ratios to (a').

Each phase runs ``--warmup`` untimed calls, then ``--repeats`` timed ones
(``time.perf_counter``, with ``torch.cuda.synchronize()`` around each call
on CUDA); the median is reported, with its ratio to (a).  The load average
(``os.getloadavg()``) is recorded before and after each phase; when the
spread of the repeats (max / min) exceeds ``--max-spread`` the phase is
measured again, up to ``--max-attempts`` times, the attempt with the
smallest spread is kept and the phase is marked ``disturbed``.
``--interleave`` times the phases round-robin instead (each round calls
(a), (d), (b), (c) once), so that a drift of the machine's speed over the
minutes of a run does not bend the ratios; then the attempt is repeated as
a whole.

Peak memory per phase: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the peak resident set size of the
process, sampled every 2 ms by a thread reading ``/proc/self/statm`` (a
spike shorter than that may be missed; where ``/proc`` is missing, the
process-lifetime ``ru_maxrss`` is reported instead).  Without
``--interleave`` the phases run in the order (a), (d), (b), (c), i.e. in
increasing memory, so that even the lifetime maximum is meaningful.
``+MB`` is the increase of that peak over the memory in use when the phase
started (CPU: freed memory may stay with the allocator, so it is
approximate; with CONFIG2 the second model's peak RSS also holds what the
first one left with the allocator, so compare the increases).

With CONFIG2 both models are measured on the same batch, one after the
other (the first is deleted before the second is built), and printed side
by side with the ratio CONFIG2 / CONFIG.  ``--cfg-options2`` overrides
entries of the second model only; without CONFIG2 it is CONFIG again, so
``CONFIG --cfg-options2 model.backbone.with_cp=True`` compares one switch.

``--breakdown`` splits one training step (median of ``--repeats``) into
forward / backward / optimizer, the forward into text encoder, backbone
blocks, adapters, neck, head and losses (wall time of each call, taken by
wrapping the instance's ``forward``), and the backward into the same parts
(times at which gradient hooks on the parts' inputs and outputs fire, see
:class:`StepTimeline`), and splits ``predict`` the same way; nothing in
the model's code changes.  ``--profile N`` adds the N aten operators with
the largest self CPU time in one training step (``torch.profiler``).

On a shared CPU machine pass ``--threads 1``: with two OpenMP threads and
other jobs on the two cores, a descheduled thread stalls every parallel
region (the tiny config's backbone forward took 0.42 s with 2 threads
instead of 0.010 s with 1 on such a machine).
"""
import argparse
import contextlib
import copy
import gc
import os
import os.path as osp
import resource
import statistics
import threading
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mmengine
import torch
import torch.nn as nn
from mmengine.config import DictAction

PHASES = ('frozen_forward', 'frozen_fwd_bwd', 'train_step', 'inference')
PHASE_LABELS = {
    'frozen_forward': '(a) frozen backbone forward',
    'frozen_fwd_bwd': '(b) frozen backbone fwd + act. bwd',
    'train_step': '(c) training step',
    'inference': '(d) inference (predict)',
}
# --explicit-attn-ref: (a) and (b) with explicit attention
REF_PHASES = ('frozen_forward_explicit', 'frozen_fwd_bwd_explicit')
PHASE_LABELS.update({
    'frozen_forward_explicit': "(a') (a), explicit attention",
    'frozen_fwd_bwd_explicit': "(b') (b), explicit attention",
})
# increasing memory: (a) < (d) < (b) < (c)
RUN_ORDER = ('frozen_forward', 'inference', 'frozen_fwd_bwd', 'train_step')
REF_RUN_ORDER = ('frozen_forward', 'frozen_forward_explicit', 'inference',
                 'frozen_fwd_bwd', 'frozen_fwd_bwd_explicit', 'train_step')
SENTENCES = (
    'the man in the red shirt on the left',
    'a white car parked behind the bus',
    'second umbrella from the right',
    'small dog sitting next to the woman',
    'the bowl of rice closest to the camera',
    'person wearing a blue jacket',
    'tall giraffe in the middle',
    'empty chair at the far end of the table',
)
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------
def make_batch(batch_size: int, img_size: int, seed: int = 0) -> Dict:
    """Raw batch for ``model.data_preprocessor``: ``inputs`` (B uint8
    3 x S x S images), ``data_samples`` (B ``SegDataSample`` with a fixed
    sentence in ``metainfo['text']`` and a random binary ``gt_sem_seg``
    1 x S x S)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    if batch_size < 1 or img_size < 1:
        raise ValueError(f'batch size and image size must be positive, got '
                         f'{batch_size} and {img_size}')
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(batch_size):
        inputs.append(
            torch.randint(0, 256, (3, img_size, img_size), generator=gen,
                          dtype=torch.uint8))
        sample = SegDataSample(
            metainfo=dict(text=SENTENCES[i % len(SENTENCES)],
                          ori_shape=(img_size, img_size),
                          img_shape=(img_size, img_size),
                          pad_shape=(img_size, img_size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 2, (1, img_size, img_size), generator=gen,
            dtype=torch.uint8))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def preprocess(model: nn.Module, batch: Dict, training: bool) -> Dict:
    """A copy of ``batch`` through ``model.data_preprocessor``."""
    return model.data_preprocessor(copy.deepcopy(batch), training=training)


def total_loss(losses: Dict) -> torch.Tensor:
    """Sum of the entries whose key starts with ``loss`` (tensors or
    lists of tensors), as MMEngine's ``parse_losses`` does."""
    terms = []
    for key, value in losses.items():
        if not key.startswith('loss'):
            continue
        if isinstance(value, torch.Tensor):
            terms.append(value.mean())
        else:
            terms.extend(v.mean() for v in value)
    if not terms:
        raise ValueError(f'the model returned no loss*: {sorted(losses)}')
    return sum(terms)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
@contextlib.contextmanager
def adapters_bypassed(backbone: nn.Module) -> Iterator[None]:
    """Run ``backbone`` without its adapter slots: ``backbone.adapters``
    is emptied inside the block (restored afterwards)."""
    from mmengine.model import ModuleDict
    adapters = getattr(backbone, 'adapters', None)
    if adapters is None:
        yield
        return
    # AdapterSlots (every slot kind) or a plain ModuleDict of post-block ones
    backbone.adapters = (adapters.emptied() if hasattr(adapters, 'emptied')
                         else ModuleDict())
    try:
        yield
    finally:
        backbone.adapters = adapters


@contextlib.contextmanager
def params_frozen(module: nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``module`` inside the
    block; the previous flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def fused_attention_modules(backbone: nn.Module) -> List[nn.Module]:
    """The attention modules of ``backbone`` with a ``fused`` switch."""
    modules = [m for m in backbone.modules()
               if isinstance(getattr(m, 'fused', None), bool)]
    if not modules:
        raise ValueError(
            f'--explicit-attn-ref: {type(backbone).__name__} has no attention '
            'module with a `fused` switch (DINOv2 has one)')
    return modules


@contextlib.contextmanager
def explicit_attention(backbone: nn.Module) -> Iterator[None]:
    """Every attention module of ``backbone`` with a ``fused`` switch runs
    with ``fused=False`` inside the block (restored afterwards)."""
    modules = fused_attention_modules(backbone)
    flags = [m.fused for m in modules]
    for m in modules:
        m.fused = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.fused = flag


def backbone_features(backbone: nn.Module, x: torch.Tensor,
                      text=None) -> tuple:
    """The backbone's output maps (``forward_features(x, text).feats``
    for our DINOv2, else ``backbone(x)``)."""
    if hasattr(backbone, 'forward_features'):
        out = backbone.forward_features(x, text=text)
        return tuple(out.feats) if hasattr(out, 'feats') else tuple(out)
    return tuple(backbone(x))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _rss_bytes() -> Optional[int]:
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory inside a ``with`` block, in MB (``peak_mb``) and its
    increase over the start (``increase_mb``); ``kind`` says what was
    measured (``cuda_allocated``, ``cpu_rss`` or ``cpu_ru_maxrss``)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak_mb = self.increase_mb = None
        self.kind = None

    def __enter__(self) -> 'PeakMemory':
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = 'cuda_allocated'
            return self
        self._start = _rss_bytes()
        if self._start is None:
            self.kind = 'cpu_ru_maxrss'
            return self
        self.kind = 'cpu_rss'
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                rss = _rss_bytes()
                if rss is not None and rss > self._peak:
                    self._peak = rss
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        mb = 1024.**2
        if self.kind == 'cuda_allocated':
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mb, self.increase_mb = peak / mb, (peak -
                                                         self._start) / mb
        elif self.kind == 'cpu_rss':
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes() or 0)
            self.peak_mb, self.increase_mb = peak / mb, (peak -
                                                         self._start) / mb
        else:  # kilobytes on Linux
            self.peak_mb = resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024.


def time_phase(fn: Callable[[], None], device: torch.device, repeats: int,
               warmup: int, max_spread: float = 1.5,
               max_attempts: int = 3) -> Dict:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup``.

    Repeated (at most ``max_attempts`` times in all) while the spread
    max / min of the repeats exceeds ``max_spread``; the attempt with the
    smallest spread is returned, ``disturbed`` tells whether more than one
    was needed.
    """
    if repeats < 1 or warmup < 0 or max_attempts < 1:
        raise ValueError('repeats and max_attempts must be >= 1 and warmup '
                         f'>= 0, got {repeats}, {max_attempts}, {warmup}')
    for _ in range(warmup):
        fn()
    _sync(device)
    attempts = []
    for _ in range(max_attempts):
        load_before = os.getloadavg()
        times = []
        with PeakMemory(device) as mem:
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
        attempts.append(
            dict(times_s=times, median_s=statistics.median(times),
                 spread=max(times) / min(times),
                 loadavg_before=list(load_before),
                 loadavg_after=list(os.getloadavg()),
                 peak_mem_mb=mem.peak_mb, mem_increase_mb=mem.increase_mb,
                 mem_kind=mem.kind))
        if attempts[-1]['spread'] <= max_spread:
            break
    best = dict(min(attempts, key=lambda a: a['spread']))
    best['attempts'] = len(attempts)
    best['disturbed'] = len(attempts) > 1
    best['attempt_medians_s'] = [a['median_s'] for a in attempts]
    return best


def time_phases_interleaved(fns: Dict[str, Callable[[], None]],
                            order: Sequence[str], device: torch.device,
                            repeats: int, warmup: int,
                            max_spread: float = 1.5,
                            max_attempts: int = 3) -> Dict[str, Dict]:
    """Like :func:`time_phase` for several phases, but round-robin: each
    of ``repeats`` rounds calls every phase once, in ``order``, so that a
    slow drift of the machine's speed hits all phases alike and their
    ratios stay put.  An attempt (all rounds) is repeated while some
    phase's spread exceeds ``max_spread``; the attempt whose largest
    spread is smallest is kept for every phase.  Peak memory is the
    largest over the phase's calls.
    """
    if repeats < 1 or warmup < 0 or max_attempts < 1:
        raise ValueError('repeats and max_attempts must be >= 1 and warmup '
                         f'>= 0, got {repeats}, {max_attempts}, {warmup}')
    for name in order:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    attempts = []
    for _ in range(max_attempts):
        rows = {name: dict(times_s=[], peak_mem_mb=None,
                           mem_increase_mb=None, mem_kind=None)
                for name in order}
        load_before = os.getloadavg()
        for _ in range(repeats):
            for name in order:
                row = rows[name]
                with PeakMemory(device) as mem:
                    _sync(device)
                    t0 = time.perf_counter()
                    fns[name]()
                    _sync(device)
                    row['times_s'].append(time.perf_counter() - t0)
                row['mem_kind'] = mem.kind
                for key, value in (('peak_mem_mb', mem.peak_mb),
                                   ('mem_increase_mb', mem.increase_mb)):
                    if value is not None:
                        row[key] = max(value, row[key] or value)
        load_after = list(os.getloadavg())
        for row in rows.values():
            row.update(median_s=statistics.median(row['times_s']),
                       spread=max(row['times_s']) / min(row['times_s']),
                       loadavg_before=list(load_before),
                       loadavg_after=load_after)
        attempts.append(rows)
        if all(r['spread'] <= max_spread for r in rows.values()):
            break
    best = min(attempts,
               key=lambda rows: max(r['spread'] for r in rows.values()))
    for name, row in best.items():
        row.update(attempts=len(attempts), disturbed=len(attempts) > 1,
                   attempt_medians_s=[a[name]['median_s']
                                      for a in attempts])
    return best


# --------------------------------------------------------------------------
# model and phases
# --------------------------------------------------------------------------
def build(config: str, cfg_options: Optional[dict],
          device: torch.device, seed: int = 0):
    """(config, model) with random weights on ``device`` (no
    ``init_weights``: no checkpoint is read)."""
    from mmseg_sera.apis.config import build_model, load_config
    cfg = load_config(config, cfg_options)
    torch.manual_seed(seed)
    return cfg, build_model(cfg).to(device)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The config's ``optim_wrapper.optimizer`` (Adam lr 1e-4 when absent)
    over the parameters that require a gradient."""
    from mmengine.registry import OPTIMIZERS
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError('the model has no trainable parameter')
    opt_cfg = cfg.get('optim_wrapper', {}).get('optimizer', None)
    opt_cfg = dict(opt_cfg) if opt_cfg else dict(type='Adam', lr=1e-4)
    opt_cfg['params'] = params
    return OPTIMIZERS.build(opt_cfg)


def make_phases(model: nn.Module, train_data: Dict, test_data: Dict,
                optimizer: torch.optim.Optimizer, autocast: Callable,
                explicit_ref: bool = False) -> Dict[str, Callable[[], None]]:
    """The four timed callables (see the module docstring), and with
    ``explicit_ref`` the two reference phases (a') and (b')."""
    backbone = model.backbone
    x_train = train_data['inputs']
    x_test = test_data['inputs']

    def frozen_forward(attention=contextlib.nullcontext):
        model.eval()
        with torch.no_grad(), adapters_bypassed(backbone), \
                attention(backbone), autocast():
            backbone_features(backbone, x_test)

    def frozen_fwd_bwd(attention=contextlib.nullcontext):
        model.eval()
        with adapters_bypassed(backbone), params_frozen(backbone), \
                attention(backbone):
            x = x_train.detach().clone().requires_grad_(True)
            with autocast():
                feats = backbone_features(backbone, x)
                scalar = sum(f.float().mean() for f in feats)
            scalar.backward()
            if x.grad is None:
                raise RuntimeError('no gradient reached the image')

    def train_step():
        model.train()
        with autocast():
            loss = total_loss(model(**train_data, mode='loss'))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def inference():
        model.eval()
        with torch.no_grad(), autocast():
            model(**test_data, mode='predict')

    phases = dict(frozen_forward=frozen_forward,
                  frozen_fwd_bwd=frozen_fwd_bwd, train_step=train_step,
                  inference=inference)
    if explicit_ref:
        fused_attention_modules(backbone)  # fail early without a switch
        phases.update(
            frozen_forward_explicit=lambda: frozen_forward(
                explicit_attention),
            frozen_fwd_bwd_explicit=lambda: frozen_fwd_bwd(
                explicit_attention))
    return phases


# --------------------------------------------------------------------------
# breakdown of a training step
# --------------------------------------------------------------------------
def _tensors(obj) -> List[torch.Tensor]:
    """Tensors that require a gradient in a tensor, a sequence of them or a
    result dataclass (``tokens`` / ``feats``)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    for attr in ('tokens', 'feats'):
        if hasattr(obj, attr):
            return _tensors(getattr(obj, attr))
    return []


class StepTimeline:
    """Wall-clock events of one training step, taken without touching the
    model's code.

    Forward: ``forward`` (``forward_features`` for the backbone,
    ``loss_by_feat`` for the head's losses) of the text encoder, backbone,
    each adapter, neck and head is wrapped, as an instance attribute, to
    add its wall time to ``fwd[key]``.  Backward: the wrappers register
    gradient hooks on their inputs and outputs, and every trainable
    parameter a post-accumulate-grad hook, each storing the time it fires
    in ``bwd[key]`` (a list, one entry per firing).  A hook on a non-leaf
    tensor fires when the engine runs the node that made the tensor, and
    the engine runs ready nodes in decreasing creation order, so the
    backward passes the head's losses, the head, the neck, the backbone
    (adapters inside) and the text encoder one after the other:

    - head start: the hook on the head's logits;
    - neck start: the hook on the neck's output;
    - backbone start: the *first* hook on the neck's inputs (the last level
      is made last, so it runs first; the earlier levels only run when
      the backward has gone down the blocks to them);
    - adapter i: from the hook on its output tokens to the hook on its
      input tokens (only the adapter's nodes lie between them);
    - backbone end: the last gradient accumulated into a backbone or
      adapter parameter; the text encoder (when it trains) follows.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.fwd: Dict[str, float] = defaultdict(float)
        self.bwd: Dict[str, float] = {}
        self.adapter_bwd: Dict[int, Dict[str, float]] = defaultdict(dict)
        self._patched: List = []
        self._handles: List = []

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def _stamp(self, key: str, store: Optional[Dict] = None) -> Callable:
        store = self.bwd if store is None else store

        def hook(*_):
            store.setdefault(key, []).append(self._now())

        return hook

    def _hook_tensors(self, tensors: List[torch.Tensor], key: str,
                      store: Optional[Dict] = None) -> None:
        for t in tensors:
            t.register_hook(self._stamp(key, store))

    def _wrap(self, obj: nn.Module, attr: str, key: str,
              on_call: Optional[Callable] = None) -> None:
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            t0 = self._now()
            out = original(*args, **kwargs)
            self.fwd[key] += self._now() - t0
            if on_call is not None:
                on_call(args, out)
            return out

        self._patched.append((obj, attr, attr in vars(obj), original))
        object.__setattr__(obj, attr, wrapped)

    def __enter__(self) -> 'StepTimeline':
        model = self.model
        backbone = model.backbone
        self._wrap(model.text_encoder, 'forward', 'text_encoder')
        self._wrap(backbone, 'forward_features' if hasattr(
            backbone, 'forward_features') else 'forward', 'backbone')
        adapters = getattr(backbone, 'adapters', None)
        for i, adapter in enumerate(
                adapters.values() if adapters is not None else []):

            def on_adapter(args, out, i=i):
                store = self.adapter_bwd[i]
                self._hook_tensors(_tensors(out), 'out', store)
                self._hook_tensors(_tensors(args[:1]), 'in', store)

            self._wrap(adapter, 'forward', 'adapters', on_adapter)
        if model.neck is not None:

            def on_neck(args, out):
                self._hook_tensors(_tensors(out), 'neck_out')
                self._hook_tensors(_tensors(args[:1]), 'neck_in')

            self._wrap(model.neck, 'forward', 'neck', on_neck)

        def on_head(args, out):
            self._hook_tensors(_tensors(out), 'head_out')
            if model.neck is None:
                self._hook_tensors(_tensors(args[:1]), 'neck_in')

        self._wrap(model.decode_head, 'forward', 'head', on_head)
        self._wrap(model.decode_head, 'loss_by_feat', 'losses')
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            part = 'text_encoder' if name.startswith('text_encoder.') else (
                'backbone' if name.startswith('backbone.') else 'top')
            self._handles.append(p.register_post_accumulate_grad_hook(
                self._stamp('param_' + part)))
        return self

    def __exit__(self, *exc) -> None:
        for obj, attr, had, original in reversed(self._patched):
            if had:
                object.__setattr__(obj, attr, original)
            else:
                object.__delattr__(obj, attr)
        for h in self._handles:
            h.remove()
        self._patched, self._handles = [], []


def breakdown_train_step(model: nn.Module, train_data: Dict,
                         optimizer: torch.optim.Optimizer,
                         autocast: Callable, device: torch.device,
                         repeats: int = 3) -> Dict[str, float]:
    """Seconds per part of one training step (median over ``repeats``;
    see :class:`StepTimeline`).

    Keys: ``step`` (whole step), ``forward``, ``backward``, ``optimizer``
    (step + zero_grad); forward parts ``fwd_text_encoder``,
    ``fwd_backbone_blocks`` (backbone minus adapters), ``fwd_adapters``,
    ``fwd_neck``, ``fwd_head``, ``fwd_losses`` (head ``loss_by_feat``),
    ``fwd_other``; backward parts ``bwd_losses`` (from the loss to the
    head's logits), ``bwd_head``, ``bwd_neck``, ``bwd_backbone_blocks``,
    ``bwd_adapters``, ``bwd_text_encoder_other`` (after the last backbone
    gradient: the text encoder when it trains).
    """
    rows = defaultdict(list)
    for _ in range(repeats):
        model.train()
        with StepTimeline(model, device) as tl:
            t0 = tl._now()
            with autocast():
                loss = total_loss(model(**train_data, mode='loss'))
            t1 = tl._now()
            loss.backward()
            t2 = tl._now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = tl._now()
        f, b = tl.fwd, tl.bwd
        parts = dict(step=t3 - t0, forward=t1 - t0, backward=t2 - t1,
                     optimizer=t3 - t2)
        parts['fwd_text_encoder'] = f['text_encoder']
        parts['fwd_adapters'] = f['adapters']
        parts['fwd_backbone_blocks'] = f['backbone'] - f['adapters']
        parts['fwd_neck'] = f['neck']
        parts['fwd_head'] = f['head']
        parts['fwd_losses'] = f['losses']
        parts['fwd_other'] = parts['forward'] - sum(
            f[k] for k in ('text_encoder', 'backbone', 'neck', 'head',
                           'losses'))
        # backward events in the order the engine reaches them
        head_out = min(b.get('head_out', [t1]))
        neck_out = min(b.get('neck_out', [head_out]))
        neck_in = min(b.get('neck_in', [neck_out]))
        bb_end = max(b.get('param_backbone', [neck_in]))
        parts['bwd_losses'] = head_out - t1
        parts['bwd_head'] = neck_out - head_out
        parts['bwd_neck'] = neck_in - neck_out
        parts['bwd_adapters'] = sum(
            max(a['in']) - min(a['out']) for a in tl.adapter_bwd.values()
            if 'in' in a and 'out' in a)
        parts['bwd_backbone_blocks'] = (bb_end - neck_in -
                                        parts['bwd_adapters'])
        parts['bwd_text_encoder_other'] = t2 - bb_end
        for k, v in parts.items():
            rows[k].append(v)
    return {k: statistics.median(v) for k, v in rows.items()}


def breakdown_inference(model: nn.Module, test_data: Dict,
                        autocast: Callable, device: torch.device,
                        repeats: int = 3) -> Dict[str, float]:
    """Seconds per part of one ``predict`` call (median over ``repeats``):
    ``inference`` (whole call), ``text_encoder``, ``backbone_blocks``
    (backbone minus adapters), ``adapters``, ``neck``, ``head`` and
    ``other`` (resizing to the original size, thresholding)."""
    rows = defaultdict(list)
    for _ in range(repeats):
        model.eval()
        with StepTimeline(model, device) as tl, torch.no_grad():
            t0 = tl._now()
            with autocast():
                model(**test_data, mode='predict')
            t1 = tl._now()
        f = tl.fwd
        parts = dict(inference=t1 - t0, text_encoder=f['text_encoder'],
                     backbone_blocks=f['backbone'] - f['adapters'],
                     adapters=f['adapters'], neck=f['neck'], head=f['head'])
        parts['other'] = parts['inference'] - sum(
            f[k] for k in ('text_encoder', 'backbone', 'neck', 'head'))
        for k, v in parts.items():
            rows[k].append(v)
    return {k: statistics.median(v) for k, v in rows.items()}


def profile_train_step(step: Callable[[], None], top: int) -> List[Dict]:
    """The ``top`` operators by self CPU time in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.
    return [
        dict(op=e.key, calls=e.count, self_cpu_s=e.self_cpu_time_total / 1e6,
             share=e.self_cpu_time_total / total) for e in events[:top]
    ]


# --------------------------------------------------------------------------
# one config
# --------------------------------------------------------------------------
def _param_counts(model: nn.Module) -> Dict:
    own = [p for n, p in model.named_parameters()
           if n.startswith('backbone.') and not n.startswith(
               'backbone.adapters.')]
    return dict(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters()
                      if p.requires_grad),
        backbone_trainable_percent=100. * sum(
            p.numel() for p in own if p.requires_grad) / max(
                1, sum(p.numel() for p in own)))


def benchmark_config(config: str, batch: Dict, args: argparse.Namespace,
                     device: torch.device,
                     extra_options: Optional[dict] = None) -> Dict:
    """All phases (and the optional breakdown) for one config;
    ``extra_options`` update ``args.cfg_options`` for this model."""
    options = dict(args.cfg_options or {}, **(extra_options or {}))
    cfg, model = build(config, options or None, device, seed=args.seed)
    train_data = preprocess(model, batch, training=True)
    test_data = preprocess(model, batch, training=False)
    optimizer = build_optimizer(cfg, model)
    dtype = AMP_DTYPES.get(args.amp)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    ref = args.explicit_attn_ref
    phases = make_phases(model, train_data, test_data, optimizer, autocast,
                         explicit_ref=ref)
    order = REF_RUN_ORDER if ref else RUN_ORDER
    if args.interleave:
        results = time_phases_interleaved(
            phases, order, device, repeats=args.repeats,
            warmup=args.warmup, max_spread=args.max_spread,
            max_attempts=args.max_attempts)
    else:
        results = {}
        for name in order:
            results[name] = time_phase(
                phases[name], device, repeats=args.repeats,
                warmup=args.warmup, max_spread=args.max_spread,
                max_attempts=args.max_attempts)
    for name, row in results.items():
        row['ratio'] = row['median_s'] / results['frozen_forward']['median_s']
        if ref:
            row['ratio_explicit'] = row['median_s'] / results[
                'frozen_forward_explicit']['median_s']
    label = osp.splitext(osp.basename(config))[0]
    if extra_options:
        label += ' + ' + ' '.join(f'{k}={v}' for k, v in
                                  extra_options.items())
    out = dict(config=osp.abspath(config), label=label,
               cfg_options=options,
               params=_param_counts(model),
               phases={name: results[name] for name in _shown(results)})
    if args.breakdown:
        out['breakdown'] = breakdown_train_step(
            model, train_data, optimizer, autocast, device,
            repeats=args.repeats)
        out['breakdown_inference'] = breakdown_inference(
            model, test_data, autocast, device, repeats=args.repeats)
    if args.profile:
        out['profile'] = profile_train_step(phases['train_step'],
                                            args.profile)
    del model, optimizer, phases, train_data, test_data
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------
def _shown(phases: Dict) -> List[str]:
    """The phases of a run, in table order."""
    return [name for name in PHASES + REF_PHASES if name in phases]


def _mem(r: Dict) -> str:
    if r['peak_mem_mb'] is None:
        return '-'
    inc = r['mem_increase_mb']
    return (f'{r["peak_mem_mb"]:.0f}' +
            (f' (+{inc:.0f})' if inc is not None else ''))


def _time(r: Dict) -> str:
    return f'{r["median_s"]:.3f}' + (' *' if r['disturbed'] else '')


def format_tables(report: Dict) -> str:
    """Text tables of a :func:`run` report."""
    from prettytable import PrettyTable
    runs = report['results']
    mem_kind = runs[0]['phases']['frozen_forward']['mem_kind']
    mem_head = {'cuda_allocated': 'peak CUDA MB',
                'cpu_rss': 'peak RSS MB',
                'cpu_ru_maxrss': 'process peak RSS MB'}[mem_kind]
    if len(runs) == 1:
        r = runs[0]['phases']
        table = PrettyTable(['phase', 'median s', 'x (a)', 'spread',
                             mem_head + ' (+incr.)'])
        for name in _shown(r):
            table.add_row([PHASE_LABELS[name], _time(r[name]),
                           f'{r[name]["ratio"]:.2f}',
                           f'{r[name]["spread"]:.2f}', _mem(r[name])])
    else:
        a, b = runs[0]['phases'], runs[1]['phases']
        table = PrettyTable([
            'phase', 'A s', 'A x(a)', 'B s', 'B x(a)', 'B / A',
            'A ' + mem_head, 'B ' + mem_head
        ])
        for name in _shown(a):
            table.add_row([
                PHASE_LABELS[name], _time(a[name]), f'{a[name]["ratio"]:.2f}',
                _time(b[name]), f'{b[name]["ratio"]:.2f}',
                f'{b[name]["median_s"] / a[name]["median_s"]:.2f}',
                _mem(a[name]), _mem(b[name])
            ])
    for col in table.field_names[1:]:
        table.align[col] = 'r'
    table.align['phase'] = 'l'
    env = report['env']
    lines = [
        f'{tag}: {run["label"]} (params {run["params"]["total"]:,}, '
        f'trainable {run["params"]["trainable"]:,}, backbone trainable '
        f'{run["params"]["backbone_trainable_percent"]:.3f} %)'
        for tag, run in zip('AB', runs)
    ]
    lines.append(
        f'batch {env["batch_size"]} x {env["img_size"]} px, device '
        f'{env["device"]}, amp {env["amp"]}, torch {env["torch"]}, '
        f'{env["threads"]} threads, {env["cpu_count"]} CPUs; repeats '
        f'{env["repeats"]}, warmup {env["warmup"]}')
    lines.append(table.get_string())
    lines.append('* = disturbed (spread above --max-spread, re-measured). '
                 f'load average before {report["loadavg_before"]}, after '
                 f'{report["loadavg_after"]}')
    for tag, run in zip('AB', runs):
        r = run['phases']
        if 'frozen_forward_explicit' in r:
            lines.append(f"{tag}: x (a') = ratio to the explicit-attention "
                         'frozen forward: ' + ', '.join(
                             f'{PHASE_LABELS[name].split(" ")[0]} '
                             f'{r[name]["ratio_explicit"]:.2f}'
                             for name in ('frozen_fwd_bwd_explicit',
                                          'train_step', 'inference')))
    for run in runs:
        if 'breakdown' in run:
            lines.append(format_breakdown(run['breakdown'], run['label']))
        if 'breakdown_inference' in run:
            lines.append(format_inference_breakdown(
                run['breakdown_inference'], run['label']))
        if 'profile' in run:
            ptab = PrettyTable(['op', 'calls', 'self CPU s', 'share %'])
            ptab.title = f'top operators, one training step: {run["label"]}'
            for row in run['profile']:
                ptab.add_row([row['op'], row['calls'],
                              f'{row["self_cpu_s"]:.3f}',
                              f'{100 * row["share"]:.1f}'])
            ptab.align['op'] = 'l'
            lines.append(ptab.get_string())
    return '\n'.join(lines)


def format_inference_breakdown(parts: Dict[str, float], label: str) -> str:
    from prettytable import PrettyTable
    table = PrettyTable(['part of inference', 'seconds', '% of inference'])
    table.title = f'inference breakdown: {label}'
    for key in ('text_encoder', 'backbone_blocks', 'adapters', 'neck',
                'head', 'other', 'inference'):
        table.add_row([key.replace('_', ' '), f'{parts[key]:.3f}',
                       f'{100 * parts[key] / parts["inference"]:.1f}'])
    table.align['part of inference'] = 'l'
    return table.get_string()


def format_breakdown(parts: Dict[str, float], label: str) -> str:
    from prettytable import PrettyTable
    table = PrettyTable(['part of the training step', 'seconds', '% of step'])
    table.title = f'training step breakdown: {label}'
    step = parts['step']
    names = [('forward', 'forward (total)'),
             ('fwd_text_encoder', '  text encoder'),
             ('fwd_backbone_blocks', '  backbone (stem, blocks, norm)'),
             ('fwd_adapters', '  adapters'), ('fwd_neck', '  neck'),
             ('fwd_head', '  head'), ('fwd_losses', '  losses (head)'),
             ('fwd_other', '  other'),
             ('backward', 'backward (total)'),
             ('bwd_losses', '  losses'), ('bwd_head', '  head'),
             ('bwd_neck', '  neck'),
             ('bwd_adapters', '  adapters'),
             ('bwd_backbone_blocks', '  backbone (blocks, stem)'),
             ('bwd_text_encoder_other', '  text encoder / rest'),
             ('optimizer', 'optimizer step + zero_grad'),
             ('step', 'whole step')]
    for key, text in names:
        table.add_row([text, f'{parts[key]:.3f}',
                       f'{100 * parts[key] / step:.1f}'])
    table.align['part of the training step'] = 'l'
    return table.get_string()


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Time training and inference of a referring segmentor '
        'against its frozen backbone')
    p.add_argument('config', help='config file path')
    p.add_argument('config2', nargs='?',
                   help='second config, measured on the same batch')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--img-size', type=int, default=448)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--amp', choices=sorted(AMP_DTYPES),
                   help='torch.autocast with this dtype')
    p.add_argument('--max-spread', type=float, default=1.5,
                   help='re-measure a phase whose max/min exceeds this')
    p.add_argument('--max-attempts', type=int, default=3,
                   help='measurements per phase at most')
    p.add_argument('--interleave', action='store_true',
                   help='time the phases round-robin (robust ratios on a '
                   'machine whose speed drifts)')
    p.add_argument('--threads', type=int,
                   help='torch.set_num_threads (default: torch\'s)')
    p.add_argument('--breakdown', action='store_true',
                   help='split a training step and predict per component')
    p.add_argument('--profile', type=int, default=0, metavar='N',
                   help='list the N operators with most self CPU time')
    p.add_argument('--explicit-attn-ref', action='store_true',
                   help="also time (a') and (b'): (a) and (b) with the "
                   'backbone attention as explicit matmuls (the official '
                   'DINOv2 path without xFormers)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', metavar='FILE', help='write the results here')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override entries of both configs')
    p.add_argument('--cfg-options2', nargs='+', action=DictAction,
                   help='override entries of the second config only (the '
                   'second config defaults to the first)')
    args = p.parse_args(argv)
    if args.cfg_options2 and args.config2 is None:
        args.config2 = args.config
    return args


def run(args: argparse.Namespace) -> Dict:
    """Benchmark ``args.config`` (and ``args.config2``); the report dict."""
    for path in (args.config, args.config2):
        if path is not None and not osp.isfile(path):
            raise FileNotFoundError(f'config file not found: {path}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda but torch sees no CUDA device')
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict:
    device = torch.device(args.device)
    batch = make_batch(args.batch_size, args.img_size, seed=args.seed)
    report = dict(
        env=dict(batch_size=args.batch_size, img_size=args.img_size,
                 device=str(device), amp=args.amp, repeats=args.repeats,
                 warmup=args.warmup, torch=torch.__version__,
                 threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                 gpu=(torch.cuda.get_device_name(device)
                      if device.type == 'cuda' else None)),
        loadavg_before=[round(v, 2) for v in os.getloadavg()])
    results = [benchmark_config(args.config, batch, args, device)]
    if args.config2 is not None:
        results.append(
            benchmark_config(args.config2, batch, args, device,
                             extra_options=args.cfg_options2))
    report['results'] = results
    report['loadavg_after'] = [round(v, 2) for v in os.getloadavg()]
    report['process_peak_rss_mb'] = resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024.
    if len(results) == 2:
        report['b_over_a'] = {
            name: results[1]['phases'][name]['median_s'] /
            results[0]['phases'][name]['median_s']
            for name in _shown(results[0]['phases'])
        }
    return report


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    report = run(args)
    print(format_tables(report))
    if args.json:
        mmengine.mkdir_or_exist(osp.dirname(osp.abspath(args.json)))
        mmengine.dump(report, args.json, indent=2)
        print(f'written {args.json}')
    return report


if __name__ == '__main__':
    main()
