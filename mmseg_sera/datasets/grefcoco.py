"""gRefCOCO: generalized referring segmentation (GRES, Liu et al., CVPR 2023),
where a sentence names zero, one or several objects.

Expected tree (the layout of the gRefCOCO release and of its baseline
ReLA; ``data_root`` is the folder that holds ``grefcoco/``)::

    data_root/
      grefcoco/  grefs(unc).json  instances.json   [grefs(unc).p]
      images/train2014/COCO_train2014_000000581857.jpg ...

A ref is that of the refer toolkit (``ref_id``, ``image_id``, ``split``,
``category_id``, ``sentences``) except that ``ann_id`` is an int **or a list
of ints**, and ``[-1]`` means that the sentence names nothing in the image.
The JSON file is the released form and is read first; a pickled
``grefs(unc).p`` is used only when the JSON is absent, and only through the
restricted unpickler (:mod:`mmseg_sera.datasets.safe_pickle`), so a pickle
that asks for any callable is refused before anything runs.
"""
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils

from mmseg.registry import DATASETS
from .refcoco import RefCocoDataset
from .transforms.loading import decode_refer_mask

__all__ = ['GRefCocoDataset', 'GREFCOCO_SPLITS', 'NO_TARGET_ANN_ID',
           'normalise_ann_ids', 'valid_polygons', 'merge_target_masks']

#: dataset -> split_by -> splits of the gRefCOCO release
GREFCOCO_SPLITS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    'grefcoco': {'unc': ('train', 'val', 'testA', 'testB')},
}
#: the ``ann_id`` list of a ref that names no object
NO_TARGET_ANN_ID = -1
_RELEASE = 'github.com/henghuiding/gRefCOCO'


def normalise_ann_ids(ann_id: Any, ref_id: Any = None) -> List[int]:
    """A ref's ``ann_id`` as a list: ``5`` -> ``[5]``, ``[5, 7]`` stays,
    ``-1`` or ``[-1]`` -> ``[-1]`` (no target).

    Raises:
        ValueError: an empty list, or ``-1`` mixed with annotation ids.
    """
    ids = list(ann_id) if isinstance(ann_id, (list, tuple)) else [ann_id]
    if not ids:
        raise ValueError(
            f'ref {ref_id} has an empty ann_id list; a ref that names no '
            f'object has ann_id [{NO_TARGET_ANN_ID}]')
    if NO_TARGET_ANN_ID in ids and len(ids) > 1:
        raise ValueError(
            f'ref {ref_id} mixes the no-target id {NO_TARGET_ANN_ID} with '
            f'annotation ids: {ids}')
    return ids


def valid_polygons(segmentation: List[Sequence[float]]) -> List[list]:
    """The polygons of a COCO polygon list that pycocotools can rasterise:
    an even number of coordinates, at least 6 (three points); the others
    are dropped, as the gRefCOCO loader does."""
    return [list(p) for p in segmentation
            if len(p) >= 6 and len(p) % 2 == 0]


def merge_target_masks(segmentations: Sequence[Union[list, dict]],
                       height: int, width: int) -> np.ndarray:
    """Union of a ref's annotation masks, H x W uint8 {0, 1}::

        M = clip(sum_a decode(seg_a), 0, 1)

    Each ``seg_a`` is a COCO polygon list (invalid polygons dropped by
    :func:`valid_polygons`; an annotation left without any adds nothing) or
    an RLE (compressed or not), decoded with pycocotools at (height, width)
    by :func:`decode_refer_mask`.  No segmentation gives all zeros (the
    mask of a no-target ref).
    """
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    for seg in segmentations:
        if isinstance(seg, list):
            seg = valid_polygons(seg)
            if not seg:
                continue
        np.maximum(mask, decode_refer_mask(seg, height, width), out=mask)
    return mask


def _compressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return dict(size=[int(s) for s in rle['size']],
                counts=rle['counts'].decode('ascii'))


@DATASETS.register_module()
class GRefCocoDataset(RefCocoDataset):
    """gRefCOCO in its release layout (see the module docstring); the
    arguments, the pipelines and :class:`ReferSegMetric` are those of
    :class:`RefCocoDataset`.

    Items (``data_info`` dicts), in addition to RefCocoDataset's fields:

    - ``ann_id``: always a list (``[-1]`` for a no-target ref);
      ``category_id`` as the ref gives it (int or list).
    - ``no_target`` (bool): the sentence names nothing.
      ``PackReferSegInputs`` copies it into the ``SegDataSample``
      metainfo, where the metric reads it.
    - ``segmentations``: the segmentations of the ref's annotations that
      make its mask (crowd annotations of a multi-target ref left out);
      empty for a no-target ref.
    - ``segmentation`` (added by :meth:`get_data_info`): the compressed RLE
      of :func:`merge_target_masks` of ``segmentations``, so
      ``LoadReferringMask`` decodes the target of every kind of ref:
      the union of several objects, clipped to {0, 1}, or all zeros.

    Mask rules (those of the gRefCOCO loader): union of the annotations;
    polygons with fewer than 6 or an odd number of coordinates dropped;
    RLE decoded as is; crowd annotations skipped when a ref names several
    annotations.  A ref whose only annotation is a crowd one keeps it (the
    release would drop it and leave a target sample with an empty mask);
    a multi-target ref made only of crowd annotations is kept with an empty
    mask and a warning naming it.

    ``sentence_sampling`` defaults to ``'all'`` (one item per sentence, in
    training too, as the GRES protocol); ``'random'`` and ``'first'`` work
    as in RefCocoDataset.

    Args:
        data_root (str): the folder holding ``grefcoco/`` and
            ``images/``. Default: ``'data'``.
        dataset (str): ``'grefcoco'``. Default: ``'grefcoco'``.
        split_by (str): ``'unc'``.
        split (str): ``'train'``, ``'val'``, ``'testA'`` or ``'testB'``.
        refs_file (str, optional): refs file relative to ``data_root``.
            Default: ``grefcoco/grefs(unc).json``, else
            ``grefcoco/grefs(unc).p``.
        data_prefix (dict): ``img_path`` relative to ``data_root``.
            Default: ``'images/train2014'``.
        Other arguments: as :class:`RefCocoDataset`.

    Raises:
        ValueError: an unknown split (listing the valid ones); a ref whose
            annotation id is not in ``instances.json`` (naming the ref id
            and the ann id) or belongs to another image; a malformed
            ``ann_id``.
        FileNotFoundError: a missing grefs or instances file, saying what
            to put where.
        mmseg_sera.datasets.UnsafePickleError: a pickle that references
            anything but plain data (nothing is executed).
    """

    SPLITS = GREFCOCO_SPLITS
    REFS_STEM = 'grefs'
    REFS_EXTS = ('.json', '.p')

    def __init__(self,
                 *,
                 data_root: str = 'data',
                 dataset: str = 'grefcoco',
                 split_by: str = 'unc',
                 split: str = 'train',
                 data_prefix: Optional[dict] = None,
                 **kwargs) -> None:
        if data_prefix is None:
            data_prefix = dict(img_path='images/train2014')
        super().__init__(data_root=data_root, dataset=dataset,
                         split_by=split_by, split=split,
                         data_prefix=data_prefix, **kwargs)

    @staticmethod
    def _default_sampling(test_mode: bool) -> str:
        return 'all'

    def _missing_hint(self) -> str:
        folder = f'{self.data_root or "."}/{self.dataset_name}'
        return (f'. Put grefs({self.split_by}).json and instances.json of '
                f'the gRefCOCO release ({_RELEASE}) in {folder}/ and the '
                'COCO train2014 images in '
                f'{self.data_prefix.get("img_path") or "images/train2014"}')

    def load_data_list(self) -> List[dict]:
        self._crowd_only: List[Any] = []
        data_list = super().load_data_list()
        if self._crowd_only:
            warnings.warn(
                f'{self.dataset_name} {self.split}: ref(s) '
                f'{self._crowd_only[:20]} name only crowd annotations, which '
                'multi-target refs skip: their masks are empty')
        return data_list

    def _ref_target(self, ref: dict, anns: Dict[Any, dict],
                    refs_path: str) -> dict:
        ref_id = ref.get('ref_id')
        ann_ids = normalise_ann_ids(ref.get('ann_id'), ref_id)
        if ann_ids == [NO_TARGET_ANN_ID]:
            return dict(ann_id=ann_ids, category_id=ref.get('category_id'),
                        segmentations=[], iscrowd=0, no_target=True)
        picked = []
        for ann_id in ann_ids:
            ann = self._ref_annotation(ref, ann_id, anns, refs_path)
            if len(ann_ids) > 1 and ann.get('iscrowd', 0):
                continue
            picked.append(ann)
        if not picked:
            self._crowd_only.append(ref_id)
        category_id = ref.get('category_id')
        if category_id is None and len(picked) == 1:
            category_id = picked[0].get('category_id')
        return dict(
            ann_id=ann_ids, category_id=category_id,
            segmentations=[a['segmentation'] for a in picked],
            iscrowd=int(len(picked) == 1 and bool(picked[0].get('iscrowd'))),
            no_target=False)

    def get_data_info(self, idx: int) -> dict:
        """The item with ``segmentation``: the compressed RLE of the
        ref's target mask (:func:`merge_target_masks`)."""
        info = super().get_data_info(idx)
        try:
            mask = merge_target_masks(info['segmentations'], info['height'],
                                      info['width'])
        except ValueError as e:
            raise ValueError(
                f'ref {info.get("ref_id")} (ann_id {info.get("ann_id")}, '
                f'image {info.get("img_path")}): {e}') from e
        info['segmentation'] = _compressed_rle(mask)
        return info
