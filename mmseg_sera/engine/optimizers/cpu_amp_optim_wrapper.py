"""Mixed precision training on the CPU."""
from contextlib import contextmanager
from typing import Union

import torch
from mmengine.optim import OptimWrapper
from mmseg.registry import OPTIM_WRAPPERS
from torch import nn


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """bfloat16 autocast for training on the CPU.

    MMEngine's ``AmpOptimWrapper`` refuses to start without CUDA (or NPU /
    MLU).  This wrapper runs the forward under
    ``torch.autocast('cpu', dtype=torch.bfloat16)``: matrix products and
    convolutions compute in bfloat16, while the parameters, their gradients
    and the optimizer state stay float32.  bfloat16 has float32's exponent
    range, so no loss scaling is needed and ``backward`` / ``step`` are the
    plain ``OptimWrapper`` ones.  ``tools/train.py --amp`` picks it when no
    GPU is present.

    Args:
        dtype: autocast dtype; only ``'bfloat16'`` (CPU float16 autocast
            would need loss scaling and is slower than bfloat16).
        **kwargs: as :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, *args, dtype: Union[str, torch.dtype] = 'bfloat16',
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype is not torch.bfloat16:
            raise ValueError('CPUAmpOptimWrapper supports dtype="bfloat16" '
                             f'only, got {dtype!r}')
        self.cast_dtype = dtype

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), torch.autocast(
                'cpu', dtype=self.cast_dtype):
            yield
