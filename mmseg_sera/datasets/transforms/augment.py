"""Geometric transforms for referring segmentation: the letterbox
resize-and-pad of RIS methods and a text-aware horizontal flip.

Photometric augmentation is mmseg's own ``PhotoMetricDistortion`` (config
level); keep ``hue_delta=0`` there, since colour words decide referents.
"""
from typing import Dict, Sequence, Tuple, Union

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform

from mmseg.registry import TRANSFORMS
from .text_transforms import swap_left_right

__all__ = ['ReferResizePad', 'RandomReferFlip', 'SOFT_MASK_KEY']

#: results / data-sample key of the soft (float) target
SOFT_MASK_KEY = 'gt_soft_mask'
MASK_INTERP = ('nearest', 'bilinear')


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f'size must be an int or (h, w), got {size!r}')
    return int(size[0]), int(size[1])


@TRANSFORMS.register_module()
class ReferResizePad(BaseTransform):
    """Letterbox: resize keeping the aspect ratio so the image fits in
    ``size`` and pad the rest (the input transform of CRIS/ETRIS/DETRIS).

    For an H x W image and ``size = (S_h, S_w)``::

        s  = min(S_h / H, S_w / W)
        h' = round(H * s), w' = round(W * s)          (resized, unpadded)
        pad: top = (S_h - h') // 2, left = (S_w - w') // 2 when centred,
             else 0; bottom / right take the rest.

    The image is resized with ``interpolation`` (bicubic as the peers) and
    padded with ``pad_val``; every map in ``seg_fields`` is resized with
    nearest neighbours and padded with ``seg_pad_val`` (0 = background: the
    padding is known not to be the object; use 255 to ignore it instead).

    Soft targets (``mask_interp='bilinear'``, the CRIS/ETRIS/DETRIS
    recipe: the mask is warped bilinearly and divided by 255, so the
    target is fractional along the object's edges). ``gt_seg_map`` stays
    binary (nearest, as above: ``acc_seg``, the ignore label and the
    metrics use it) and a float32 map is added::

        gt_soft_mask = pad(bilinear_resize(float(gt_seg_map == 1)), 0)

    H x W in [0, 1], resized bilinearly to the image's (h', w')
    (``mmcv.imresize``, half-pixel centres, no antialiasing) and padded
    with 0 like the image. It joins ``seg_fields`` (a later flip mirrors
    it) and :class:`PackReferSegInputs` packs it as ``gt_soft_mask``; the
    heads train on it when present (``BaseReferHead.loss_by_feat``).

    Metainfo written (mmseg conventions, so ``BaseSegmentor.
    postprocess_result`` maps predictions back to the original size by
    cropping ``padding_size`` and resizing to ``ori_shape``):

    - ``img_shape`` = ``pad_shape`` = (S_h, S_w)  (the network input)
    - ``padding_size`` = [left, right, top, bottom]
    - ``scale_factor`` = (w' / W, h' / H); ``keep_ratio`` = True
    - ``resized_shape`` = (h', w')

    Args:
        size (int | tuple[int, int]): output (S_h, S_w). Default: 448.
        interpolation (str): image interpolation for ``mmcv.imresize``.
            Default: ``'bicubic'``.
        pad_val (float | tuple): image padding value (per channel, in the
            channel order of the loaded image, BGR for mmcv). Default: 0.
        seg_pad_val (int): padding of the masks. Default: 0.
        center (bool): centre the image (the peers) or put it top-left.
            Default: True.
        mask_interp (str): ``'nearest'`` (binary targets only) or
            ``'bilinear'`` (also write the soft target ``gt_soft_mask``).
            Default: ``'nearest'``.
    """

    def __init__(self,
                 size: Union[int, Sequence[int]] = 448,
                 interpolation: str = 'bicubic',
                 pad_val: Union[float, Sequence[float]] = 0,
                 seg_pad_val: int = 0,
                 center: bool = True,
                 mask_interp: str = 'nearest') -> None:
        self.size = _pair(size)
        if min(self.size) <= 0:
            raise ValueError(f'size must be positive, got {self.size}')
        if mask_interp not in MASK_INTERP:
            raise ValueError(f'mask_interp must be one of {MASK_INTERP}, '
                             f'got {mask_interp!r}')
        self.mask_interp = mask_interp
        self.interpolation = interpolation
        self.pad_val = tuple(pad_val) if isinstance(
            pad_val, (list, tuple)) else pad_val
        self.seg_pad_val = seg_pad_val
        self.center = center

    def _geometry(self, h: int, w: int) -> Tuple[int, int, int, int, int, int]:
        out_h, out_w = self.size
        scale = min(out_h / h, out_w / w)
        new_h = min(out_h, max(1, int(round(h * scale))))
        new_w = min(out_w, max(1, int(round(w * scale))))
        top = (out_h - new_h) // 2 if self.center else 0
        left = (out_w - new_w) // 2 if self.center else 0
        bottom, right = out_h - new_h - top, out_w - new_w - left
        return new_h, new_w, top, bottom, left, right

    def transform(self, results: Dict) -> Dict:
        img = results['img']
        h, w = img.shape[:2]
        new_h, new_w, top, bottom, left, right = self._geometry(h, w)
        padding = (left, top, right, bottom)  # mmcv.impad order
        img = mmcv.imresize(img, (new_w, new_h),
                            interpolation=self.interpolation)
        results['img'] = mmcv.impad(img, padding=padding,
                                    pad_val=self.pad_val)
        soft = None
        if self.mask_interp == 'bilinear' and 'gt_seg_map' in results:
            # from the binary map before it is resized (255 = ignore: 0)
            binary = (results['gt_seg_map'] == 1).astype(np.float32)
            soft = mmcv.impad(
                mmcv.imresize(binary, (new_w, new_h),
                              interpolation='bilinear'),
                padding=padding, pad_val=0.)
        for key in results.get('seg_fields', []):
            if key == SOFT_MASK_KEY and soft is not None:
                continue  # rebuilt from gt_seg_map above
            seg = mmcv.imresize(results[key], (new_w, new_h),
                                interpolation='nearest')
            results[key] = mmcv.impad(
                seg, padding=padding,
                pad_val=0. if key == SOFT_MASK_KEY else self.seg_pad_val)
        if soft is not None:
            results[SOFT_MASK_KEY] = np.clip(soft, 0., 1.)
            seg_fields = results.setdefault('seg_fields', [])
            if SOFT_MASK_KEY not in seg_fields:
                seg_fields.append(SOFT_MASK_KEY)
        results['img_shape'] = self.size
        results['pad_shape'] = self.size
        results['resized_shape'] = (new_h, new_w)
        results['padding_size'] = [left, right, top, bottom]
        results['scale_factor'] = (new_w / w, new_h / h)
        results['keep_ratio'] = True
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(size={self.size}, '
                f'interpolation={self.interpolation!r}, '
                f'pad_val={self.pad_val}, seg_pad_val={self.seg_pad_val}, '
                f'center={self.center}, mask_interp={self.mask_interp!r})')


@TRANSFORMS.register_module()
class RandomReferFlip(BaseTransform):
    """Horizontal flip that keeps the sentence true: with probability
    ``prob`` the image and every map in ``seg_fields`` are mirrored and the
    words left/right (leftmost/rightmost) are swapped in ``text`` and in
    every entry of ``sentences``.

    Off by default (``prob=0``): the peers do not flip, and a sentence such
    as "the second from the left" is only partly fixed by swapping words.

    Added keys: ``flip`` (bool), ``flip_direction`` (``'horizontal'`` or
    None).
    """

    def __init__(self, prob: float = 0.0) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f'prob must be in [0, 1], got {prob}')
        self.prob = prob

    def transform(self, results: Dict) -> Dict:
        flip = self.prob > 0 and np.random.rand() < self.prob
        results['flip'] = bool(flip)
        results['flip_direction'] = 'horizontal' if flip else None
        if not flip:
            return results
        results['img'] = mmcv.imflip(results['img'], direction='horizontal')
        for key in results.get('seg_fields', []):
            results[key] = mmcv.imflip(results[key], direction='horizontal')
        if 'text' in results:
            results['text'] = swap_left_right(results['text'])
        if 'sentences' in results:
            results['sentences'] = [
                swap_left_right(s) for s in results['sentences']]
        if 'padding_size' in results:  # mirror the letterbox padding too
            left, right, top, bottom = results['padding_size']
            results['padding_size'] = [right, left, top, bottom]
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(prob={self.prob})'
