"""Convert a checkpoint of the authors' ETRIS code (CLIP ViT-B/16 Bridger)
into mmseg_sera's ETRIS layout, or back (``--reverse``).

Usage::

    python tools/model_converters/etris_to_sera.py SRC DST \
        [--config CONFIG] [--clip CLIP.bin] [--reverse] [--dry-run]

SRC is what ETRIS's ``train.py`` saves (the whole model under
``state_dict``, keys prefixed ``module.``, ``optimizer`` and ``scheduler``
beside it), including the whole CLIP and its two trained position tables
(image (26^2 + 1) x 768 at 416 px, text 77 x 512). ``--clip`` fills only
frozen CLIP tensors a file lacks; the position tables must come from SRC.
The result is checked key for key and shape for shape against the model of
``--config`` (default: ETRIS ViT-B/16 on RefCOCO, d = 64), so it loads with
``init_model(CONFIG, DST, strict=True)`` and ``tools/test.py``.
``--reverse`` writes an mmseg_sera ETRIS checkpoint in the authors' layout.
The key map is ``mmseg_sera.models.peer_checkpoints``; see
docs/checkpoints.md.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from peer_checkpoint_cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main('etris', __doc__))
