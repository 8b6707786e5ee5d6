"""Read the routing weights of a model's routed modules during its forward.

SERA's routed modules return their routing next to their features
(``AdapterOutput.routing``, ``NeckOutput.routing``).  The segmentor's
``loss`` / ``predict`` keep only losses and masks, so
:class:`RoutingRecorder` reads the routing with PyTorch forward hooks: no
model code changes, nothing is stored on the modules, and it works on any
model whose routed modules follow those return types.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.model import is_model_wrapper
from torch import Tensor, nn

from ..models.structures import AdapterOutput, NeckOutput

__all__ = ['RoutingRecord', 'RoutingRecorder', 'routed_modules',
           'short_name', 'expert_label', 'routing_statistics']


@dataclass
class RoutingRecord:
    """The routing of one forward call of one routed module.

    Attributes:
        module: the module's name in the model (``'backbone.adapters.1'``).
        experts: expert names, E of them (the module's ``expert_names``
            through :func:`expert_label`: ``'SpatialExpert'`` ->
            ``'spatial'``).
        weights: ``B x E`` (per sample) or ``B x N x E`` (per token; N = h
            x w row-major), float32, detached, on the CPU (or on the
            module's device: ``RoutingRecorder(to_cpu=False)``).  Rows sum
            to 1.
        indices: ``B x K`` / ``B x N x K`` experts kept by a top-K router,
            or ``None`` for a soft router (every expert used).
    """
    module: str
    experts: Tuple[str, ...]
    weights: Tensor
    indices: Optional[Tensor] = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def top1_counts(self) -> Tensor:
        """Per expert, how many units (samples, or tokens) have it as their
        highest-weighted expert; ``E`` float64, summing to the unit
        count."""
        w = self.weights.reshape(-1, self.num_experts)
        experts = torch.arange(self.num_experts, device=w.device)
        # a comparison, not bincount: bincount reads its input on the host
        return (w.argmax(dim=-1, keepdim=True) == experts).sum(0).double()

    def num_units(self) -> int:
        return self.weights.reshape(-1, self.num_experts).shape[0]

    def weight_sums(self) -> Tensor:
        """Per expert, the summed routing weight over the units, ``E``."""
        return self.weights.reshape(-1, self.num_experts).sum(0).double()


def short_name(module: str) -> str:
    """``'backbone.adapters.3'`` -> ``'adapter3'``; other names lose their
    dots (``'neck'`` stays ``'neck'``)."""
    parts = module.split('.')
    if len(parts) >= 2 and parts[-2] == 'adapters':
        return f'adapter{parts[-1]}'
    return module.replace('.', '_') or 'model'


def expert_label(name: str) -> str:
    """``'SpatialExpert'`` -> ``'spatial'``; other names are lower-cased."""
    name = str(name)
    if name.endswith('Expert') and len(name) > len('Expert'):
        name = name[:-len('Expert')]
    return name.lower()


def _expert_names(module: nn.Module, count: int) -> Tuple[str, ...]:
    names = getattr(module, 'expert_names', None)
    if names is not None and len(names) == count:
        return tuple(expert_label(n) for n in names)
    return tuple(f'expert{i}' for i in range(count))


def routed_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Sub-modules with a ``router`` (SERA-Adapter, SERA-Fusion and peers
    built the same way), in model order."""
    if is_model_wrapper(model):
        model = model.module
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, 'router', None), nn.Module)]


class RoutingRecorder:
    """Context manager that collects :class:`RoutingRecord` s.

    Example::

        with RoutingRecorder(model) as rec:
            model.test_step(data)
        for r in rec.records:
            print(r.module, r.weights)

    Args:
        model: the segmentor (a DDP wrapper is unwrapped).
        modules: names of the routed modules to watch (default: all of
            :func:`routed_modules`).
        to_cpu: copy the routing to the CPU as it is recorded (default).
            ``False`` keeps it on the module's device: no host-device
            synchronisation in the forward (``ExpertUtilisationHook`` sums
            on the device and reads the sums once per logging window).

    Raises:
        ValueError: a name in ``modules`` is not a routed module.
    """

    def __init__(self, model: nn.Module,
                 modules: Optional[Sequence[str]] = None,
                 to_cpu: bool = True) -> None:
        found = dict(routed_modules(model))
        if modules is not None:
            unknown = sorted(set(modules) - set(found))
            if unknown:
                raise ValueError(f'not routed modules: {unknown}; the model '
                                 f'has {sorted(found)}')
            found = {n: found[n] for n in modules}
        self.modules: Dict[str, nn.Module] = found
        self.to_cpu = to_cpu
        self.records: List[RoutingRecord] = []
        self._handles = []

    def _hook(self, name: str):

        def hook(module: nn.Module, args, output) -> None:
            weights, indices = None, None
            if isinstance(output, AdapterOutput):
                weights = output.routing
            elif isinstance(output, NeckOutput) and output.routing:
                weights = output.routing.get('weights')
                indices = output.routing.get('indices')
            if weights is None:
                return
            weights = weights.detach().float()
            if indices is not None:
                indices = indices.detach()
            if self.to_cpu:
                weights = weights.cpu()
                indices = None if indices is None else indices.cpu()
            self.records.append(
                RoutingRecord(
                    module=name,
                    experts=_expert_names(module, weights.shape[-1]),
                    weights=weights,
                    indices=indices))

        return hook

    def clear(self) -> None:
        self.records.clear()

    def __enter__(self) -> 'RoutingRecorder':
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if not self._handles:
            self._handles = [
                m.register_forward_hook(self._hook(name))
                for name, m in self.modules.items()
            ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def routing_statistics(weights: Sequence[Sequence[float]],
                       images: Sequence[str],
                       groups: Optional[Sequence[str]] = None) -> dict:
    """How strongly one routed module's weights follow the sentence.

    Args:
        weights: M rows of E per-sentence weights (average per-token
            weights over the tokens first).
        images: the image of each row; rows of one image are its
            sentences.
        groups: a label per row (the sentence kind), or None.

    Returns:
        dict with ``mean`` and ``std`` (E floats, over the M rows),
        ``sentence_share`` and ``by_group`` (label -> ``dict(n, mean)``).
        ``sentence_share`` is the part of the variance (summed over
        experts) that lies between sentences of one image, over images
        with at least two sentences: 1 when the image does not matter, 0
        when the sentence does not; None without such images or without
        any variance.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 2 or len(images) != w.shape[0] or (
            groups is not None and len(groups) != w.shape[0]):
        raise ValueError('routing_statistics: weights must be M x E with one '
                         f'image (and group) per row; got {tuple(w.shape)} '
                         f'weights, {len(images)} images')
    rows: Dict[str, List[int]] = {}
    for i, img in enumerate(images):
        rows.setdefault(img, []).append(i)
    multi = [torch.tensor(r) for r in rows.values() if len(r) > 1]
    share = None
    if multi:
        sel = w[torch.cat(multi)]
        total = (sel - sel.mean(0)).pow(2).sum()
        within = sum((w[r] - w[r].mean(0)).pow(2).sum() for r in multi)
        if total > 0:
            share = float(within / total)
    by_group = {}
    if groups is not None:
        for g in sorted(set(groups)):
            idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
            by_group[g] = dict(n=len(idx), mean=w[idx].mean(0).tolist())
    return dict(mean=w.mean(0).tolist(), std=w.std(0, unbiased=False).tolist(),
                sentence_share=share, by_group=by_group)
