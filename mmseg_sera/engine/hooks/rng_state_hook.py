"""Save and restore the random number generators with each checkpoint."""
import random

import numpy as np
import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Make ``--resume`` continue the exact random stream of the run.

    MMEngine re-seeds at start-up but does not restore the generators on
    resume, so the router noise, dropout and the sentence drawn for each
    sample differ after a resume.  This hook stores the Python, numpy and
    torch (CPU and CUDA) generator states in ``checkpoint['rng_state']`` and
    restores them when the checkpoint is loaded for resuming, so a resumed
    run reproduces the uninterrupted one.
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('rng_state')
        if state is None:
            return
        random.setstate(_as_python_state(state['python']))
        np.random.set_state(state['numpy'])
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])


def _as_python_state(state):
    """``random.setstate`` needs tuples; a checkpoint round trip may turn
    them into lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
