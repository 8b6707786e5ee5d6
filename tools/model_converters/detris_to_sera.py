"""Convert a checkpoint of the authors' DETRIS code into mmseg_sera's
DETRIS layout, or back (``--reverse``).

Usage::

    python tools/model_converters/detris_to_sera.py SRC DST \
        [--config CONFIG] [--dinov2 DINOV2.pth] [--clip CLIP.bin] \
        [--reverse] [--dry-run]

SRC is what DETRIS's ``train.py`` saves (``best_model.pth``: the whole
model under ``state_dict``, keys prefixed ``module.``, ``optimizer`` and
``scheduler`` beside it). The frozen DINOv2 and CLIP text towers are in
that file; ``--dinov2`` / ``--clip`` only fill them in when a file was
saved without them. The result is checked key for key and shape for shape
against the model of ``--config`` (default: DETRIS-B on RefCOCO), so it
loads with ``init_model(CONFIG, DST, strict=True)`` and ``tools/test.py``.
``--reverse`` writes an mmseg_sera DETRIS checkpoint in the authors'
layout, which their ``test.py`` loads. The key map is
``mmseg_sera.models.peer_checkpoints``; see docs/checkpoints.md.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from peer_checkpoint_cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main('detris', __doc__))
