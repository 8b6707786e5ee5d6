"""Time a referring segmentor against its own frozen backbone: the phases
of :func:`make_phases` timed with ``torch.utils.benchmark``
(:func:`measure_phases`), split per part and operator with
``torch.profiler`` (:func:`breakdown_train_step`, :func:`top_operators`),
with their peak memory (:func:`peak_memory`).  The library behind
``tools/analysis_tools/benchmark.py``; docs/benchmarks.md."""
import contextlib
import copy
import gc
import os
import os.path as osp
import resource
import statistics
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import benchmark as tbench
from torch.utils.benchmark.utils.timer import timer as sync_clock

PHASES = ('frozen_forward', 'frozen_fwd_bwd', 'train_step', 'inference')
REF_PHASES = ('frozen_forward_explicit', 'frozen_fwd_bwd_explicit')
PHASE_LABELS = {
    'frozen_forward': '(a) frozen backbone forward',
    'frozen_fwd_bwd': '(b) frozen backbone fwd + act. bwd',
    'train_step': '(c) training step',
    'inference': '(d) inference (predict)',
    'frozen_forward_explicit': "(a') (a), explicit attention",
    'frozen_fwd_bwd_explicit': "(b') (b), explicit attention",
}
# increasing memory, so that even a lifetime peak is meaningful
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
PARTS = ('text_encoder', 'backbone', 'adapters', 'neck', 'head', 'losses')
MB = 1024.**2


# --------------------------------------------------------------------------
# inputs, model, phases
# --------------------------------------------------------------------------
def make_batch(batch_size: int, img_size: int, seed: int = 0) -> Dict:
    """Raw batch for ``model.data_preprocessor``: B random uint8 images
    3 x S x S, B ``SegDataSample`` with a fixed sentence and a random
    binary ``gt_sem_seg``."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    if batch_size < 1 or img_size < 1:
        raise ValueError(f'batch size and image size must be positive, got '
                         f'{batch_size} and {img_size}')
    gen = torch.Generator().manual_seed(seed)
    size = (img_size, img_size)
    inputs, samples = [], []
    for i in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, *size), generator=gen,
                                    dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(
            text=SENTENCES[i % len(SENTENCES)], ori_shape=size,
            img_shape=size, pad_shape=size))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 2, (1, *size), generator=gen, dtype=torch.uint8))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def preprocess(model: nn.Module, batch: Dict, training: bool) -> Dict:
    """A copy of ``batch`` through ``model.data_preprocessor``."""
    return model.data_preprocessor(copy.deepcopy(batch), training=training)


def total_loss(losses: Dict) -> torch.Tensor:
    """Sum of the ``loss*`` entries (tensors or lists of tensors), as
    MMEngine's ``parse_losses`` does."""
    terms = []
    for key, value in losses.items():
        if key.startswith('loss'):
            terms.extend([value.mean()] if isinstance(value, torch.Tensor)
                         else [v.mean() for v in value])
    if not terms:
        raise ValueError(f'the model returned no loss*: {sorted(losses)}')
    return sum(terms)


@contextlib.contextmanager
def _attrs_set(targets) -> Iterator[None]:
    """``setattr(obj, attr, value)`` for each ``(obj, attr, value)`` inside
    the block, the old values back afterwards."""
    old = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    for obj, attr, value in targets:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in reversed(old):
            setattr(obj, attr, value)


def adapters_bypassed(backbone: nn.Module):
    """``backbone`` without its adapter slots inside the block."""
    from mmengine.model import ModuleDict
    adapters = getattr(backbone, 'adapters', None)
    if adapters is None:
        return contextlib.nullcontext()
    return _attrs_set([(backbone, 'adapters', adapters.emptied() if hasattr(
        adapters, 'emptied') else ModuleDict())])


def params_frozen(module: nn.Module):
    """``requires_grad=False`` on every parameter inside the block."""
    return _attrs_set([(p, 'requires_grad', False)
                       for p in module.parameters()])


def explicit_attention(backbone: nn.Module):
    """Every attention module with a ``fused`` switch runs with
    ``fused=False`` (explicit matmuls and softmax) inside the block."""
    modules = [m for m in backbone.modules()
               if isinstance(getattr(m, 'fused', None), bool)]
    if not modules:
        raise ValueError(
            f'--explicit-attn-ref: {type(backbone).__name__} has no attention '
            'module with a `fused` switch (DINOv2 has one)')
    return _attrs_set([(m, 'fused', False) for m in modules])


def backbone_features(backbone: nn.Module, x: torch.Tensor) -> tuple:
    """The backbone's output maps (``forward_features(x).feats`` for our
    DINOv2, else ``backbone(x)``)."""
    if hasattr(backbone, 'forward_features'):
        out = backbone.forward_features(x)
        return tuple(out.feats) if hasattr(out, 'feats') else tuple(out)
    return tuple(backbone(x))


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The config's ``optim_wrapper.optimizer`` (Adam, lr 1e-4 when absent)
    over the parameters that require a gradient."""
    from mmengine.registry import OPTIMIZERS
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError('the model has no trainable parameter')
    opt_cfg = cfg.get('optim_wrapper', {}).get('optimizer', None)
    opt_cfg = dict(opt_cfg) if opt_cfg else dict(type='Adam', lr=1e-4)
    return OPTIMIZERS.build(dict(opt_cfg, params=params))


@contextlib.contextmanager
def section(name: str, device: torch.device) -> Iterator[None]:
    """A ``record_function(name)`` range for the profiler, synchronising
    CUDA at both ends so that its wall time covers the device's work."""
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.synchronize(device)
    with record_function(name):
        yield
        if cuda:
            torch.cuda.synchronize(device)


def make_phases(model: nn.Module, train_data: Dict, test_data: Dict,
                optimizer: torch.optim.Optimizer, autocast: Callable,
                explicit_ref: bool = False,
                device: torch.device = torch.device('cpu')
                ) -> Dict[str, Callable[[], None]]:
    """The timed callables.  (a) ``frozen_forward``: the backbone alone
    under ``no_grad`` in eval mode, ``backbone.adapters`` emptied for the
    call (same weights and block loop, no adapter slots).  (b)
    ``frozen_fwd_bwd``, the floor: the same with every backbone parameter
    frozen, the image requiring a gradient, and ``backward()`` of
    ``sum_l mean(feat_l)``: activation gradients through every block, no
    weight gradient.  (c) ``train_step``: loss forward, the sum of the
    ``loss*`` terms, ``backward()``, optimizer step, ``zero_grad`` (in
    ``bench:`` sections).  (d) ``inference``: ``predict`` under
    ``no_grad`` (resize and threshold included).  ``explicit_ref``: also
    (a') and (b'), (a) and (b) with ``Attention.fused=False`` (explicit
    matmuls and softmax, the official DINOv2 path without xFormers)."""
    backbone = model.backbone

    def frozen_forward(attention=contextlib.nullcontext):
        model.eval()
        with torch.no_grad(), adapters_bypassed(backbone), \
                attention(backbone), autocast():
            backbone_features(backbone, test_data['inputs'])

    def frozen_fwd_bwd(attention=contextlib.nullcontext):
        model.eval()
        with adapters_bypassed(backbone), params_frozen(backbone), \
                attention(backbone):
            x = train_data['inputs'].detach().clone().requires_grad_(True)
            with autocast():
                scalar = sum(f.float().mean()
                             for f in backbone_features(backbone, x))
            scalar.backward()
            if x.grad is None:
                raise RuntimeError('no gradient reached the image')

    def train_step():
        model.train()
        with section('bench:forward', device), autocast():
            loss = total_loss(model(**train_data, mode='loss'))
        with section('bench:backward', device):
            loss.backward()
        with section('bench:optimizer', device):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def inference():
        model.eval()
        with section('bench:inference', device), torch.no_grad(), \
                autocast():
            model(**test_data, mode='predict')

    phases = dict(frozen_forward=frozen_forward,
                  frozen_fwd_bwd=frozen_fwd_bwd, train_step=train_step,
                  inference=inference)
    if explicit_ref:
        explicit_attention(backbone)  # fails early without a switch
        phases.update(
            frozen_forward_explicit=lambda: frozen_forward(
                explicit_attention),
            frozen_fwd_bwd_explicit=lambda: frozen_fwd_bwd(
                explicit_attention))
    return phases


# --------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    raise OSError(f'no {key} in /proc/self/status')


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Dict]:
    """Yields a dict filled at the exit: ``peak_mb``, ``increase_mb`` over
    the start, and ``kind``: ``cuda_allocated``
    (``torch.cuda.max_memory_allocated``), ``cpu_rss`` (the process's peak
    RSS: ``VmHWM`` after a reset through ``/proc/self/clear_refs``; by
    hand, as ``torch.profiler`` only counts tensor allocations) or, without
    ``/proc``, ``cpu_ru_maxrss`` (process lifetime, no increase)."""
    mem = dict(peak_mb=None, increase_mb=None, kind='cpu_ru_maxrss')
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, mem['kind'] = torch.cuda.memory_allocated(device), \
            'cuda_allocated'
    else:
        with contextlib.suppress(OSError):
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            start, mem['kind'] = _proc_status_bytes('VmRSS'), 'cpu_rss'
    yield mem
    if mem['kind'] == 'cuda_allocated':
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif mem['kind'] == 'cpu_rss':
        # the kernel updates the high-water mark lazily: a few pages touched
        # and returned right after the reset may be missing from it
        peak = max(_proc_status_bytes('VmHWM'), start)
    else:  # kilobytes on Linux
        mem['peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem['peak_mb'] /= 1024.
        return
    mem.update(peak_mb=peak / MB, increase_mb=(peak - start) / MB)


def task_spec(name: str, label: str = '') -> Dict:
    """``Timer`` / ``TaskSpec`` fields of a phase: in a ``Compare`` table
    the rows are phases, the columns the configs (``label``)."""
    return dict(label='median time per phase',
                sub_label=PHASE_LABELS.get(name, name), description=label,
                num_threads=torch.get_num_threads())


def time_adaptive(fn: Callable[[], None], spec: Dict, repeats: int = 3,
                  max_iqr: float = 0.1, max_time: float = 30.,
                  clock: Callable[[], float] = sync_clock
                  ) -> tbench.Measurement:
    """``Timer(...).adaptive_autorange`` of ``fn``: runs until IQR / median
    < ``max_iqr`` (at least 4 runs) or their total passes ``max_time``
    seconds; called again and merged until there are ``repeats`` runs.
    Its first, untimed call sizes the block: calls under about 10 ms run
    in blocks, and ``Measurement.times`` are per-call block means."""
    timer = tbench.Timer('fn()', globals=dict(fn=fn), timer=clock, **spec)
    parts: List[tbench.Measurement] = []
    while sum(len(m.times) for m in parts) < repeats:
        parts.append(timer.adaptive_autorange(
            threshold=max_iqr, min_run_time=0., max_run_time=max_time))
    return tbench.Measurement.merge(parts)[0]


def time_round_robin(fns: Mapping[str, Callable[[], None]],
                     specs: Mapping[str, Dict], repeats: int = 3,
                     max_iqr: float = 0.1, max_time: float = 30.,
                     clock: Callable[[], float] = sync_clock,
                     around: Callable = contextlib.nullcontext
                     ) -> Dict[str, tbench.Measurement]:
    """Rounds of one timed call of every phase, in the order of ``fns``,
    so that a drift of the machine's speed hits all phases alike, until
    every phase has ``repeats`` runs and IQR / median < ``max_iqr`` (the
    ``adaptive_autorange`` rule) or a timed total above ``max_time``.
    ``clock`` is ``Timer``'s (it synchronises an accelerator); each call
    runs inside ``around(name)``."""
    times: Dict[str, List[float]] = {name: [] for name in fns}

    def measurement(name):
        return tbench.Measurement(
            1, times[name], tbench.TaskSpec('fn()', 'pass', **specs[name]))

    def done(name):
        return len(times[name]) >= repeats and (
            measurement(name).meets_confidence(max_iqr)
            or sum(times[name]) > max_time)

    while not all(done(name) for name in fns):
        for name, fn in fns.items():
            with around(name), tbench.set_torch_threads(
                    specs[name]['num_threads']):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return {name: measurement(name) for name in fns}


def measure_phases(fns: Mapping[str, Callable[[], None]], order, device,
                   label: str = '', repeats: int = 3, warmup: int = 1,
                   max_iqr: float = 0.1, max_time: float = 30.,
                   interleave: bool = False,
                   clock: Callable[[], float] = sync_clock
                   ) -> Dict[str, Dict]:
    """The phases ``order`` of ``fns``, each after ``warmup`` untimed
    calls: :func:`time_adaptive` one phase after the other, or
    :func:`time_round_robin` with ``interleave``.

    Returns ``{name: row}`` with the ``measurement``, ``median_s``,
    ``iqr_s``, ``times_s``, ``runs``, ``spread`` (max / min),
    ``disturbed`` (IQR / median still >= ``max_iqr``, stopped by
    ``max_time``), the :func:`peak_memory` figures (the largest over the
    phase's calls) and the load average before and after.
    """
    if repeats < 1 or warmup < 0 or max_time <= 0:
        raise ValueError('repeats must be >= 1, warmup >= 0 and max_time > '
                         f'0, got {repeats}, {warmup}, {max_time}')
    specs = {name: task_spec(name, label) for name in order}
    mems: Dict[str, List[Dict]] = {name: [] for name in order}

    @contextlib.contextmanager
    def memory(name):
        with peak_memory(device) as mem:
            yield
        mems[name].append(mem)

    rows = {}
    for group in [list(order)] if interleave else [[n] for n in order]:
        before = [round(v, 2) for v in os.getloadavg()]
        for name in group:
            for _ in range(warmup):
                fns[name]()
        if interleave:
            ms = time_round_robin({n: fns[n] for n in group}, specs, repeats,
                                  max_iqr, max_time, clock, memory)
        else:
            with memory(group[0]):
                ms = {group[0]: time_adaptive(fns[group[0]], specs[group[0]],
                                              repeats, max_iqr, max_time,
                                              clock)}
        after = [round(v, 2) for v in os.getloadavg()]
        for name in group:
            m, inc = ms[name], [r['increase_mb'] for r in mems[name]]
            rows[name] = dict(
                measurement=m, median_s=m.median, iqr_s=m.iqr,
                times_s=list(m.times), runs=len(m.times),
                spread=max(m.times) / min(m.times),
                disturbed=not m.meets_confidence(max_iqr),
                peak_mem_mb=max(r['peak_mb'] for r in mems[name]),
                mem_increase_mb=None if None in inc else max(inc),
                mem_kind=mems[name][0]['kind'], loadavg_before=before,
                loadavg_after=after)
    return {name: rows[name] for name in order}


def ratios(measurements: Mapping[str, tbench.Measurement],
           ref: str = 'frozen_forward') -> Dict[str, float]:
    """Median of every measurement over the median of ``ref``."""
    return {name: m.median / measurements[ref].median
            for name, m in measurements.items()}


def compare(a: Mapping[str, tbench.Measurement],
            b: Mapping[str, tbench.Measurement]) -> Dict[str, float]:
    """B / A of the medians, for the phases both have (in A's order)."""
    return {name: b[name].median / m.median
            for name, m in a.items() if name in b}


# --------------------------------------------------------------------------
# breakdowns with torch.profiler
# --------------------------------------------------------------------------
@contextlib.contextmanager
def parts_annotated(model: nn.Module,
                    device: torch.device = torch.device('cpu')
                    ) -> Iterator[None]:
    """Inside the block each part of ``model`` runs in a
    :func:`section` ``part:<name>`` (:data:`PARTS`): the text encoder's
    ``forward``, the backbone's ``forward_features``, each adapter's
    ``forward`` (nested in the backbone's), the neck's and head's
    ``forward`` and the head's ``loss_by_feat`` (``losses``).  The
    wrappers are instance attributes, deleted afterwards: the model's code
    does not change."""
    backbone = model.backbone
    adapters = getattr(backbone, 'adapters', None) or {}
    targets = [('text_encoder', model.text_encoder, 'forward'),
               ('backbone', backbone, 'forward_features' if hasattr(
                   backbone, 'forward_features') else 'forward')]
    targets += [('adapters', a, 'forward') for a in adapters.values()]
    if getattr(model, 'neck', None) is not None:
        targets.append(('neck', model.neck, 'forward'))
    # a head with a no-target scorer runs its mask path and the scorer in
    # one call (BaseReferHead.forward_with_no_target)
    head_fn = ('forward_with_no_target' if getattr(
        model.decode_head, 'predicts_no_target', False) else 'forward')
    targets += [('head', model.decode_head, head_fn),
                ('losses', model.decode_head, 'loss_by_feat')]
    saved = [(obj, attr, vars(obj).get(attr)) for _, obj, attr in targets]
    for part, obj, attr in targets:
        def wrapped(*args, _f=getattr(obj, attr), _part=part, **kwargs):
            with section('part:' + _part, device):
                return _f(*args, **kwargs)

        object.__setattr__(obj, attr, wrapped)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if old is None:
                del vars(obj)[attr]
            else:
                object.__setattr__(obj, attr, old)


def profiled(fn: Callable[[], None], model: nn.Module, device: torch.device,
             **kwargs) -> profile:
    """``torch.profiler.profile`` (CPU, and CUDA on a GPU) of one call of
    ``fn`` with the model's parts annotated (:func:`parts_annotated`);
    ``kwargs`` (``record_shapes``, ``profile_memory``) go to ``profile``."""
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with parts_annotated(model, device), profile(activities=activities,
                                                 **kwargs) as prof:
        fn()
    return prof


def _innermost(event, prefix: str) -> Optional[str]:
    while event is not None and not event.name.startswith(prefix):
        event = event.cpu_parent
    return None if event is None else event.name[len(prefix):]


def section_times(prof: profile, prefix: str = 'part:'
                  ) -> Dict[str, float]:
    """Seconds in the ranges named ``<prefix><name>``, summed per name
    (wall time; :func:`section` synchronises CUDA)."""
    out: Dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith(prefix):
            name = e.name[len(prefix):]
            out[name] = out.get(name, 0.) + e.cpu_time_total / 1e6
    return out


def backward_times(prof: profile, device: torch.device
                   ) -> Dict[str, float]:
    """Seconds of the backward per part.  Each autograd node
    (``autograd::engine::evaluate_function``) carries the sequence number
    of the forward operator that made it; that operator lies in the
    innermost ``part:`` range (so adapters count apart from the
    backbone).  CPU: the nodes' wall time; CUDA: their kernels' device
    time.  Nodes of no part (gradient accumulation into parameters, the
    loss sum) count as ``other``."""
    node = 'autograd::engine::evaluate_function'
    owner: Dict[int, str] = {}
    for e in prof.events():
        if e.sequence_nr >= 0 and not e.name.startswith('autograd::'):
            owner.setdefault(e.sequence_nr,
                             _innermost(e.cpu_parent, 'part:') or 'other')
    out: Dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith(node) and _innermost(e.cpu_parent, node) is None:
            part = owner.get(e.sequence_nr, 'other')
            us = (e.device_time_total if device.type == 'cuda' else
                  e.cpu_time_total)
            out[part] = out.get(part, 0.) + us / 1e6
    return out


def _median_parts(repeats: int, parts: Callable[[], Dict[str, float]]
                  ) -> Dict[str, float]:
    rows = [parts() for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def breakdown_train_step(step: Callable[[], None], model: nn.Module,
                         device: torch.device, repeats: int = 3
                         ) -> Dict[str, float]:
    """Seconds per part of the training step ``step`` (from
    :func:`make_phases`), median over ``repeats`` profiled calls.

    ``forward``, ``backward``, ``optimizer``: the step's sections,
    ``step`` their sum.  ``fwd_<part>``: wall time of the part's range
    (``fwd_backbone_blocks`` without the adapters'), ``fwd_other`` the
    rest of the forward.  ``bwd_<part>`` (:func:`backward_times`) for
    losses, head, neck, adapters and backbone blocks, and
    ``bwd_text_encoder_other``: the rest of the backward (text encoder,
    gradient accumulation, the engine).
    """
    def parts():
        prof = profiled(step, model, device)
        f = dict(dict.fromkeys(PARTS, 0.), **section_times(prof))
        b = backward_times(prof, device)
        out = {k: v for k, v in section_times(prof, 'bench:').items()
               if k in ('forward', 'backward', 'optimizer')}
        out['step'] = sum(out.values())
        out.update({'fwd_' + k: f[k] for k in PARTS})
        out['fwd_backbone_blocks'] = out.pop('fwd_backbone') - f['adapters']
        out['fwd_other'] = out['forward'] - sum(
            f[k] for k in PARTS if k != 'adapters')
        out.update({'bwd_' + k: b.get(k, 0.)
                    for k in ('losses', 'head', 'neck', 'adapters')})
        out['bwd_backbone_blocks'] = b.get('backbone', 0.)
        out['bwd_text_encoder_other'] = out['backward'] - sum(
            v for k, v in out.items() if k.startswith('bwd_'))
        return out

    return _median_parts(repeats, parts)


def breakdown_inference(predict: Callable[[], None], model: nn.Module,
                        device: torch.device, repeats: int = 3
                        ) -> Dict[str, float]:
    """Seconds per part of one ``predict`` call (the ``inference`` phase),
    median over ``repeats`` profiled calls: ``inference`` (whole call),
    ``text_encoder``, ``backbone_blocks`` (without adapters),
    ``adapters``, ``neck``, ``head``, ``other`` (resize, threshold)."""
    def parts():
        prof = profiled(predict, model, device)
        f = dict(dict.fromkeys(PARTS, 0.), **section_times(prof))
        out = dict(inference=section_times(prof, 'bench:')['inference'],
                   **{k: f[k] for k in PARTS if k != 'losses'})
        out['backbone_blocks'] = out.pop('backbone') - f['adapters']
        out['other'] = out['inference'] - sum(
            v for k, v in out.items() if k != 'inference')
        return out

    return _median_parts(repeats, parts)


def top_operators(prof: profile, top: int) -> List[Dict]:
    """The ``top`` operators by self CPU time of a profile: calls, self
    CPU and CUDA seconds, share of all self CPU time, self CPU memory
    (``profile_memory``) and, with ``record_shapes``, the input shapes of
    its most expensive call signature."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total,
                    reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.
    shapes = {e.key: e.input_shapes for e in sorted(
        prof.key_averages(group_by_input_shape=True),
        key=lambda e: e.self_cpu_time_total)}
    return [
        dict(op=e.key, calls=e.count, self_cpu_s=e.self_cpu_time_total / 1e6,
             self_cuda_s=e.self_device_time_total / 1e6,
             share=e.self_cpu_time_total / total,
             self_cpu_mem_mb=e.self_cpu_memory_usage / MB,
             input_shapes=shapes.get(e.key)) for e in events[:top]
    ]


# --------------------------------------------------------------------------
# one config, a report
# --------------------------------------------------------------------------
def param_counts(model: nn.Module) -> Dict:
    """All and trainable parameters, and the trainable share (%) of the
    backbone's own parameters (adapters excluded)."""
    own = [p for n, p in model.named_parameters() if n.startswith(
        'backbone.') and not n.startswith('backbone.adapters.')]
    return dict(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters()
                      if p.requires_grad),
        backbone_trainable_percent=100. * sum(
            p.numel() for p in own if p.requires_grad) / max(
                1, sum(p.numel() for p in own)))


def benchmark_config(config: str, batch: Dict, device: torch.device,
                     cfg_options: Optional[dict] = None,
                     extra_options: Optional[dict] = None,
                     tag: str = 'A', amp: Optional[str] = None,
                     explicit_ref: bool = False, breakdown: bool = False,
                     profile_top: int = 0, seed: int = 0,
                     **timing) -> Dict:
    """Every phase of ``config`` (``cfg_options`` updated by
    ``extra_options``) on ``batch``: the :func:`measure_phases` rows
    (``timing`` goes there) with ``ratio`` to (a) and, with
    ``explicit_ref``, ``ratio_explicit`` to (a'); ``breakdown`` adds
    :func:`breakdown_train_step` and :func:`breakdown_inference`,
    ``profile_top`` the :func:`top_operators` of one training step
    (profiled with ``record_shapes`` and ``profile_memory``)."""
    from .config import build_model, load_config
    options = dict(cfg_options or {}, **(extra_options or {}))
    cfg = load_config(config, options)
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)  # random weights, no checkpoint
    dtype = AMP_DTYPES[amp] if amp else None
    phases = make_phases(
        model, preprocess(model, batch, training=True),
        preprocess(model, batch, training=False),
        build_optimizer(cfg, model), lambda: torch.autocast(
            device.type, dtype=dtype, enabled=dtype is not None),
        explicit_ref=explicit_ref, device=device)
    label = osp.splitext(osp.basename(config))[0]
    if extra_options:
        label += ' + ' + ' '.join(f'{k}={v}'
                                  for k, v in extra_options.items())
    rows = measure_phases(phases, REF_RUN_ORDER if explicit_ref else
                          RUN_ORDER, device, label=f'{tag}: {label}',
                          **timing)
    rows = {n: rows[n] for n in PHASES + REF_PHASES if n in rows}
    ms = {name: row.pop('measurement') for name, row in rows.items()}
    explicit = ratios(ms, REF_PHASES[0]) if explicit_ref else {}
    for name, ratio in ratios(ms).items():
        rows[name]['ratio'] = ratio
        if explicit:
            rows[name]['ratio_explicit'] = explicit[name]
    out = dict(config=osp.abspath(config), label=label, cfg_options=options,
               params=param_counts(model), phases=rows, measurements=ms)
    repeats = timing.get('repeats', 3)
    if breakdown:
        out['breakdown'] = breakdown_train_step(phases['train_step'], model,
                                                device, repeats)
        out['breakdown_inference'] = breakdown_inference(
            phases['inference'], model, device, repeats)
    if profile_top:
        out['profile'] = top_operators(
            profiled(phases['train_step'], model, device,
                     record_shapes=True, profile_memory=True), profile_top)
    del model, phases
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return out


def run(config: str, config2: Optional[str] = None,
        cfg_options2: Optional[dict] = None, batch_size: int = 2,
        img_size: int = 448, device: str = 'cpu',
        threads: Optional[int] = None, **kwargs) -> Dict:
    """Benchmark ``config`` and ``config2`` (``cfg_options2`` on top) on
    one batch with ``threads`` torch threads; ``kwargs`` go to
    :func:`benchmark_config`.  The report: ``env``, ``results`` (their
    ``Measurement`` objects in ``measurements``, see :func:`to_json`),
    ``b_over_a``, ``loadavg_before/after``, ``process_peak_rss_mb`` (the
    larger of ``ru_maxrss`` and the phases' peaks: resetting the peak RSS
    may reset ``ru_maxrss``)."""
    for path in (config, config2):
        if path is not None and not osp.isfile(path):
            raise FileNotFoundError(f'config file not found: {path}')
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda but torch sees no CUDA device')
    dev, old_threads = torch.device(device), torch.get_num_threads()
    torch.set_num_threads(threads or old_threads)
    try:
        report = dict(env=dict(
            {k: v for k, v in kwargs.items() if k in (
                'repeats', 'warmup', 'max_iqr', 'max_time', 'interleave',
                'amp')}, batch_size=batch_size, img_size=img_size,
            device=device, torch=torch.__version__,
            threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
            gpu=torch.cuda.get_device_name(dev) if device == 'cuda' else
            None), loadavg_before=[round(v, 2) for v in os.getloadavg()])
        batch = make_batch(batch_size, img_size, seed=kwargs.get('seed', 0))
        results = [benchmark_config(config, batch, dev, **kwargs)]
        if config2 is not None:
            results.append(benchmark_config(
                config2, batch, dev, extra_options=cfg_options2, tag='B',
                **kwargs))
    finally:
        torch.set_num_threads(old_threads)
    report.update(results=results,
                  loadavg_after=[round(v, 2) for v in os.getloadavg()])
    report['process_peak_rss_mb'] = max(
        [r['peak_mem_mb'] for res in results for r in res['phases'].values()
         if r['mem_kind'] != 'cuda_allocated'] +
        [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.])
    if config2 is not None:
        report['b_over_a'] = compare(results[0]['measurements'],
                                     results[1]['measurements'])
    return report


def to_json(report: Dict) -> Dict:
    """``report`` without the ``Measurement`` objects."""
    return dict(report, results=[
        {k: v for k, v in r.items() if k != 'measurements'}
        for r in report['results']])
