"""Reading local open_clip checkpoints, shared by the CLIP text and image
towers (``OpenCLIPTextEncoder``, ``CLIPViT``)."""
import os
import pickle
from typing import Dict

import torch
from torch import Tensor


def read_clip_checkpoint(path: str, owner: str) -> Dict[str, Tensor]:
    """Read a local open_clip checkpoint (``torch.save`` of a state dict, or
    ``.safetensors``) for the text or the image tower named ``owner``.

    Raises:
        FileNotFoundError: the file does not exist (weights are never
            downloaded; the message says how to make the file).
        ValueError: the file is not a readable state dict.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{owner}: pretrained checkpoint {path!r} not found. Weights '
            'are never downloaded: save the state dict of an open_clip CLIP '
            'model there (e.g. checkpoints/open_clip_vit_b16.bin, from '
            "torch.save(open_clip.create_model('ViT-B-16', "
            "pretrained='openai').state_dict(), ...) on a machine with "
            'network access), or set pretrained=None for random weights.')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            raw = load_file(path, device='cpu')
        else:
            raw = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError) as err:
        raise ValueError(
            f'{owner}: cannot read {path!r} as a state dict ({err}). '
            "OpenAI's TorchScript archives must be converted once with "
            'open_clip (create_model(..., pretrained=FILE) then '
            'torch.save(model.state_dict(), ...)).') from err
    if not isinstance(raw, dict):
        raise ValueError(f'{owner}: {path!r} holds a {type(raw).__name__}, '
                         'not a state dict')
    return raw
