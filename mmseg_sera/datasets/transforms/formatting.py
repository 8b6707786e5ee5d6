"""Packing a referring-segmentation sample into mmseg's SegDataSample."""
from typing import Dict, Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.structures import PixelData

from mmseg.registry import TRANSFORMS
from mmseg.structures import SegDataSample
from .augment import SOFT_MASK_KEY

__all__ = ['PackReferSegInputs']

REFER_META_KEYS = (
    'img_path', 'ori_shape', 'img_shape', 'pad_shape', 'padding_size',
    'scale_factor', 'resized_shape', 'flip', 'flip_direction',
    'text', 'ref_id', 'sent_id', 'ann_id', 'image_id', 'category_id', 'kind',
    'split', 'no_target')


@TRANSFORMS.register_module()
class PackReferSegInputs(BaseTransform):
    """Pack the image, the mask and the sentence.

    Returns ``dict(inputs=Tensor, data_samples=SegDataSample)``:

    - ``inputs``: uint8 tensor 3 x H x W (channel order of the loaded
      image; mmseg's ``SegDataPreProcessor(bgr_to_rgb=True)`` converts).
    - ``data_samples.gt_sem_seg``: ``PixelData`` with ``data`` int64
      1 x H x W, values 0/1 (and 255 where ignored), when ``gt_seg_map`` is
      present.  Its size is whatever the pipeline left: the input size in
      training, the original size in testing.
    - ``data_samples.gt_soft_mask``: ``PixelData`` with ``data`` float32
      1 x H x W in [0, 1], when the pipeline made a soft target
      (``ReferResizePad(mask_interp='bilinear')``); the heads then train on
      it, while ``gt_sem_seg`` stays the binary mask of the metrics.
    - ``data_samples.metainfo``: the keys of ``meta_keys`` found in the
      results; ``text`` (the cleaned sentence) is required.  ``no_target``
      (bool, from :class:`GRefCocoDataset`) says that the sentence names
      nothing; ``ReferSegMetric`` reads it as the ground-truth flag.

    Args:
        meta_keys (Sequence[str]): metainfo keys to copy when present.
            Default: :data:`REFER_META_KEYS`.
    """

    def __init__(self, meta_keys: Sequence[str] = REFER_META_KEYS) -> None:
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: Dict) -> Dict:
        if 'text' not in results:
            raise KeyError(
                "PackReferSegInputs found no 'text' in the results: put "
                "SelectSentence before it in the pipeline (keys present: "
                f'{sorted(results)})')
        packed: Dict = {}
        if 'img' in results:
            img = results['img']
            if img.ndim < 3:
                img = img[..., None]
            img = np.ascontiguousarray(img.transpose(2, 0, 1))
            packed['inputs'] = torch.from_numpy(img)
        sample = SegDataSample()
        if 'gt_seg_map' in results:
            seg = results['gt_seg_map']
            if seg.ndim == 2:
                seg = seg[None]
            sample.gt_sem_seg = PixelData(
                data=torch.from_numpy(np.ascontiguousarray(seg, np.int64)))
        if SOFT_MASK_KEY in results:
            soft = results[SOFT_MASK_KEY]
            if soft.ndim == 2:
                soft = soft[None]
            sample.set_field(
                PixelData(data=torch.from_numpy(
                    np.ascontiguousarray(soft, np.float32))),
                SOFT_MASK_KEY)
        sample.set_metainfo(
            {k: results[k] for k in self.meta_keys if k in results})
        packed['data_samples'] = sample
        return packed

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(meta_keys={self.meta_keys})'
