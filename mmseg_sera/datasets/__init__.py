"""Datasets and pipeline transforms (registered in mmseg's DATASETS and
TRANSFORMS).  Nothing here imports ``mmseg_sera.models``."""
from .grefcoco import GREFCOCO_SPLITS, GRefCocoDataset, merge_target_masks
from .multispectral import (LoadMultiBandImageFromFile,
                            SyntheticMultispectralDataset)
from .phrasecut import (PHRASECUT_SPLITS, PhraseCutDataset,
                        phrasecut_polygons_to_mask, phrasecut_splits)
from .refcoco import VALID_SPLITS, RefCocoDataset, load_refs
from .safe_pickle import (RestrictedUnpickler, UnsafePickleError,
                          safe_load_pickle, safe_loads_pickle)
from .transforms import *  # noqa: F401,F403
from .transforms import __all__ as _transforms_all

__all__ = [
    'RefCocoDataset', 'VALID_SPLITS', 'load_refs', 'RestrictedUnpickler',
    'UnsafePickleError', 'safe_load_pickle', 'safe_loads_pickle',
    'PhraseCutDataset', 'PHRASECUT_SPLITS', 'phrasecut_splits',
    'phrasecut_polygons_to_mask', 'SyntheticMultispectralDataset',
    'LoadMultiBandImageFromFile', 'GRefCocoDataset', 'GREFCOCO_SPLITS',
    'merge_target_masks'
] + list(_transforms_all)
