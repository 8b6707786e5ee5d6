"""Reading the backbone state dict out of a ViT checkpoint file's dict
(shared by the DINOv2 and DINOv3 converters)."""
from typing import Dict, Optional

from torch import Tensor


def unwrap_checkpoint(ckpt: Dict,
                      prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """Return the backbone state dict inside a loaded checkpoint.

    Accepts a plain state dict, or one wrapped in ``'model'``,
    ``'state_dict'`` or ``'teacher'`` (official training checkpoints, whose
    backbone keys start with ``backbone.`` beside ``dino_head.*`` /
    ``ibot_head.*``, which are dropped). A leading ``module.`` is stripped.

    ``prefix`` picks the encoder out of a larger model: only the keys under
    it are kept, without it (e.g. ``'pretrained.'`` for a Depth-Anything
    style depth network, whose DINOv2 encoder sits beside ``depth_head.*``).
    """
    if not isinstance(ckpt, dict):
        raise ValueError(f'expected a dict checkpoint, got {type(ckpt)}')
    for key in ('teacher', 'model', 'state_dict'):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    sd = {
        (k[len('module.'):] if k.startswith('module.') else k): v
        for k, v in ckpt.items()
    }
    if prefix:
        kept = {k[len(prefix):]: v for k, v in sd.items()
                if k.startswith(prefix)}
        if not kept:
            tops = sorted({k.split('.', 1)[0] + '.' for k in sd})
            raise ValueError(f'no key starts with prefix {prefix!r}; the '
                             f'checkpoint holds {tops[:12]}')
        sd = kept
    elif any(k.startswith('backbone.') for k in sd):
        sd = {
            k[len('backbone.'):]: v
            for k, v in sd.items() if k.startswith('backbone.')
        }
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f'checkpoint entries {bad[:8]} are not tensors: not '
                         'a ViT state dict')
    return sd
