"""Pictures of referring-segmentation results: the image with the mask as a
translucent overlay plus its contour, and the sentence in a white band above
the image (never over the object).

Pure drawing functions (numpy in, numpy out) serve the demo and the inference
API; :class:`ReferSegVisualizer` wraps them for MMEngine's visualisation
machinery (``SegVisualizationHook``, ``tools/test.py --show-dir``).

Generalized referring segmentation: when a model says that the sentence
names nothing (metainfo ``pred_no_target``, set by a head with a no-target
scorer), the band says so in words (:func:`no_target_caption`), since an
empty mask alone looks the same as a failure to find the object.
"""
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import mmcv
import numpy as np
import torch
from mmengine.dist import master_only

from mmseg.registry import VISUALIZERS
from mmseg.structures import SegDataSample
from mmseg.visualization import SegLocalVisualizer

__all__ = [
    'wrap_text', 'text_band', 'draw_mask_overlay', 'draw_refer_overlay',
    'draw_refer_panels', 'no_target_caption', 'ReferSegVisualizer'
]

Color = Tuple[int, int, int]
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_PAD = 4  # pixels around the text in the band


def _font(width: int,
          font_scale: Optional[float] = None) -> Tuple[float, int]:
    """Font scale and stroke for a picture ``width`` pixels wide: about 13
    characters per line at 112 px, 60 at 640 px and wider."""
    scale = font_scale if font_scale is not None else float(
        np.clip(width / 640.0, 0.35, 1.0))
    return scale, 1 if scale < 0.8 else 2


def _line_height(scale: float, thickness: int) -> int:
    (_, h), baseline = cv2.getTextSize('Ag', _FONT, scale, thickness)
    return h + baseline + max(2, int(round(4 * scale)))


def wrap_text(text: str, max_width: int, font_scale: float,
              thickness: int = 1) -> List[str]:
    """Greedy word wrap so every line is at most ``max_width`` pixels wide
    in OpenCV's Hershey simplex font; a word longer than a line is cut.

    Characters outside ASCII are drawn as ``?`` by OpenCV.
    """
    def width_of(s: str) -> int:
        return cv2.getTextSize(s, _FONT, font_scale, thickness)[0][0]

    lines: List[str] = []
    current = ''
    for word in str(text).split():
        while width_of(word) > max_width and len(word) > 1:
            # cut an over-long word at the widest prefix that fits
            cut = max(1, max(i for i in range(1, len(word) + 1)
                             if width_of(word[:i]) <= max_width or i == 1))
            if current:
                lines.append(current)
                current = ''
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f'{current} {word}' if current else word
        if width_of(candidate) <= max_width:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def _band_lines(width: int, text: Union[str, Sequence[str], None],
                font_scale: Optional[float]) -> Tuple[List[str], float, int]:
    scale, thickness = _font(width, font_scale)
    paragraphs = [text] if isinstance(text, str) else list(text or [])
    lines: List[str] = []
    for para in paragraphs:
        lines.extend(wrap_text(para, max(1, width - 2 * _PAD), scale,
                               thickness))
    return lines, scale, thickness


def text_band(width: int,
              text: Union[str, Sequence[str], None],
              min_lines: int = 0,
              font_scale: Optional[float] = None) -> np.ndarray:
    """A white band ``width`` pixels wide holding ``text`` in black.

    Args:
        width: band width in pixels.
        text: a sentence, or several paragraphs (each starts a new line).
        min_lines: height of at least this many lines (to align panels).
        font_scale: OpenCV font scale; default from ``width``.

    Returns:
        ``h x width x 3`` uint8 RGB with
        ``h = 2 * 4 + n_lines * line_height`` (0 rows when there is no text
        and ``min_lines`` is 0).
    """
    lines, scale, thickness = _band_lines(width, text, font_scale)
    n_lines = max(len(lines), min_lines)
    if n_lines == 0:
        return np.full((0, width, 3), 255, dtype=np.uint8)
    line_h = _line_height(scale, thickness)
    band = np.full((2 * _PAD + n_lines * line_h, width, 3), 255,
                   dtype=np.uint8)
    (_, text_h), _ = cv2.getTextSize('Ag', _FONT, scale, thickness)
    for i, line in enumerate(lines):
        baseline_y = _PAD + i * line_h + text_h
        cv2.putText(band, line, (_PAD, baseline_y), _FONT, scale, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    return band


def no_target_caption(metainfo: dict) -> Optional[str]:
    """``'no target'`` (with ``' (score 0.93)'`` when metainfo has
    ``no_target_score``) when metainfo ``pred_no_target`` is true, else
    None."""
    if not metainfo.get('pred_no_target', False):
        return None
    score = metainfo.get('no_target_score')
    return 'no target' if score is None else \
        f'no target (score {float(score):.2f})'


def _as_mask(mask, shape: Tuple[int, int]) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != tuple(shape):
        raise ValueError(f'mask of shape {mask.shape} does not match the '
                         f'image ({shape[0]} x {shape[1]})')
    return mask.astype(bool)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError('image must be an H x W x 3 uint8 RGB array, got '
                         f'shape {image.shape} dtype {image.dtype}')
    return image


def draw_mask_overlay(image_rgb: np.ndarray,
                      mask,
                      color: Color = (255, 64, 64),
                      alpha: float = 0.5,
                      contour_width: Optional[int] = None) -> np.ndarray:
    """Tint the masked pixels and outline the mask.

    Inside the mask (``mask`` truthy), per channel::

        out = floor((1 - alpha) * image + alpha * color + 0.5)

    so the image stays visible under the colour; the mask's inner boundary
    (mask pixels within ``contour_width`` of a non-mask pixel) is painted
    ``color`` opaquely.  Pixels outside the mask are left unchanged.

    Args:
        image_rgb: H x W x 3 uint8.
        mask: H x W (or 1 x H x W) array or tensor; truthy = object.
        color: RGB overlay colour.
        alpha: colour weight in [0, 1].
        contour_width: outline width in pixels; default
            ``max(1, min(H, W) // 150)``; 0 for no outline.

    Returns:
        H x W x 3 uint8, a new array.
    """
    image = _check_image(image_rgb)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}')
    mask = _as_mask(mask, image.shape[:2])
    colour = np.asarray(color, dtype=np.float64).reshape(3)
    out = image.copy()
    if not mask.any():
        return out
    tinted = (1.0 - alpha) * image[mask].astype(np.float64) + alpha * colour
    out[mask] = np.floor(tinted + 0.5).clip(0, 255).astype(np.uint8)
    if contour_width is None:
        contour_width = max(1, min(image.shape[:2]) // 150)
    if contour_width > 0:
        kernel = np.ones((2 * contour_width + 1, ) * 2, dtype=np.uint8)
        inner = cv2.erode(mask.astype(np.uint8), kernel,
                          borderType=cv2.BORDER_REPLICATE).astype(bool)
        out[mask & ~inner] = np.asarray(color, dtype=np.uint8)
    return out


def draw_refer_overlay(image_rgb: np.ndarray,
                       mask,
                       text: Union[str, Sequence[str], None],
                       color: Color = (255, 64, 64),
                       alpha: float = 0.5,
                       min_text_lines: int = 0,
                       font_scale: Optional[float] = None) -> np.ndarray:
    """The picture of one referring result: ``text`` in a white band on top
    of :func:`draw_mask_overlay` of the image (the text never covers it).

    Returns:
        (band + H) x W x 3 uint8 RGB; the last H rows are the overlay, the
        first rows the band of :func:`text_band` (none without text).
    """
    overlay = draw_mask_overlay(image_rgb, mask, color=color, alpha=alpha)
    band = text_band(overlay.shape[1], text, min_lines=min_text_lines,
                     font_scale=font_scale)
    return np.concatenate([band, overlay], axis=0)


def draw_refer_panels(image_rgb: np.ndarray,
                      masks: Sequence,
                      texts: Sequence[Union[str, Sequence[str]]],
                      color: Color = (255, 64, 64),
                      alpha: float = 0.5) -> np.ndarray:
    """Several sentences on one image: one :func:`draw_refer_overlay` panel
    per (mask, text), side by side, their bands padded to the same height.
    A text may be several paragraphs (a list: the sentence, then e.g.
    ``'no target'``), each starting a new line.

    Returns:
        (band + H) x (n * W) x 3 uint8 RGB.
    """
    if len(masks) != len(texts) or not masks:
        raise ValueError(f'need as many masks as texts (>= 1), got '
                         f'{len(masks)} masks and {len(texts)} texts')
    image = _check_image(image_rgb)
    width = image.shape[1]
    n_lines = max(len(_band_lines(width, t, None)[0]) for t in texts)
    panels = [
        draw_refer_overlay(image, m, t, color=color, alpha=alpha,
                           min_text_lines=n_lines)
        for m, t in zip(masks, texts)
    ]
    return np.concatenate(panels, axis=1)


@VISUALIZERS.register_module()
class ReferSegVisualizer(SegLocalVisualizer):
    """Visualizer of referring segmentation (one mask per sentence).

    :meth:`add_datasample` draws the prediction (``pred_sem_seg`` > 0) in
    ``pred_color`` and, when the sample has ``gt_sem_seg`` (value 1 = the
    object), the ground truth in ``gt_color`` on a second panel on the
    LEFT (mmseg's order: ground truth left, prediction right); the sentence
    (``metainfo['text']``) is written in a white band above the panels,
    followed by ``prediction: no target (score p)`` when the model says
    the sentence names nothing (metainfo ``pred_no_target``) and
    ``ground truth: no target`` for a sample flagged ``no_target``
    (gRefCOCO).

    Saved names are unique per sentence: MMSeg's ``SegVisualizationHook``
    names every picture after the image file, so the sentences of one image
    would overwrite each other; this visualizer appends
    ``_ref{ref_id}_sent{sent_id}`` (those present in the metainfo) to
    ``name``.  ``LocalVisBackend`` then writes
    ``{save_dir}/vis_image/{name}_ref{ref_id}_sent{sent_id}_{step}.png``.

    Args:
        name: instance name (MMEngine's ``ManagerMixin``).
        image: optional initial RGB image.
        vis_backends: backend configs, e.g. ``[dict(type='LocalVisBackend')]``.
        save_dir: folder of the backends' files.
        classes, palette: dataset meta (default ``('background', 'object')``,
            black/white); the runner replaces them with the dataset's.
        alpha: colour weight of the overlay, in [0, 1]. Default 0.5.
        pred_color, gt_color: RGB overlay colours.
        min_size: panels whose shorter side is below this are enlarged by
            the smallest integer factor that reaches it (nearest neighbour,
            so every pixel stays a sharp block); 0 draws at the image's own
            size. The synthetic demo set (112 px) uses 336.
    """

    def __init__(self,
                 name: str = 'visualizer',
                 image: Optional[np.ndarray] = None,
                 vis_backends: Optional[List[dict]] = None,
                 save_dir: Optional[str] = None,
                 classes: Optional[Sequence[str]] = None,
                 palette: Optional[Sequence] = None,
                 dataset_name: Optional[str] = None,
                 alpha: float = 0.5,
                 pred_color: Color = (255, 64, 64),
                 gt_color: Color = (64, 200, 64),
                 min_size: int = 0,
                 **kwargs) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'alpha must be in [0, 1], got {alpha}')
        if min_size < 0:
            raise ValueError(f'min_size must be >= 0, got {min_size}')
        self.min_size = int(min_size)
        super().__init__(name=name, image=image, vis_backends=vis_backends,
                         save_dir=save_dir, dataset_name=dataset_name,
                         alpha=alpha, **kwargs)
        # set here (SegLocalVisualizer.__init__ passes classes and palette
        # to set_dataset_meta in swapped order)
        self.set_dataset_meta(
            classes=list(classes or ('background', 'object')),
            palette=list(palette or [[0, 0, 0], [255, 255, 255]]))
        self.pred_color = tuple(int(c) for c in pred_color)
        self.gt_color = tuple(int(c) for c in gt_color)

    @staticmethod
    def sample_name(name: str, data_sample: Optional[SegDataSample]) -> str:
        """``name`` plus ``_ref{ref_id}_sent{sent_id}`` (those present)."""
        if data_sample is None:
            return name
        meta = data_sample.metainfo
        for key, tag in (('ref_id', 'ref'), ('sent_id', 'sent')):
            if meta.get(key) is not None:
                name = f'{name}_{tag}{meta[key]}'
        return name

    def draw_sample(self,
                    image: np.ndarray,
                    data_sample: Optional[SegDataSample],
                    draw_gt: bool = True,
                    draw_pred: bool = True) -> np.ndarray:
        """The picture :meth:`add_datasample` saves, without saving it.

        Returns:
            (band + s H) x (n s W) x 3 uint8 RGB, n = number of panels (1
            or 2; 1 showing the bare image when nothing is drawn), s the
            enlargement factor of ``min_size`` (1 by default).
        """
        image = _check_image(image)
        shape = image.shape[:2]
        panels, labels = [], []
        notes: List[str] = []
        if data_sample is not None and draw_gt and 'gt_sem_seg' in data_sample:
            if data_sample.metainfo.get('no_target', False):
                notes.append('ground truth: no target')
            gt = data_sample.gt_sem_seg.data
            panels.append(draw_mask_overlay(
                image, _as_mask(gt == 1, shape), color=self.gt_color,
                alpha=self.alpha))
            labels.append('ground truth')
        if data_sample is not None and draw_pred and \
                'pred_sem_seg' in data_sample:
            caption = no_target_caption(data_sample.metainfo)
            if caption is not None:
                notes.append(f'prediction: {caption}')
            pred = data_sample.pred_sem_seg.data
            panels.append(draw_mask_overlay(
                image, _as_mask(pred > 0, shape), color=self.pred_color,
                alpha=self.alpha))
            labels.append('prediction')
        if not panels:
            panels = [image.copy()]
        text: List[str] = []
        if data_sample is not None and data_sample.metainfo.get('text'):
            text.append(str(data_sample.metainfo['text']))
        text.extend(notes)
        if len(labels) == 2:
            text.append('left: ground truth, right: prediction')
        row = np.concatenate(panels, axis=1)
        k = -(-self.min_size // min(shape)) if self.min_size else 1
        if k > 1:
            row = row.repeat(k, axis=0).repeat(k, axis=1)
        scale, _ = _font(k * image.shape[1])  # font sized by ONE panel
        band = text_band(row.shape[1], text, font_scale=scale)
        return np.concatenate([band, row], axis=0)

    @master_only
    def add_datasample(self,
                       name: str,
                       image: np.ndarray,
                       data_sample: Optional[SegDataSample] = None,
                       draw_gt: bool = True,
                       draw_pred: bool = True,
                       show: bool = False,
                       wait_time: float = 0,
                       out_file: Optional[str] = None,
                       step: int = 0,
                       with_labels: Optional[bool] = True) -> None:
        """Draw a sample (see :meth:`draw_sample`) and save it.

        With ``out_file`` the picture goes to that file only; otherwise to
        every backend under :meth:`sample_name` ``(name, data_sample)``;
        ``show`` also opens a window.  ``with_labels`` is accepted for
        ``SegLocalVisualizer`` compatibility and ignored (one class).

        Args:
            name: picture identifier (the hook's ``'{mode}_{basename}'``).
            image: H x W x 3 uint8 RGB image at the original size.
            data_sample: sample with ``pred_sem_seg`` and/or ``gt_sem_seg``
                (1 x H x W) and metainfo ``text``.
        """
        drawn = self.draw_sample(image, data_sample, draw_gt=draw_gt,
                                 draw_pred=draw_pred)
        self.set_image(drawn)
        unique = self.sample_name(name, data_sample)
        if show:
            self.show(drawn, win_name=unique, wait_time=wait_time)
        if out_file is not None:
            mmcv.imwrite(mmcv.rgb2bgr(drawn), out_file)
        else:
            self.add_image(unique, drawn, step)
