"""RefCOCO / RefCOCO+ / G-Ref in the refer toolkit layout.

Expected tree (the layout of github.com/lichengunc/refer; ``data_root`` is
its ``data/`` folder)::

    data_root/
      refcoco/   instances.json  refs(unc).p  [refs(google).p]
      refcoco+/  instances.json  refs(unc).p
      refcocog/  instances.json  refs(umd).p  refs(google).p
      images/mscoco/images/train2014/COCO_train2014_000000581857.jpg ...

MMDetection's layout (``data/coco/{refcoco,refcoco+,refcocog}/`` next to
``data/coco/train2014/``) works with ``data_root='data/coco'`` and
``data_prefix=dict(img_path='train2014')``.

``refs(*).p`` may be replaced by its JSON export
(``tools/data/refs_pickle_to_json.py``): ``refs(unc).json`` is used when the
pickle is absent.  Pickles are read only through
:func:`mmseg_sera.datasets.safe_pickle.safe_load_pickle`.
"""
import contextlib
import gc
import json
import os.path as osp
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mmengine.dataset import BaseDataset

from mmseg.registry import DATASETS, TRANSFORMS
from .safe_pickle import safe_load_pickle
from .transforms.text_transforms import clean_sentence

__all__ = ['RefCocoDataset', 'VALID_SPLITS', 'load_refs']

#: dataset -> split_by -> splits of the public refs files.
VALID_SPLITS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    'refcoco': {'unc': ('train', 'val', 'testA', 'testB')},
    'refcoco+': {'unc': ('train', 'val', 'testA', 'testB')},
    'refcocog': {'umd': ('train', 'val', 'test'),
                 'google': ('train', 'val')},
}

SENTENCE_SAMPLING = ('random', 'first', 'all')
_MAX_IDS_IN_WARNING = 20


def load_refs(path: str) -> List[Dict[str, Any]]:
    """Read a refs file: ``.json`` (JSON export) or a pickle (restricted
    unpickler).  Returns the list of ref dicts."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'refs file not found: {path}')
    if path.endswith('.json'):
        with open(path, 'r', encoding='utf-8') as f:
            refs = json.load(f)
    else:
        refs = safe_load_pickle(path)
    if isinstance(refs, dict) and 'refs' in refs:
        refs = refs['refs']
    if not isinstance(refs, list):
        raise ValueError(
            f'{path}: expected a list of refs, got {type(refs).__name__}')
    return refs


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while millions of small dicts and
    lists are created (JSON / pickle parsing): otherwise its repeated full
    scans nearly double the load time of a RefCOCO-sized annotation."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _format_ids(ids: Sequence[Tuple[Any, Any]]) -> str:
    shown = ', '.join(f'(ref_id={r}, sent_id={s})'
                      for r, s in ids[:_MAX_IDS_IN_WARNING])
    more = len(ids) - _MAX_IDS_IN_WARNING
    return shown + (f' and {more} more' if more > 0 else '')


@DATASETS.register_module()
class RefCocoDataset(BaseDataset):
    """Referring segmentation dataset in the refer toolkit format.

    Items (``data_info`` dicts, before the pipeline):

    - ``img_path``: image file, from ``instances.json`` via ``image_id``
      (a ref's own ``file_name``, ``..._<ann_id>.jpg``, names no file).
    - ``segmentation`` (polygons or RLE), ``iscrowd``, ``height``,
      ``width``: the referred annotation, decoded by ``LoadReferringMask``.
    - ``sentences`` (list[str], cleaned: lower case, single spaces),
      ``sent_ids`` (list[int]), ``sentence_kinds`` (list[str], only when the
      refs carry a ``kind`` per sentence, as the synthetic set does).
    - ``ref_id``, ``ann_id``, ``image_id``, ``category_id``, ``split``.

    ``sentence_sampling`` decides what an item is:

    - ``'random'`` (default when training): one item per referred object,
      holding all its sentences; ``SelectSentence`` draws one per access.
    - ``'first'``: one item per object with only its first sentence.
    - ``'all'`` (default when ``test_mode``): one item per sentence.

    Sentences that are empty after cleaning are skipped with one warning
    that names their ids; an object left without sentences is skipped.
    Long sentences are kept whole (the text encoder truncates).

    Args:
        data_root (str): the refer toolkit ``data/`` folder. Default 'data'.
        dataset (str): ``'refcoco'``, ``'refcoco+'`` or ``'refcocog'``.
        split_by (str): ``'unc'`` (RefCOCO, RefCOCO+), ``'umd'`` or
            ``'google'`` (G-Ref).
        split (str): a split of ``VALID_SPLITS[dataset][split_by]``.
        ann_file (str, optional): COCO instances file. Default:
            ``'<dataset>/instances.json'`` under ``data_root``.
        refs_file (str, optional): refs file. Default:
            ``'<dataset>/refs(<split_by>).p'``, or ``.json`` when the pickle
            is absent.
        data_prefix (dict): ``img_path`` folder of the images, relative to
            ``data_root``. Default: ``'images/mscoco/images/train2014'``.
        sentence_sampling (str, optional): see above; None picks by
            ``test_mode``.
        sentence_key (str): the sentence field, ``'sent'`` (the toolkit's
            tokenised lower-case text) or ``'raw'``; the other is the
            fallback. Default: ``'sent'``.
        check_images (bool): check at index time that every image file
            exists (one stat per image). Default: False (missing files are
            reported when loaded).
        Other arguments are those of :class:`mmengine.dataset.BaseDataset`.

    Raises:
        ValueError: unknown dataset / split_by / split (listing the valid
            ones), or a ref pointing to an annotation or image that
            ``instances.json`` lacks.
        FileNotFoundError: a missing annotation or refs file (naming it).
    """

    METAINFO = dict(classes=('background', 'object'),
                    palette=[[0, 0, 0], [255, 255, 255]])
    #: dataset -> split_by -> valid splits (subclasses name their own)
    SPLITS: Dict[str, Dict[str, Tuple[str, ...]]] = VALID_SPLITS
    #: stem of the refs file, ``<stem>(<split_by>)<ext>``
    REFS_STEM = 'refs'
    #: extensions of the refs file, in the order they are looked for
    REFS_EXTS: Tuple[str, ...] = ('.p', '.json')

    def __init__(self,
                 *,
                 data_root: str = 'data',
                 dataset: str = 'refcoco',
                 split_by: str = 'unc',
                 split: str = 'train',
                 ann_file: Optional[str] = None,
                 refs_file: Optional[str] = None,
                 data_prefix: Optional[dict] = None,
                 sentence_sampling: Optional[str] = None,
                 sentence_key: str = 'sent',
                 check_images: bool = False,
                 pipeline: Sequence[Union[dict, Any]] = (),
                 test_mode: bool = False,
                 metainfo: Optional[dict] = None,
                 indices: Optional[Union[int, Sequence[int]]] = None,
                 serialize_data: bool = True,
                 lazy_init: bool = False,
                 max_refetch: int = 1000) -> None:
        splits = self.SPLITS
        if dataset not in splits:
            raise ValueError(
                f'unknown dataset {dataset!r}; valid: {sorted(splits)}')
        if split_by not in splits[dataset]:
            raise ValueError(
                f'unknown split_by {split_by!r} for {dataset}; valid: '
                f'{sorted(splits[dataset])}')
        valid = splits[dataset][split_by]
        if split not in valid:
            raise ValueError(
                f'unknown split {split!r} for {dataset} ({split_by}); valid '
                f'splits: {list(valid)}')
        if sentence_sampling is None:
            sentence_sampling = self._default_sampling(test_mode)
        if sentence_sampling not in SENTENCE_SAMPLING:
            raise ValueError(
                f'sentence_sampling must be one of {SENTENCE_SAMPLING}, got '
                f'{sentence_sampling!r}')
        if sentence_key not in ('sent', 'raw'):
            raise ValueError(
                f"sentence_key must be 'sent' or 'raw', got {sentence_key!r}")
        self.dataset_name = dataset
        self.split_by = split_by
        self.split = split
        self.sentence_sampling = sentence_sampling
        self.sentence_key = sentence_key
        self.check_images = check_images
        self.refs_file = refs_file
        if ann_file is None:
            ann_file = osp.join(dataset, 'instances.json')
        if data_prefix is None:
            data_prefix = dict(img_path='images/mscoco/images/train2014')
        super().__init__(
            ann_file=ann_file,
            metainfo=metainfo,
            data_root=data_root,
            data_prefix=data_prefix,
            indices=indices,
            serialize_data=serialize_data,
            # built from mmseg's registry, so the plugin's transforms resolve
            # even where no default scope is set
            pipeline=[TRANSFORMS.build(t) if isinstance(t, dict) else t
                      for t in pipeline],
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch)
        self._metainfo.update(
            dataset=dataset, split_by=split_by, split=split)

    @staticmethod
    def _default_sampling(test_mode: bool) -> str:
        """``sentence_sampling`` when none is given."""
        return 'all' if test_mode else 'random'

    def _missing_hint(self) -> str:
        """Appended to the error of a missing refs / instances file."""
        return ''

    # ------------------------------------------------------------------ files
    def resolve_refs_file(self) -> str:
        """Path of the refs file: ``refs_file`` if given (relative to
        ``data_root``), else ``<dataset>/<REFS_STEM>(<split_by>)`` with the
        first extension of ``REFS_EXTS`` that exists (``refs(unc).p`` or
        its ``.json`` export for RefCOCO)."""
        if self.refs_file is not None:
            path = self.refs_file
            if self.data_root and not osp.isabs(path):
                path = osp.join(self.data_root, path)
            if not osp.isfile(path):
                raise FileNotFoundError(
                    f'refs file not found: {path}{self._missing_hint()}')
            return path
        stem = osp.join(self.data_root or '', self.dataset_name,
                        f'{self.REFS_STEM}({self.split_by})')
        for ext in self.REFS_EXTS:
            if osp.isfile(stem + ext):
                return stem + ext
        first, *others = [stem + ext for ext in self.REFS_EXTS]
        raise FileNotFoundError(
            f'refs file not found: {first} (nor {" nor ".join(others)})'
            f'{self._missing_hint()}')

    def load_data_list(self) -> List[dict]:
        """Index the refs of ``split``: dictionary look-ups only, no mask
        decoding (that happens in ``LoadReferringMask``)."""
        with _gc_paused():
            return self._load_data_list()

    def _load_data_list(self) -> List[dict]:
        if not osp.isfile(self.ann_file):
            raise FileNotFoundError(
                f'annotation file not found: {self.ann_file}'
                f'{self._missing_hint()}')
        refs_path = self.resolve_refs_file()
        with open(self.ann_file, 'r', encoding='utf-8') as f:
            instances = json.load(f)
        for key in ('images', 'annotations'):
            if key not in instances:
                raise ValueError(f'{self.ann_file} has no {key!r} list')
        refs = load_refs(refs_path)

        images = {img['id']: img for img in instances['images']}
        anns = {ann['id']: ann for ann in instances['annotations']}
        img_prefix = self.data_prefix.get('img_path', '')
        key, fallback = self.sentence_key, (
            'raw' if self.sentence_key == 'sent' else 'sent')
        sampling = self.sentence_sampling

        data_list: List[dict] = []
        empty: List[Tuple[Any, Any]] = []
        dropped_refs: List[Any] = []
        img_paths: Dict[Any, str] = {}
        for ref in refs:
            if ref.get('split') != self.split:
                continue
            ref_id, image_id = ref.get('ref_id'), ref.get('image_id')
            img = images.get(image_id)
            if img is None:
                raise ValueError(
                    f'ref {ref_id} in {refs_path} refers to image_id '
                    f'{image_id}, which is not in {self.ann_file}')
            target = self._ref_target(ref, anns, refs_path)

            sentences, sent_ids, kinds = [], [], []
            for sent in ref.get('sentences', ()):
                text = sent.get(key)
                if text is None:
                    text = sent.get(fallback, '')
                text = clean_sentence(text)
                if not text:
                    empty.append((ref_id, sent.get('sent_id')))
                    continue
                sentences.append(text)
                sent_ids.append(sent.get('sent_id'))
                if 'kind' in sent:
                    kinds.append(sent['kind'])
            if not sentences:
                dropped_refs.append(ref_id)
                continue

            img_path = img_paths.get(image_id)
            if img_path is None:
                img_path = osp.join(img_prefix, img['file_name'])
                img_paths[image_id] = img_path
            base = dict(
                img_path=img_path,
                image_id=image_id,
                ref_id=ref_id,
                split=self.split,
                height=img['height'],
                width=img['width'],
                **target)
            has_kinds = len(kinds) == len(sentences)
            if sampling == 'all':
                for i, text in enumerate(sentences):
                    info = dict(base, sentences=[text],
                                sent_ids=[sent_ids[i]])
                    if has_kinds:
                        info['sentence_kinds'] = [kinds[i]]
                    data_list.append(info)
            else:
                n = 1 if sampling == 'first' else len(sentences)
                info = dict(base, sentences=sentences[:n],
                            sent_ids=sent_ids[:n])
                if has_kinds:
                    info['sentence_kinds'] = kinds[:n]
                data_list.append(info)

        if empty:
            warnings.warn(
                f'{self.dataset_name} {self.split}: skipped {len(empty)} '
                f'empty sentence(s): {_format_ids(empty)}')
        if dropped_refs:
            warnings.warn(
                f'{self.dataset_name} {self.split}: skipped '
                f'{len(dropped_refs)} ref(s) without any non-empty sentence: '
                f'ref_id {dropped_refs[:_MAX_IDS_IN_WARNING]}')
        if not data_list:
            warnings.warn(
                f'{self.dataset_name} ({self.split_by}) split '
                f'{self.split!r} has no items in {refs_path}')
        if self.check_images:
            for path in img_paths.values():
                if not osp.isfile(path):
                    raise FileNotFoundError(f'image file not found: {path}')
        return data_list

    def _ref_annotation(self, ref: dict, ann_id: Any,
                        anns: Dict[Any, dict], refs_path: str) -> dict:
        """The annotation ``ann_id`` of ``ref``, checked: it exists in
        ``instances.json`` and belongs to the ref's image (ValueError
        naming the ref and the ann id otherwise)."""
        ref_id, image_id = ref.get('ref_id'), ref.get('image_id')
        ann = anns.get(ann_id)
        if ann is None:
            raise ValueError(
                f'ref {ref_id} in {refs_path} refers to ann_id {ann_id}, '
                f'which is not in {self.ann_file}')
        if ann.get('image_id', image_id) != image_id:
            raise ValueError(
                f'ref {ref_id}: ann {ann_id} belongs to image '
                f'{ann.get("image_id")}, the ref says {image_id}')
        return ann

    def _ref_target(self, ref: dict, anns: Dict[Any, dict],
                    refs_path: str) -> dict:
        """The item fields that describe a ref's target: ``ann_id``,
        ``category_id``, ``segmentation``, ``iscrowd``.

        Raises:
            ValueError: the ann id is not in ``instances.json``, or its
                annotation belongs to another image than the ref's.
        """
        ann_id = ref.get('ann_id')
        ann = self._ref_annotation(ref, ann_id, anns, refs_path)
        return dict(
            ann_id=ann_id,
            category_id=ref.get('category_id', ann.get('category_id')),
            segmentation=ann['segmentation'],
            iscrowd=ann.get('iscrowd', 0))
