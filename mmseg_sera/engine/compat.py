"""Compatibility of MMEngine 0.10.x with current torch, handled in code.

* torch >= 2.6 loads checkpoints with ``weights_only=True``.  MMEngine stores
  its message hub (``HistoryBuffer`` objects holding numpy arrays) in every
  checkpoint, so ``--resume`` and ``tools/test.py`` would fail with
  ``Unsupported global``.  We allow-list exactly the types MMEngine writes;
  arbitrary pickled objects are still refused.
* Distributed training on a machine without CUDA: NCCL cannot run there, and
  ``DistributedDataParallel`` refuses ``device_ids`` for CPU modules, and
  MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally.
  :func:`adapt_dist_cfg` switches to ``gloo``, drops the device ids and, for
  the ``pytorch`` launcher, initialises the process group itself (MMEngine
  then skips its own initialisation).
* MMEngine never destroys the process group; a gloo group left to the
  interpreter's exit sometimes aborts a rank ("terminate called without an
  active exception") after the run has finished. :func:`close_process_group`
  ends it explicitly (``tools/train.py``, ``tools/test.py``).
"""
import os
import pickle
from typing import List

import numpy as np
import torch
import torch.distributed as dist


def _numpy_safe_globals() -> List[object]:
    """The numpy callables and types needed to unpickle plain arrays and
    scalars (numpy 1.x keeps them in ``numpy.core``, 2.x in ``numpy._core``).
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore
    found: List[object] = [np.ndarray, np.dtype, multiarray._reconstruct,
                           multiarray.scalar]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:  # numpy >= 1.25: one class per dtype
        found += [
            getattr(dtypes, name) for name in dir(dtypes) if
            name.endswith('DType') and isinstance(getattr(dtypes, name), type)
        ]
    return found


def _history_buffer_getattr(owner, name: str):
    """Stands in for ``builtins.getattr`` during a ``weights_only`` load.

    ``HistoryBuffer.__getstate__`` stores its statistics methods (``min``,
    ``max``, ``current``, ``mean``); pickle protocol 2 writes each one as
    ``getattr(HistoryBuffer, 'mean')``.  Allowing the real ``getattr`` would
    let a checkpoint fetch any attribute of any allowed object, so only
    functions defined on ``HistoryBuffer`` are handed out.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    value = vars(HistoryBuffer).get(name) if owner is HistoryBuffer else None
    if not callable(value) or name.startswith('_'):
        raise pickle.UnpicklingError(
            f'checkpoint asks for getattr({owner!r}, {name!r}); only the '
            'statistics methods of mmengine HistoryBuffer are allowed')
    return value


def register_checkpoint_safe_globals() -> None:
    """Allow ``torch.load(weights_only=True)`` to read MMEngine checkpoints.

    Idempotent; a no-op on torch versions without ``add_safe_globals``.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return
    from mmengine.logging.history_buffer import HistoryBuffer
    add([
        HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
        *_numpy_safe_globals()
    ])


def adapt_dist_cfg(cfg) -> None:
    """Make a config's distributed settings runnable on this machine.

    Without CUDA: ``env_cfg.dist_cfg.backend`` becomes ``'gloo'``, the DDP
    wrapper gets ``device_ids=None`` (DDP rejects device ids for CPU modules)
    and, under the ``pytorch`` launcher (torchrun), the process group is
    initialised here.  With CUDA nothing changes.  ``cfg`` is modified in
    place.
    """
    if torch.cuda.is_available():
        return
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    if cfg.get('launcher') == 'pytorch' and not dist.is_initialized():
        dist.init_process_group(
            backend=dist_cfg['backend'],
            rank=int(os.environ['RANK']),
            world_size=int(os.environ['WORLD_SIZE']))


def close_process_group() -> None:
    """Destroy the default process group if one is up (after the run, so
    that no rank aborts while its communication threads are torn down at
    exit).

    All ranks meet at a barrier first: a rank that tore its group down
    while rank 0 was still writing the last checkpoint was seen to abort
    ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
