"""Re-plan the intra-op threads of a CPU training run as the machine's load
changes (see :mod:`mmseg_sera.engine.cpu_plan`)."""
import time
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmseg.registry import HOOKS

from ..cpu_plan import OthersMeter, available_cores, plan_cpu_resources


@HOOKS.register_module()
class CPUPlanHook(Hook):
    """Every ``interval`` seconds of training, measure the cores that other
    processes keep busy and set ``torch.set_num_threads`` by the rule of
    :func:`~mmseg_sera.engine.cpu_plan.plan_cpu_resources`. A change is
    applied only after ``patience`` windows in a row ask for it (a short
    burst elsewhere does not flip the threads) and is logged.

    Why: two processes whose OpenMP teams each want both cores of a small
    machine stall each other (a demo step 4.7x slower); the start-up plan
    avoids that only for jobs already running when ours starts.

    ``tools/train.py`` adds this hook on CPU runs whose thread count it
    measured (``env_cfg.cpu_replan=False`` opts out). Changing the thread
    count changes float rounding, so a run whose threads changed is not
    bit-for-bit the run it would have been on a quiet machine; pin
    ``env_cfg.cpu_threads`` where that matters (``compare_methods.py``
    does).
    """

    priority = 'LOW'

    def __init__(self, interval: float = 20.0, patience: int = 2) -> None:
        if interval <= 0 or patience < 1:
            raise ValueError('CPUPlanHook: interval must be > 0 and patience '
                             f'>= 1, got {interval}, {patience}')
        self.interval = float(interval)
        self.patience = int(patience)
        self._meter: Optional[OthersMeter] = None
        self._next = 0.
        self._want: Optional[int] = None
        self._votes = 0

    def before_train(self, runner) -> None:
        if torch.cuda.is_available():
            return
        self._meter = OthersMeter()
        self._next = time.monotonic() + self.interval

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._meter is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval
        self.update(self._meter.read())

    def update(self, others: Optional[float]) -> Optional[int]:
        """Take one measurement (cores busy elsewhere, None = unknown);
        returns the new thread count when it changed."""
        if others is None:
            return None
        want = plan_cpu_resources(available_cores(), others).threads
        current = torch.get_num_threads()
        if want == current:
            self._want, self._votes = None, 0
            return None
        self._votes = self._votes + 1 if want == self._want else 1
        self._want = want
        if self._votes < self.patience:
            return None
        torch.set_num_threads(want)
        self._want, self._votes = None, 0
        print_log(f'CPU plan: {current} -> {want} intra-op thread(s) '
                  f'({others:.1f} core(s) busy with other processes)',
                  logger='current')
        return want
