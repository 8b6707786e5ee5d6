"""PhraseCut (VGPhraseCut v0, Wu et al., CVPR 2020) in the layout of its
public API (github.com/ChenyunWu/PhraseCutDataset, ``data/VGPhraseCut_v0/``).

Expected tree (``data_root``; a link to ``VGPhraseCut_v0`` works)::

    data_root/
      image_data_split.json      Visual Genome image list: image_id, width,
                                 height, url, split (the README calls it
                                 image_data_split3000.json; both are read)
      refer_train.json  refer_val.json  refer_test.json  refer_miniv.json
      images/<image_id>.jpg      Visual Genome v1.2 images (parts 1 and 2)

Each ``refer_<split>.json`` is a list of *tasks*, one phrase-region pair
each: ``task_id`` (``'<image_id>__<ann_id>_<ann_id>...'``), ``image_id``,
``ann_ids`` (Visual Genome objects), ``phrase``, ``phrase_structure``
(``name``, ``attributes``, ``relation_descriptions``, ``type``),
``instance_boxes`` ([x, y, w, h] per instance) and ``Polygons``: per
instance a list of polygon parts, each a list of [x, y] points.
``refer_input_<split>.json`` (the inputs without ground truth) cannot be
trained or evaluated on and is not offered as a split.
"""
import json
import os
import os.path as osp
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_utils
from mmengine.dataset import BaseDataset
from PIL import Image, ImageDraw

from mmseg.registry import DATASETS, TRANSFORMS
from .refcoco import _gc_paused
from .transforms.text_transforms import clean_sentence

__all__ = [
    'PhraseCutDataset', 'PHRASECUT_SPLITS', 'phrasecut_splits',
    'phrasecut_polygons_to_mask'
]

#: the splits of the public release (``refer_<split>.json``)
PHRASECUT_SPLITS = ('train', 'val', 'test', 'miniv')
#: names of the image list, in the order they are looked for
IMAGE_INFO_FILES = ('image_data_split.json', 'image_data_split3000.json')
_REFER_PREFIX, _REFER_SUFFIX = 'refer_', '.json'
_MAX_IDS_IN_MESSAGE = 20
_REPO = 'github.com/ChenyunWu/PhraseCutDataset'


def phrasecut_splits(data_root: str) -> List[str]:
    """The valid splits under ``data_root``: the public ones
    (:data:`PHRASECUT_SPLITS`) and the name of any other
    ``refer_<name>.json`` there, except ``refer_input_*`` files."""
    splits = list(PHRASECUT_SPLITS)
    if data_root and osp.isdir(data_root):
        for fname in sorted(os.listdir(data_root)):
            if not (fname.startswith(_REFER_PREFIX)
                    and fname.endswith(_REFER_SUFFIX)):
                continue
            name = fname[len(_REFER_PREFIX):-len(_REFER_SUFFIX)]
            if name and not name.startswith('input_') and name not in splits:
                splits.append(name)
    return splits


def phrasecut_polygons_to_mask(polygons: Sequence[Sequence[Sequence]],
                               height: int, width: int) -> np.ndarray:
    """Rasterise a task's ``Polygons`` into one H x W uint8 {0, 1} mask.

    As ``polygons_to_mask`` of the PhraseCut API (``utils/data_transfer.py``,
    used by its evaluator on all parts of all instances of a task): each
    part's points are truncated to integers (``int(x)``, ``int(y)``) and
    drawn with PIL ``ImageDraw.polygon(fill=1, outline=1)``, so the boundary
    pixels belong to the mask; parts with fewer than 2 points are skipped.

    - Parts and instances combine by **union** (their masks are summed and
      thresholded at > 0): overlapping parts stay filled; a separate part
      never cuts a hole.
    - A hole exists only inside one part, as a self-overlapping ring (outer
      boundary, a bridge, the inner boundary): PIL fills a polygon by the
      even-odd rule, so the inside of the inner ring stays empty (its
      boundary pixels are drawn).

    Drawing all parts on one canvas gives the same union as the API's one
    canvas per part, with a single image allocation.  Pillow's polygon
    rasteriser has changed over the years (the API pinned pillow 6.1.0), so
    edge pixels can differ from masks drawn with an old Pillow; with
    Pillow >= 9 the outline adds no pixel to the fill.
    """
    height, width = int(height), int(width)
    canvas = Image.new('L', (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for instance in polygons:
        for part in instance:
            if len(part) < 2:
                continue
            draw.polygon([(int(p[0]), int(p[1])) for p in part],
                         fill=1, outline=1)
    return np.array(canvas, dtype=np.uint8)


def _rle(mask: np.ndarray) -> Dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return dict(size=[int(s) for s in rle['size']],
                counts=rle['counts'].decode('ascii'))


def _few(ids: Sequence[Any]) -> str:
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return (', '.join(str(i) for i in ids[:_MAX_IDS_IN_MESSAGE]) +
            (f' and {more} more' if more > 0 else ''))


@DATASETS.register_module()
class PhraseCutDataset(BaseDataset):
    """PhraseCut referring segmentation, one item per task (phrase).

    Items (``data_info`` dicts, as :class:`RefCocoDataset`'s, so the same
    pipelines and :class:`ReferSegMetric` work unchanged):

    - ``img_path``: ``<data_prefix.img_path>/<image_id>.jpg``.
    - ``segmentation``: the task's mask as a compressed RLE at the image
      size, made by :meth:`get_data_info` from the stored ``polygons`` with
      :func:`phrasecut_polygons_to_mask` (all instances and parts merged by
      union, holes by the even-odd rule within a part: see there), so
      ``LoadReferringMask`` decodes it; ``iscrowd`` = 0; ``height``,
      ``width`` from ``image_data_split.json``.
    - ``sentences`` = [the cleaned phrase] (lower case, single spaces),
      ``sent_ids`` = [``task_id``], ``sentence_kinds`` = [phrase type:
      ``'name'``, ``'attribute'``, ``'relation'`` or ``'verbose'``] when the
      task has ``phrase_structure.type`` (``SelectSentence`` then sets
      ``kind``; ``ReferSegMetric(group_by='kind')`` reports per type).
    - ``ref_id`` = ``task_id`` (the id of the official prediction files),
      ``ann_id`` = the task's ``ann_ids`` (a list: a phrase can refer to
      several Visual Genome objects), ``image_id``, ``category_id`` = None
      and ``category_name`` (``phrase_structure.name``), ``split``.
    - Also kept: ``task_id``, ``polygons`` (``Polygons`` as in the file),
      ``instance_boxes``.

    ``sentence_sampling`` is not needed: a task has one phrase, so training
    and testing both give one item per task.

    Evaluation: PhraseCut reports the mean and the cumulative (overall)
    mask IoU over tasks (``evaluate.py`` / ``utils/evaluator.py`` of the
    API: mean of I/U with 0 where I = 0, and sum I / sum U) and the share
    of tasks above IoU thresholds; :class:`ReferSegMetric` computes the
    same as ``mIoU``, ``oIoU`` and ``Pr@t`` (strict ``>``, as the API).

    Missing images: reported when loaded, by ``LoadReferImageFromFile``
    (``FileNotFoundError`` naming the file and the task id); set
    ``check_images=True`` to check every file when the index is built.

    Args:
        data_root (str): the ``VGPhraseCut_v0`` folder. Default:
            ``'data/phrasecut'``.
        split (str): ``'train'``, ``'val'``, ``'test'``, ``'miniv'`` or the
            name of any other ``refer_<name>.json`` in ``data_root``; or
            several joined by ``'_'`` (``'val_miniv'``: the whole validation
            set, as the API's loader reads it) when no file has that name.
        img_info_file (str, optional): the image list, relative to
            ``data_root``. Default: ``image_data_split.json``, else
            ``image_data_split3000.json``.
        data_prefix (dict): ``img_path``, the image folder relative to
            ``data_root``. Default: ``'images'``.
        check_images (bool): check at index time that every image file
            exists. Default: False.
        Other arguments are those of :class:`mmengine.dataset.BaseDataset`.

    Raises:
        ValueError: an unknown split (listing the valid ones); a task
            without ``Polygons`` or another needed key, or whose image is
            not in the image list (naming the file and the task).
        FileNotFoundError: a missing ``refer_<split>.json``, image list or
            image folder, saying what to put where.
    """

    METAINFO = dict(classes=('background', 'object'),
                    palette=[[0, 0, 0], [255, 255, 255]])

    def __init__(self,
                 *,
                 data_root: str = 'data/phrasecut',
                 split: str = 'train',
                 img_info_file: Optional[str] = None,
                 data_prefix: Optional[dict] = None,
                 check_images: bool = False,
                 pipeline: Sequence[Union[dict, Any]] = (),
                 test_mode: bool = False,
                 metainfo: Optional[dict] = None,
                 indices: Optional[Union[int, Sequence[int]]] = None,
                 serialize_data: bool = True,
                 lazy_init: bool = False,
                 max_refetch: int = 1000) -> None:
        self.split = split
        self.split_parts = self._resolve_split(data_root, split)
        self.check_images = check_images
        self.img_info_file = img_info_file
        if data_prefix is None:
            data_prefix = dict(img_path='images')
        super().__init__(
            ann_file=f'{_REFER_PREFIX}{self.split_parts[0]}{_REFER_SUFFIX}',
            metainfo=metainfo,
            data_root=data_root,
            data_prefix=data_prefix,
            indices=indices,
            serialize_data=serialize_data,
            # built from mmseg's registry, as RefCocoDataset does
            pipeline=[TRANSFORMS.build(t) if isinstance(t, dict) else t
                      for t in pipeline],
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch)
        self._metainfo.update(dataset='phrasecut', split=split)

    @staticmethod
    def _resolve_split(data_root: str, split: str) -> List[str]:
        valid = phrasecut_splits(data_root)
        if split in valid:
            return [split]
        parts = split.split('_') if isinstance(split, str) else []
        if len(parts) > 1 and all(p in valid for p in parts):
            return parts
        raise ValueError(
            f'unknown PhraseCut split {split!r}; valid splits: {valid} '
            "(or several joined by '_', e.g. 'val_miniv'; other splits are "
            f'the files refer_<name>.json in {data_root!r})')

    # ------------------------------------------------------------------ files
    def refer_files(self) -> List[str]:
        """Paths of the ``refer_<split>.json`` files read for ``split``."""
        root = self.data_root or ''
        return [osp.join(root, f'{_REFER_PREFIX}{p}{_REFER_SUFFIX}')
                for p in self.split_parts]

    def resolve_img_info_file(self) -> str:
        """Path of the image list (``img_info_file`` or the first of
        :data:`IMAGE_INFO_FILES` found under ``data_root``)."""
        root = self.data_root or ''
        if self.img_info_file is not None:
            path = self.img_info_file
            if root and not osp.isabs(path):
                path = osp.join(root, path)
            candidates = [path]
        else:
            candidates = [osp.join(root, f) for f in IMAGE_INFO_FILES]
        for path in candidates:
            if osp.isfile(path):
                return path
        raise FileNotFoundError(
            f'PhraseCut image list not found: {" nor ".join(candidates)}. '
            f'Put image_data_split.json in {root or "the data root"} (the '
            f'download_dataset.py of {_REPO} saves it in '
            'PhraseCutDataset/data/VGPhraseCut_v0/)')

    def load_data_list(self) -> List[dict]:
        """Index the tasks of ``split`` (no rasterisation: that happens per
        item in :meth:`get_data_info`)."""
        with _gc_paused():
            return self._load_data_list()

    def _load_data_list(self) -> List[dict]:
        root = self.data_root or '.'
        paths = self.refer_files()
        for path, part in zip(paths, self.split_parts):
            if not osp.isfile(path):
                raise FileNotFoundError(
                    f'PhraseCut annotation file not found: {path}. Put '
                    f'refer_{part}.json in {root} (`python '
                    f'download_dataset.py -s {part}` of {_REPO} saves it in '
                    'PhraseCutDataset/data/VGPhraseCut_v0/)')
        img_dir = self.data_prefix.get('img_path', '')
        if not osp.isdir(img_dir or '.'):
            raise FileNotFoundError(
                f'PhraseCut image folder not found: {img_dir}. Put the '
                'Visual Genome images there as <image_id>.jpg (the '
                'PhraseCut downloader writes them to data/VGPhraseCut_v0/'
                'images/; the VG_100K and VG_100K_2 folders of Visual Genome '
                'v1.2 hold them under the same names: link both into one '
                'folder) or set data_prefix=dict(img_path=...)')
        info_path = self.resolve_img_info_file()
        with open(info_path, 'r', encoding='utf-8') as f:
            img_infos = json.load(f)
        if not isinstance(img_infos, list):
            raise ValueError(f'{info_path}: expected a list of images, got '
                             f'{type(img_infos).__name__}')
        sizes = {img['image_id']: (img['height'], img['width'])
                 for img in img_infos}

        data_list: List[dict] = []
        empty: List[Any] = []
        img_paths: Dict[Any, str] = {}
        for path, part in zip(paths, self.split_parts):
            with open(path, 'r', encoding='utf-8') as f:
                tasks = json.load(f)
            if not isinstance(tasks, list):
                raise ValueError(f'{path}: expected a list of tasks, got '
                                 f'{type(tasks).__name__}')
            for task in tasks:
                info = self._parse_task(task, path, part, sizes, info_path,
                                        img_dir, img_paths)
                if info is None:
                    empty.append(task.get('task_id'))
                else:
                    data_list.append(info)

        if empty:
            warnings.warn(
                f'PhraseCut {self.split}: skipped {len(empty)} task(s) with '
                f'an empty phrase: task_id {_few(empty)}')
        if not data_list:
            warnings.warn(f'PhraseCut split {self.split!r} has no tasks in '
                          f'{", ".join(paths)}')
        if self.check_images:
            for img_path in img_paths.values():
                if not osp.isfile(img_path):
                    raise FileNotFoundError(
                        f'image file not found: {img_path}')
        return data_list

    def _parse_task(self, task: dict, path: str, part: str,
                    sizes: Dict[Any, tuple], info_path: str, img_dir: str,
                    img_paths: Dict[Any, str]) -> Optional[dict]:
        task_id = task.get('task_id')
        for key in ('task_id', 'image_id', 'phrase', 'Polygons'):
            if key not in task:
                hint = (' (refer_input_*.json files hold no ground truth: '
                        'use refer_<split>.json)' if key == 'Polygons' else '')
                raise ValueError(
                    f'task {task_id} in {path} has no {key!r}{hint}')
        text = clean_sentence(task['phrase'])
        if not text:
            return None
        image_id = task['image_id']
        size = sizes.get(image_id)
        if size is None:
            raise ValueError(
                f'task {task_id} in {path}: image_id {image_id} is not in '
                f'{info_path}')
        img_path = img_paths.get(image_id)
        if img_path is None:
            img_path = osp.join(img_dir, f'{image_id}.jpg')
            img_paths[image_id] = img_path
        structure = task.get('phrase_structure') or {}
        info = dict(
            img_path=img_path,
            image_id=image_id,
            task_id=task_id,
            ref_id=task_id,
            ann_id=list(task.get('ann_ids', ())),
            category_id=None,
            category_name=structure.get('name'),
            split=part,
            polygons=task['Polygons'],
            instance_boxes=task.get('instance_boxes', []),
            iscrowd=0,
            height=size[0],
            width=size[1],
            sentences=[text],
            sent_ids=[task_id])
        if structure.get('type'):
            info['sentence_kinds'] = [structure['type']]
        return info

    def get_data_info(self, idx: int) -> dict:
        """The item with its ``segmentation`` (compressed RLE of the merged
        mask, :func:`phrasecut_polygons_to_mask`)."""
        info = super().get_data_info(idx)
        try:
            mask = phrasecut_polygons_to_mask(
                info['polygons'], info['height'], info['width'])
        except (TypeError, IndexError, ValueError) as e:
            raise ValueError(
                f'task {info.get("task_id")}: cannot rasterise its Polygons '
                '(expected, per instance, a list of parts, each a list of '
                f'[x, y] points): {e}') from e
        info['segmentation'] = _rle(mask)
        return info
