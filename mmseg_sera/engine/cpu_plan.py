"""Threads and data workers chosen from the machine, for CPU runs.

PyTorch starts one intra-op thread per core and the configs ask for a fixed
number of dataloader workers. On a small machine that oversubscribes the
cores as soon as anything else runs: two processes whose OpenMP teams each
want every core stall each other (a training step measured 10x slower).
:func:`plan_cpu_resources` decides instead, from what the machine has free
when the run starts:

* ``cores``: the CPUs this process may run on (``os.sched_getaffinity``);
* ``busy``: cores kept busy by other processes at normal priority (niced
  ones yield to us), measured over ``probe_seconds`` from ``/proc/stat``
  (0 where it cannot be read);
* each of the ``world_size`` ranks on the machine gets ``per_rank =
  max(1, max(1, round(cores - busy)) // world_size)`` intra-op threads and
  at most ``per_rank - 1`` dataloader workers (none with one core), never
  more workers than the config asks for.

``tools/train.py`` and ``tools/test.py`` apply it through
:func:`apply_cpu_plan` when CUDA is absent. ``env_cfg.cpu_threads`` (an int)
and ``env_cfg.cpu_workers`` (an int, the cap on every dataloader's workers)
override the two choices; ``env_cfg.cpu_plan=False`` keeps the config's and
PyTorch's defaults.

A job that starts *after* ours is not seen at start-up, so when the thread
count was measured (not set) on a single-process run, training also
re-plans the threads as it goes (:class:`CPUPlanHook`, added by
:func:`apply_cpu_plan`; ``env_cfg.cpu_replan=False`` turns it off): every
``interval`` seconds it measures the cores the *other* processes keep busy
(the machine's busy time minus this process's and its dataloader workers')
and applies the same rule to the threads. Workers stay as they started.
"""
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

_DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


@dataclass(frozen=True)
class CPUPlan:
    """What a run uses: ``threads`` intra-op threads and at most
    ``max_workers`` workers per dataloader; ``cores`` / ``busy`` say what
    it was chosen from."""
    cores: int
    busy: float
    world_size: int
    threads: int
    max_workers: int

    def describe(self) -> str:
        return (f'CPU plan: {self.threads} intra-op thread(s), at most '
                f'{self.max_workers} dataloader worker(s) per loader '
                f'({self.cores} core(s), {self.busy:.1f} busy with other '
                f'processes, {self.world_size} rank(s) on this machine)')


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times(path: str = '/proc/stat') -> Optional[Tuple[int, int]]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``; busy leaves
    out idle, iowait and niced time (a niced process yields its core to
    ours, so it does not take a core away from a run)."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != 'cpu':
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]:
    # guest time is already counted in user / nice.
    values = [int(v) for v in fields[1:9]]
    not_busy = values[1] + values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - not_busy, sum(values)


def busy_cores(seconds: float = 0.5) -> float:
    """Cores kept busy by the whole machine over ``seconds`` (this process
    sleeps meanwhile, so it is what the others use); 0 when unknown."""
    before = _cpu_times()
    if before is None or seconds <= 0:
        return 0.
    time.sleep(seconds)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return 0.
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


def _stat_fields(pid) -> Optional[List[str]]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may
    hold spaces), so that ``[1]`` is the ppid and ``[11]``, ``[12]`` are
    utime and stime; None when it cannot be read."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(')') + 2:].split()


def _process_ticks(pid) -> int:
    """User + system clock ticks of one process (all its threads); 0 when
    unknown."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def own_ticks() -> Dict[int, int]:
    """Clock ticks used so far by this process and by each of its children
    (the dataloader workers), by pid, read from ``/proc``."""
    me = os.getpid()
    ticks = {me: _process_ticks(me)}
    try:
        pids = [p for p in os.listdir('/proc') if p.isdigit()]
    except OSError:
        return ticks
    for pid in pids:
        fields = _stat_fields(pid)
        if fields and fields[1] == str(me):  # a child of ours
            ticks[int(pid)] = int(fields[11]) + int(fields[12])
    return ticks


class OthersMeter:
    """Cores kept busy by *other* processes (at normal priority) between
    two calls of :meth:`read`: the machine's busy time from ``/proc/stat``
    minus what this process and its workers used. ``/proc/stat`` counts in
    USER_HZ ticks, ``/proc/<pid>/stat`` in clock ticks; both are 100 per
    second on Linux."""

    def __init__(self) -> None:
        self._last = self._snapshot()

    @staticmethod
    def _snapshot():
        times = _cpu_times()
        return None if times is None else (times, own_ticks())

    def read(self) -> Optional[float]:
        """Other processes' cores since the last call; None when unknown."""
        now = self._snapshot()
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        (busy1, total1), own1 = now
        (busy0, total0), own0 = last
        window = (total1 - total0) / (os.cpu_count() or 1)  # ticks per core
        if window <= 0:
            return None
        # per process, so that a worker that came or went in the window
        # counts with what it used in it (a new one: all its ticks)
        ours = sum(t - own0.get(pid, 0) for pid, t in own1.items())
        return max(0., (busy1 - busy0) - ours) / window


def plan_cpu_resources(cores: int, busy: float, world_size: int = 1,
                       configured_workers: int = 0,
                       threads: Optional[int] = None,
                       workers: Optional[int] = None) -> CPUPlan:
    """The rule (pure, so it is tested on its own).

    ``free = max(1, round(cores - busy))`` cores are shared by the
    ``world_size`` ranks of this machine: each rank gets ``per_rank =
    max(1, free // world_size)`` intra-op threads. Dataloader workers mostly
    wait; each costs a core while it decodes, so a rank gets at most
    ``per_rank - 1`` of them, and none when it has one core: with one core
    the main process loads the batch itself instead of switching to a
    worker. ``threads`` / ``workers`` given explicitly win.
    """
    free = max(1, round(cores - busy))
    per_rank = max(1, free // max(1, world_size))
    n_threads = per_rank if threads is None else max(1, int(threads))
    cap = max(0, per_rank - 1) if workers is None else max(0, int(workers))
    return CPUPlan(cores=cores, busy=round(busy, 2), world_size=world_size,
                   threads=n_threads,
                   max_workers=min(cap, max(0, configured_workers)))


def apply_cpu_plan(cfg, probe_seconds: float = 0.5) -> Optional[CPUPlan]:
    """Apply :func:`plan_cpu_resources` to a run: ``torch.set_num_threads``
    and the ``num_workers`` of every dataloader in ``cfg`` (changed in
    place; ``persistent_workers`` is switched off where no worker is left).
    Does nothing on a CUDA machine or with ``env_cfg.cpu_plan=False``."""
    import torch
    from mmengine.logging import print_log
    env_cfg = cfg.get('env_cfg') or {}
    if torch.cuda.is_available() or not env_cfg.get('cpu_plan', True):
        return None
    world_size = int(os.environ.get('LOCAL_WORLD_SIZE',
                                    os.environ.get('WORLD_SIZE', 1)))
    loaders = [cfg[k] for k in _DATALOADERS if cfg.get(k)]
    configured = max([dl.get('num_workers', 0) for dl in loaders] + [0])
    threads, workers = env_cfg.get('cpu_threads'), env_cfg.get('cpu_workers')
    # Measure only when something is left to decide, and not in a
    # distributed start, where the other ranks' start-up would count as busy
    # (the ranks share the cores through world_size instead).
    measure = world_size == 1 and (threads is None or
                                   (workers is None and configured > 0))
    plan = plan_cpu_resources(
        available_cores(), busy_cores(probe_seconds) if measure else 0.,
        world_size, configured, threads, workers)
    torch.set_num_threads(plan.threads)
    if threads is None and world_size == 1 and env_cfg.get(
            'cpu_replan', True):
        hooks = list(cfg.get('custom_hooks') or [])
        if not any(h.get('type') == 'CPUPlanHook' for h in hooks):
            cfg['custom_hooks'] = hooks + [dict(type='CPUPlanHook')]
    for dl in loaders:
        if dl.get('num_workers', 0) > plan.max_workers:
            dl['num_workers'] = plan.max_workers
        if dl.get('num_workers', 0) == 0 and dl.get('persistent_workers'):
            dl['persistent_workers'] = False
    print_log(plan.describe(), logger='current')
    return plan
