"""A synthetic referring-segmentation set in the real refer toolkit layout.

Every image holds 2-5 coloured shapes (square, circle, triangle; red, green,
blue, yellow, purple; small or big) on a noisy background.  Each image draws
its objects from a small palette of two or three colours and shapes, so most
referents have distractors that share their colour or shape, and the
sentence, not the image alone, decides the target.  Sentences come from a
tiny grammar with three kinds::

    attribute  the [small|big] [colour] square|circle|triangle|shape
    position   the <np> on the left|on the right|at the top|at the bottom
               the leftmost|rightmost|topmost|bottommost <np>
    relation   the <np> left of|right of|above|below the <np>

Semantics (``margin`` = ``margin_frac`` x image size, positions are mask
centroids, y grows downwards):

- attribute: the objects matching every given word;
- position: among the objects matching <np> (at least two), the extreme one
  in that direction; when the runner-up is within ``margin`` both count;
- relation: the anchor is the unique object matching the second <np>; the
  referents are the other objects matching the first <np> whose offset in
  the named direction is ``>= -margin`` (clearly on that side, or too close
  to call); with no or several anchors the sentence names nothing.

:func:`parse_sentence` maps a sentence back to that meaning and
:func:`resolve` evaluates it on an image's objects; the generator keeps a
sentence only if it resolves to exactly its target, and position / relation
sentences only where their noun phrase alone matches two or more objects.

Written files (``out`` = the ``data_root`` of a config)::

    out/refcoco/instances.json          COCO images / annotations / categories
    out/refcoco/refs(unc).p             protocol-2 pickle, splits train/val/
                                        testA/testB (image-level split)
    out/images/mscoco/images/train2014/COCO_train2014_<image_id:012d>.jpg

Annotations are polygons, except every fourth one is a compressed RLE and
every fourth (offset 2) an uncompressed RLE, so all decoding paths run.
Extra fields, harmless to the refer format: ``attributes`` per annotation
and ``kind`` per sentence.  Output is a function of the arguments only (each
image has its own generator seeded by ``(seed, index)``).
"""
import json
import os
import os.path as osp
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    'COLOURS', 'SHAPES', 'SIZES', 'CATEGORIES', 'SynthObject', 'SynthConfig',
    'parse_sentence', 'resolve', 'render_sentence', 'make_image',
    'generate_refer_set', 'mask_to_uncompressed_rle'
]

#: RGB values of the colour words.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    'red': (215, 40, 40),
    'green': (40, 165, 60),
    'blue': (45, 85, 220),
    'yellow': (235, 210, 35),
    'purple': (145, 60, 185),
}
SHAPES: Tuple[str, ...] = ('square', 'circle', 'triangle')
SIZES: Tuple[str, ...] = ('small', 'big')
CATEGORIES = [
    dict(id=i + 1, name=name, supercategory='shape')
    for i, name in enumerate(SHAPES)
]
_CAT_ID = {c['name']: c['id'] for c in CATEGORIES}

DIRECTIONS = ('left', 'right', 'top', 'bottom')
RELATIONS = ('left of', 'right of', 'above', 'below')
_EXTREME_WORD = dict(left='leftmost', right='rightmost', top='topmost',
                     bottom='bottommost')
_SIDE_PHRASE = {
    'left': 'on the left', 'right': 'on the right', 'top': 'at the top',
    'bottom': 'at the bottom'
}


@dataclass
class SynthObject:
    """One shape; ``cx, cy`` are the centroid of its rendered mask."""
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    polygon: List[float] = field(default_factory=list)
    mask: Optional[np.ndarray] = None

    def attr(self, name: str) -> str:
        return getattr(self, name)


@dataclass
class SynthConfig:
    """Knobs of the generator (sizes are fractions of the image side)."""
    img_size: int = 112
    min_objects: int = 2
    max_objects: int = 5
    small_radius: Tuple[float, float] = (0.085, 0.11)
    big_radius: Tuple[float, float] = (0.15, 0.19)
    gap: float = 0.03
    margin_frac: float = 0.08
    refs_per_image: Tuple[int, int] = (1, 3)
    sentences_per_ref: Tuple[int, int] = (2, 3)
    split_fractions: Tuple[Tuple[str, float], ...] = (
        ('val', 0.1), ('testA', 0.1), ('testB', 0.1))
    jpeg_quality: int = 95


# ----------------------------------------------------------------- grammar
# (size, colour, shape); None = not said
Desc = Tuple[Optional[str], Optional[str], Optional[str]]

_NP = (r'(?:(small|big) )?(?:(' + '|'.join(COLOURS) + r') )?(' +
       '|'.join(SHAPES) + r'|shape)')
_RE_ATTR = re.compile(rf'^the {_NP}$')
_RE_POS_SIDE = re.compile(
    rf'^the {_NP} (on the left|on the right|at the top|at the bottom)$')
_RE_POS_MOST = re.compile(
    r'^the (leftmost|rightmost|topmost|bottommost) ' + _NP + '$')
_RE_REL = re.compile(rf'^the {_NP} (left of|right of|above|below) the {_NP}$')


def _desc(size: Optional[str], colour: Optional[str],
          shape: Optional[str]) -> Desc:
    return (size, colour, None if shape == 'shape' else shape)


def _np_text(desc: Desc) -> str:
    size, colour, shape = desc
    return ' '.join(w for w in (size, colour, shape or 'shape') if w)


def render_sentence(spec: dict) -> str:
    """Text of a spec made by the generator (inverse of
    :func:`parse_sentence`)."""
    if spec['kind'] == 'attribute':
        return f'the {_np_text(spec["target"])}'
    if spec['kind'] == 'position':
        if spec['form'] == 'side':
            return (f'the {_np_text(spec["target"])} '
                    f'{_SIDE_PHRASE[spec["direction"]]}')
        return (f'the {_EXTREME_WORD[spec["direction"]]} '
                f'{_np_text(spec["target"])}')
    if spec['kind'] == 'relation':
        return (f'the {_np_text(spec["target"])} {spec["relation"]} '
                f'the {_np_text(spec["anchor"])}')
    raise ValueError(f'unknown sentence kind {spec["kind"]!r}')


def parse_sentence(text: str) -> dict:
    """Meaning of a synthetic sentence: ``dict(kind, target, ...)``.

    Raises:
        ValueError: the text is not in the grammar.
    """
    m = _RE_REL.match(text)
    if m:
        return dict(kind='relation', target=_desc(*m.group(1, 2, 3)),
                    relation=m.group(4), anchor=_desc(*m.group(5, 6, 7)))
    m = _RE_POS_SIDE.match(text)
    if m:
        direction = m.group(4).split()[-1]
        return dict(kind='position', form='side',
                    target=_desc(*m.group(1, 2, 3)), direction=direction)
    m = _RE_POS_MOST.match(text)
    if m:
        direction = m.group(1)[:-len('most')]
        return dict(kind='position', form='most',
                    target=_desc(*m.group(2, 3, 4)), direction=direction)
    m = _RE_ATTR.match(text)
    if m:
        return dict(kind='attribute', target=_desc(*m.group(1, 2, 3)))
    raise ValueError(f'not a synthetic-grammar sentence: {text!r}')


def _matches(obj: SynthObject, desc: Desc) -> bool:
    size, colour, shape = desc
    return ((size is None or obj.size == size)
            and (colour is None or obj.colour == colour)
            and (shape is None or obj.shape == shape))


def _coord(obj: SynthObject, direction: str) -> float:
    """Larger = further in ``direction``."""
    return dict(left=-obj.cx, right=obj.cx, top=-obj.cy,
                bottom=obj.cy)[direction]


def _offset(obj: SynthObject, anchor: SynthObject, relation: str) -> float:
    """How far ``obj`` lies on the ``relation`` side of ``anchor``."""
    direction = dict(zip(RELATIONS, DIRECTIONS))[relation]
    return _coord(obj, direction) - _coord(anchor, direction)


def resolve(spec: dict, objects: Sequence[SynthObject],
            margin: float) -> List[int]:
    """Indices of the objects a parsed sentence can refer to (see the module
    docstring for the semantics)."""
    group = [i for i, o in enumerate(objects) if _matches(o, spec['target'])]
    if spec['kind'] == 'attribute':
        return group
    if spec['kind'] == 'position':
        if len(group) <= 1:
            return group
        key = [_coord(objects[i], spec['direction']) for i in group]
        best = max(key)
        return [i for i, k in zip(group, key) if k >= best - margin]
    if spec['kind'] == 'relation':
        anchors = [
            i for i, o in enumerate(objects) if _matches(o, spec['anchor'])
        ]
        if len(anchors) != 1:  # no anchor, or an ambiguous one
            return []
        a = objects[anchors[0]]
        return [
            i for i in group if i != anchors[0]
            and _offset(objects[i], a, spec['relation']) >= -margin
        ]
    raise ValueError(f'unknown sentence kind {spec["kind"]!r}')


def _all_descs(obj: SynthObject) -> List[Desc]:
    out = []
    for use_size in (False, True):
        for use_colour in (False, True):
            for use_shape in (False, True):
                out.append((obj.size if use_size else None,
                            obj.colour if use_colour else None,
                            obj.shape if use_shape else None))
    return out


def _candidates(t: int, objects: Sequence[SynthObject],
                margin: float) -> Dict[str, List[dict]]:
    """Every grammar sentence that singles out object ``t`` (and needs its
    position / relation words, for those kinds)."""
    target = objects[t]
    out: Dict[str, List[dict]] = dict(attribute=[], position=[], relation=[])
    descs = _all_descs(target)
    unique: Dict[int, List[Desc]] = {}  # object -> its unique descriptions
    for i, o in enumerate(objects):
        unique[i] = [
            d for d in _all_descs(o) if d != (None, None, None) and
            [j for j, p in enumerate(objects) if _matches(p, d)] == [i]
        ]
    out['attribute'] = [dict(kind='attribute', target=d) for d in unique[t]]
    for d in descs:
        group = [i for i, o in enumerate(objects) if _matches(o, d)]
        if len(group) < 2:
            continue
        for direction in DIRECTIONS:
            form = 'side' if len(group) == 2 else 'most'
            spec = dict(kind='position', form=form, target=d,
                        direction=direction)
            if resolve(spec, objects, margin) == [t]:
                out['position'].append(spec)
    for a, anchor_descs in unique.items():
        if a == t:
            continue
        for ad in anchor_descs:
            for d in descs:
                group = [i for i, o in enumerate(objects)
                         if i != a and _matches(o, d)]
                if len(group) < 2:
                    continue
                for relation in RELATIONS:
                    spec = dict(kind='relation', target=d, relation=relation,
                                anchor=ad)
                    if resolve(spec, objects, margin) == [t]:
                        out['relation'].append(spec)
    return out


# --------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> List[float]:
    if shape == 'circle':
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    elif shape == 'square':
        h = 0.82 * r
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h),
               (cx - h, cy + h)]
    elif shape == 'triangle':
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        rr = 1.1 * r
        pts = [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a in angles]
    else:
        raise ValueError(f'unknown shape {shape!r}')
    return [round(float(v), 2) for p in pts for v in p]


def _poly_mask(polygon: List[float], size: int) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
    return mask_utils.decode(rle)


def make_image(rng: np.random.Generator, cfg: SynthConfig
               ) -> Tuple[np.ndarray, List[SynthObject]]:
    """Draw one image: H x W x 3 uint8 RGB and its objects (masks from the
    polygons through pycocotools, so image and annotation agree exactly)."""
    s = cfg.img_size
    n_colours = int(rng.integers(2, 4))
    n_shapes = int(rng.integers(2, 4))
    colours = list(rng.choice(list(COLOURS), size=n_colours, replace=False))
    shapes = list(rng.choice(list(SHAPES), size=n_shapes, replace=False))
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: List[Tuple[float, float, float]] = []
    objects: List[SynthObject] = []
    for _ in range(n_target):
        size = str(rng.choice(SIZES))
        lo, hi = cfg.small_radius if size == 'small' else cfg.big_radius
        r = float(rng.uniform(lo, hi)) * s
        for _attempt in range(100):
            cx = float(rng.uniform(r + 1, s - r - 1))
            cy = float(rng.uniform(r + 1, s - r - 1))
            if all(np.hypot(cx - x, cy - y) > r + rr + cfg.gap * s
                   for x, y, rr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
        objects.append(
            SynthObject(shape=shape, colour=colour, size=size, cx=cx, cy=cy,
                        polygon=_polygon(shape, cx, cy, r)))
    # background: a grey level, a soft gradient and pixel noise
    base = rng.uniform(95, 175) + rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    slope = rng.uniform(-25, 25, size=2)
    img = (base[None, None, :] + (slope[0] * xx + slope[1] * yy)[..., None] +
           rng.normal(0, 7, size=(s, s, 3)))
    for obj in objects:
        obj.mask = _poly_mask(obj.polygon, s)
        ys, xs = np.nonzero(obj.mask)
        obj.cx, obj.cy = float(xs.mean()), float(ys.mean())
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float64)
        noise = rng.normal(0, 5, size=(len(ys), 3))
        img[ys, xs] = colour[None, :] + noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major runs, starting with zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order='F')
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return dict(size=list(mask.shape), counts=[int(c) for c in counts])


def _segmentation(obj: SynthObject, ann_index: int):
    if ann_index % 4 == 1:
        rle = mask_utils.encode(np.asfortranarray(obj.mask))
        return dict(size=[int(v) for v in rle['size']],
                    counts=rle['counts'].decode('ascii'))
    if ann_index % 4 == 3:
        return mask_to_uncompressed_rle(obj.mask)
    return [obj.polygon]


def _annotation(obj: SynthObject, ann_id: int, image_id: int) -> dict:
    """The COCO annotation of one shape; ``attributes`` (shape, colour,
    size) describe the scene for checks of the sentences."""
    ys, xs = np.nonzero(obj.mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return dict(
        id=ann_id, image_id=image_id, category_id=_CAT_ID[obj.shape],
        segmentation=_segmentation(obj, ann_id),
        area=float(obj.mask.sum()),
        bbox=[float(x0), float(y0), float(xs.max() - x0 + 1),
              float(ys.max() - y0 + 1)],
        iscrowd=0,
        attributes=dict(shape=obj.shape, colour=obj.colour, size=obj.size))


def _pick_sentences(rng: np.random.Generator, cands: Dict[str, List[dict]],
                    num: int,
                    render: Callable[[dict], str] = render_sentence
                    ) -> List[dict]:
    """Up to ``num`` distinct sentences, taken in turn from the kinds of
    ``cands`` (in their order, shuffled) that have any."""
    kinds = [k for k in cands if cands[k]]
    rng.shuffle(kinds)
    chosen: List[dict] = []
    texts = set()
    pools = {k: list(cands[k]) for k in kinds}
    while len(chosen) < num and any(pools.values()):
        for kind in kinds:
            if len(chosen) >= num or not pools[kind]:
                continue
            spec = pools[kind].pop(int(rng.integers(len(pools[kind]))))
            text = render(spec)
            if text not in texts:
                texts.add(text)
                chosen.append(dict(spec, text=text))
    return chosen


def _assign_splits(num_images: int, seed: int,
                   fractions: Sequence[Tuple[str, float]]) -> List[str]:
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(num_images)
    splits = ['train'] * num_images
    start = 0
    for name, frac in fractions:
        count = max(1, int(round(frac * num_images))) if num_images >= 4 \
            else 0
        for idx in order[start:start + count]:
            splits[int(idx)] = name
        start += count
    return splits


def generate_refer_set(out_dir: str,
                       num_images: int = 1000,
                       img_size: int = 112,
                       seed: int = 0,
                       progress: bool = True,
                       cfg: Optional[SynthConfig] = None) -> Dict[str, int]:
    """Write the synthetic set under ``out_dir`` (see the module docstring).

    Returns:
        dict: counts ``images``, ``annotations``, ``refs``, ``sentences`` and
        ``refs_<split>`` / ``sentences_<split>``.
    """
    from PIL import Image  # pillow comes with torchvision / mmcv

    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    cfg = cfg or SynthConfig()
    cfg = SynthConfig(**{**cfg.__dict__, 'img_size': int(img_size)})
    if cfg.img_size < 32:
        raise ValueError(f'img_size must be >= 32, got {cfg.img_size}')
    margin = cfg.margin_frac * cfg.img_size
    ann_dir = osp.join(out_dir, 'refcoco')
    img_dir = osp.join(out_dir, 'images', 'mscoco', 'images', 'train2014')
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    splits = _assign_splits(num_images, seed, cfg.split_fractions)

    bar = None
    if progress:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(num_images)
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        img, objects = make_image(rng, cfg)
        image_id = index + 1
        file_name = f'COCO_train2014_{image_id:012d}.jpg'
        Image.fromarray(img).save(
            osp.join(img_dir, file_name), quality=cfg.jpeg_quality)
        images.append(dict(id=image_id, file_name=file_name,
                           height=cfg.img_size, width=cfg.img_size))
        obj_ann_ids = []
        for obj in objects:
            ann_id += 1
            obj_ann_ids.append(ann_id)
            annotations.append(_annotation(obj, ann_id, image_id))
        lo, hi = cfg.refs_per_image
        n_refs = int(rng.integers(lo, hi + 1))
        order = rng.permutation(len(objects))
        made = 0
        for t in order:
            if made >= n_refs:
                break
            t = int(t)
            cands = _candidates(t, objects, margin)
            lo_s, hi_s = cfg.sentences_per_ref
            chosen = _pick_sentences(rng, cands,
                                     int(rng.integers(lo_s, hi_s + 1)))
            if len(chosen) < lo_s:
                continue
            sentences = []
            for spec in chosen:
                # verify from the text alone: it must name exactly t
                if resolve(parse_sentence(spec['text']), objects,
                           margin) != [t]:
                    raise RuntimeError(
                        f'generator bug: {spec["text"]!r} is ambiguous in '
                        f'image {image_id}')
                sentences.append(dict(
                    tokens=spec['text'].split(), raw=spec['text'],
                    sent=spec['text'], sent_id=sent_id, kind=spec['kind']))
                sent_id += 1
            this_ann = obj_ann_ids[t]
            refs.append(dict(
                ref_id=ref_id, ann_id=this_ann, image_id=image_id,
                split=splits[index], category_id=_CAT_ID[objects[t].shape],
                file_name=f'COCO_train2014_{image_id:012d}_{this_ann}.jpg',
                sent_ids=[s['sent_id'] for s in sentences],
                sentences=sentences))
            ref_id += 1
            made += 1
        if bar is not None:
            bar.update()
    if bar is not None:
        print()

    instances = dict(
        info=dict(description='mmseg_sera synthetic referring set',
                  seed=seed, img_size=cfg.img_size, num_images=num_images,
                  margin=margin),
        images=images, annotations=annotations, categories=CATEGORIES)
    with open(osp.join(ann_dir, 'instances.json'), 'w') as f:
        json.dump(instances, f)
    with open(osp.join(ann_dir, 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)

    summary = dict(images=len(images), annotations=len(annotations),
                   refs=len(refs),
                   sentences=sum(len(r['sentences']) for r in refs))
    for name in ('train', 'val', 'testA', 'testB'):
        sub = [r for r in refs if r['split'] == name]
        summary[f'refs_{name}'] = len(sub)
        summary[f'sentences_{name}'] = sum(len(r['sentences']) for r in sub)
    return summary
