"""Loading of the image and of the referred object's mask."""
from typing import Dict, List, Optional, Union

import mmcv
import mmengine.fileio as fileio
import numpy as np
import pycocotools.mask as mask_utils
from mmcv.transforms import BaseTransform, LoadImageFromFile

from mmseg.registry import TRANSFORMS

__all__ = ['LoadReferImageFromFile', 'LoadReferringMask', 'decode_refer_mask']


def _ids(results: Dict) -> str:
    keys = ('ref_id', 'ann_id', 'image_id')
    return ', '.join(f'{k}={results[k]}' for k in keys if k in results)


@TRANSFORMS.register_module()
class LoadReferImageFromFile(LoadImageFromFile):
    """:class:`mmcv.transforms.LoadImageFromFile` with clear errors.

    A missing file raises :class:`FileNotFoundError` and an undecodable one
    (corrupt or not an image) :class:`ValueError`; both name the file and the
    ref/ann/image ids of the item.  Arguments are those of
    ``LoadImageFromFile`` (``to_float32``, ``color_type``,
    ``imdecode_backend``, ``backend_args``, ``ignore_empty``).

    Required keys: ``img_path``.  Added keys: ``img`` (H x W x 3 uint8, BGR
    by default), ``img_shape``, ``ori_shape``.
    """

    def transform(self, results: Dict) -> Optional[Dict]:
        filename = results['img_path']
        try:
            img_bytes = fileio.get(filename, backend_args=self.backend_args)
        except FileNotFoundError as e:
            if self.ignore_empty:
                return None
            raise FileNotFoundError(
                f'image file not found: {filename} ({_ids(results)})') from e
        try:
            img = mmcv.imfrombytes(
                img_bytes, flag=self.color_type,
                backend=self.imdecode_backend)
        except Exception as e:  # cv2/PIL errors differ by backend
            img = None
            cause: Optional[Exception] = e
        else:
            cause = None
        if img is None or img.size == 0:
            if self.ignore_empty:
                return None
            raise ValueError(
                f'cannot decode image file {filename} ({_ids(results)}): '
                'the file is corrupt or not an image') from cause
        if self.to_float32:
            img = img.astype(np.float32)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results


def decode_refer_mask(segmentation: Union[List, Dict], height: int,
                      width: int) -> np.ndarray:
    """Decode a COCO segmentation into an H x W uint8 {0, 1} mask.

    Accepts the three COCO forms: a list of polygons ``[[x0, y0, x1, y1,
    ...], ...]`` (rasterised with ``frPyObjects`` and merged), an
    uncompressed RLE ``{'size': [h, w], 'counts': [int, ...]}`` (crowd
    annotations) and a compressed RLE ``{'size': [h, w], 'counts': str}``.

    Raises:
        ValueError: unknown format, or an RLE whose size is not (h, w).
    """
    height, width = int(height), int(width)
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rles = mask_utils.frPyObjects(polys, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and 'counts' in segmentation:
        size = [int(s) for s in segmentation.get('size', (height, width))]
        if size != [height, width]:
            raise ValueError(
                f'RLE size {size} differs from the image size '
                f'{[height, width]}')
        if isinstance(segmentation['counts'], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(size=size, counts=segmentation['counts'])
    else:
        raise ValueError(
            'segmentation must be a list of polygons or an RLE dict with '
            f"'counts', got {type(segmentation).__name__}")
    mask = mask_utils.decode(rle)
    if mask.ndim == 3:  # defensive: decode of a list returns H x W x N
        mask = mask.max(axis=2)
    return np.ascontiguousarray(mask, dtype=np.uint8)


@TRANSFORMS.register_module()
class LoadReferringMask(BaseTransform):
    """Decode the referred object's mask with pycocotools, at the original
    image size.

    Put it *before* any resize in the training pipeline (the mask is then
    resized with the image) and *after* the resize in the test pipeline, so
    the ground truth stays at the original size for :class:`ReferSegMetric`.

    Required keys: ``segmentation`` (polygons or RLE), ``height``,
    ``width`` (from ``instances.json``).
    Added keys: ``gt_seg_map`` (H x W uint8, 1 = referred object, 0 =
    background), ``seg_fields`` (``'gt_seg_map'`` appended).

    Raises:
        ValueError: the decoded mask and the loaded image (``ori_shape``)
            disagree in size, naming the image file and the ann id.
    """

    def transform(self, results: Dict) -> Dict:
        try:
            mask = decode_refer_mask(results['segmentation'],
                                     results['height'], results['width'])
        except KeyError as e:
            raise KeyError(
                f'LoadReferringMask needs {e} in the results ({_ids(results)})'
            ) from e
        except ValueError as e:
            raise ValueError(f'{e} ({_ids(results)})') from e
        ori_shape = results.get('ori_shape')
        if ori_shape is not None and tuple(ori_shape[:2]) != mask.shape:
            raise ValueError(
                f'image {results.get("img_path")} has size '
                f'{tuple(ori_shape[:2])} but instances.json says '
                f'{mask.shape} ({_ids(results)})')
        results['gt_seg_map'] = mask
        seg_fields = results.setdefault('seg_fields', [])
        if 'gt_seg_map' not in seg_fields:
            seg_fields.append('gt_seg_map')
        return results
