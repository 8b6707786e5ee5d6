"""Log how training spreads the inputs over the experts."""
import logging
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from mmengine.dist import all_reduce
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import print_log
from mmseg.registry import HOOKS

from ..routing import RoutingRecorder, short_name


@HOOKS.register_module()
class ExpertUtilisationHook(Hook):
    """Log the share of training inputs each expert receives.

    For every routed module (SERA-Adapter blocks, SERA-Fusion) and expert,
    the hook counts over a window of ``interval`` training iterations, on
    all ranks, the units whose highest routing weight is the expert's.  A
    unit is a sample (per-sample routing) or a token (per-token routing).
    The count does not depend on K, so a soft router (SERA-Adapter) and a
    top-K router with K = E (where every expert sees every unit) are read
    the same way.  At the end of the window it writes

    * ``util_<module>_<expert>``: that share of the units, in [0, 1],
      summing to 1 over a module's experts (``1 / E`` each when the load is
      even), e.g. ``util_neck_spatial``, ``util_adapter1_boundary``;
    * ``wutil_<module>_<expert>`` (with ``log_weights=True``): the mean
      routing weight, which sums to 1 over a module's experts,

    to the message hub, so they appear in the ``LoggerHook`` line and the
    visualizer backends (TensorBoard, ...), and warns once per module and
    expert when the expert collapses: its mean routing weight falls below
    ``collapse_ratio`` times the even weight ``1 / E``.  (The weight, not
    the top-1 share, decides: a soft router that gives every sample 0.45 /
    0.55 uses both experts although one of them is never the largest.)

    Args:
        interval: window length in iterations (default: the ``LoggerHook``
            interval, so every logged line has fresh values).
        log_weights: also log the mean routing weights.
        collapse_ratio: warning threshold relative to the even weight;
            ``0`` turns the warning off.
    """

    priority = 'NORMAL'  # before the LoggerHook (BELOW_NORMAL) prints

    def __init__(self,
                 interval: Optional[int] = None,
                 log_weights: bool = False,
                 collapse_ratio: float = 0.1) -> None:
        if interval is not None and interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        if not 0 <= collapse_ratio < 1:
            raise ValueError('collapse_ratio must be in [0, 1), got '
                             f'{collapse_ratio}')
        self.interval = interval
        self.log_weights = log_weights
        self.collapse_ratio = collapse_ratio
        self._recorder: Optional[RoutingRecorder] = None
        # module -> [expert names, top-1 counts, weight sums, unit count]
        self._sums: Dict[str, list] = OrderedDict()
        self._warned = set()

    def before_train(self, runner) -> None:
        if self.interval is None:
            loggers = [h for h in runner.hooks if isinstance(h, LoggerHook)]
            self.interval = loggers[0].interval if loggers else 50
        # sums stay on the device until a window ends: no host read per
        # forward
        self._recorder = RoutingRecorder(runner.model, to_cpu=False)
        if not self._recorder.modules:
            print_log('ExpertUtilisationHook: the model has no routed '
                      'module; nothing to log', logger='current')
        self._recorder.attach()

    def after_train(self, runner) -> None:
        if self._recorder is not None:
            self._recorder.detach()

    def before_val(self, runner) -> None:
        # validation and test forwards are not training utilisation
        if self._recorder is not None:
            self._recorder.detach()

    def after_val(self, runner) -> None:
        if self._recorder is not None and runner.train_loop is not None:
            self._recorder.attach()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._recorder is None:
            return
        for r in self._recorder.records:
            entry = self._sums.get(r.module)
            if entry is None:
                zeros = r.weights.new_zeros(r.num_experts,
                                            dtype=torch.float64)
                entry = self._sums[r.module] = [
                    r.experts, zeros, zeros.clone(), 0
                ]
            entry[1] += r.top1_counts()
            entry[2] += r.weight_sums()
            entry[3] += r.num_units()
        self._recorder.clear()
        if self.every_n_train_iters(runner, self.interval):
            self._flush(runner)

    def _flush(self, runner) -> None:
        for module, (experts, counts, wsum, units) in self._sums.items():
            stats = torch.cat([counts, wsum, counts.new_tensor([units])])
            all_reduce(stats)  # sum over ranks; a no-op on one process
            stats = stats.cpu()  # the one host read of the window
            E = len(experts)
            units = max(float(stats[-1]), 1.0)
            share = stats[:E] / units
            weight = stats[E:2 * E] / units
            name = short_name(module)
            for e, expert in enumerate(experts):
                runner.message_hub.update_scalar(
                    f'train/util_{name}_{expert}', float(share[e]))
                if self.log_weights:
                    runner.message_hub.update_scalar(
                        f'train/wutil_{name}_{expert}', float(weight[e]))
            self._check_collapse(name, experts, weight)
        self._sums.clear()

    def _check_collapse(self, name: str, experts: Tuple[str, ...],
                        weight: torch.Tensor) -> None:
        even = 1 / len(experts)
        if not self.collapse_ratio:
            return
        for e, expert in enumerate(experts):
            key = (name, expert)
            if key in self._warned or weight[e] >= self.collapse_ratio * even:
                continue
            self._warned.add(key)
            print_log(
                f'ExpertUtilisationHook: {name} expert "{expert}" got a mean '
                f'routing weight of {float(weight[e]):.1%} in the last '
                f'{self.interval} iterations (an even load gives '
                f'{even:.1%}): the routing is collapsing. Consider a larger '
                'balance loss weight or router noise.',
                logger='current', level=logging.WARNING)
