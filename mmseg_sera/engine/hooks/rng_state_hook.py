"""Keep the training random stream reproducible across resumes and
validation."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


def get_rng_state() -> dict:
    """Python, numpy and torch (CPU, and CUDA when in use) generator
    states."""
    state = dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, internal, gauss = state['python']
    # a checkpoint round trip may turn the tuple into a list
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Make ``--resume`` continue the exact random stream of the run.

    MMEngine re-seeds at start-up but does not restore the generators on
    resume, so the router noise, dropout and the sentence drawn for each
    sample differ after a resume.  This hook

    * stores the generator states in ``checkpoint['rng_state']`` and restores
      them when a checkpoint is loaded for resuming;
    * hands validation its own stream: the states are put back after each
      validation, so how often a run validates (and a run that stops, and
      validates, where another goes on) does not change training.

    With it, a run resumed from a checkpoint reproduces the uninterrupted run
    step for step.
    """

    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self._before_val: Optional[dict] = None

    def before_val(self, runner) -> None:
        self._before_val = get_rng_state()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_rng_state(self._before_val)
            self._before_val = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # A checkpoint saved during validation (best-metric checkpoints)
        # records the training stream, not validation's.
        checkpoint['rng_state'] = self._before_val or get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if 'rng_state' in checkpoint:
            set_rng_state(checkpoint['rng_state'])
