"""A generalized synthetic referring set (GRES) in the gRefCOCO layout.

The scenes are those of :mod:`mmseg_sera.datasets.synthetic` with more
objects (4-8 by default, smaller shapes), drawn from a palette of two or
three colours and shapes, so most objects have same-colour and same-shape
distractors.  A sentence names one object, several, or none; its ``kind``
says which rule made it:

==========  ==============================================  ==============
kind        forms                                           targets
==========  ==============================================  ==============
attribute   the [size] [colour] <shape>                     1
position    the <np> on the left / the leftmost <np> ...    1
relation    the <np> left of the <np> ...                   1
ordinal     the second / third <np> from the left|right|    1
            top|bottom
negation    the <shape> that is not <colour>;               1
            the <colour> shape that is not a <shape>
multi       all <nps>; the two <nps> on the left|right|      2 or more
            at the top|bottom; the <np> and the <np>
no_target   the [size] <colour> <shape> (none in the image) 0
==========  ==============================================  ==============

Semantics (positions are mask centroids, y grows downwards, ``margin`` =
``margin_frac`` x image size; the first three kinds are those of the
RefCOCO-layout set):

- ``all <nps>``: every object matching <np> (at least two);
- ``the two <nps> <side>``: the two objects matching <np> furthest in that
  direction; generated only with a third match and a gap of more than
  ``margin`` between the second and the third;
- ``the <np1> and the <np2>``: the objects matching <np1> or <np2>, each
  matching exactly one object;
- ``the k-th <np> from the <side>``: the k-th of the objects matching <np>,
  counted from that side; generated only where its neighbours in that
  order lie more than ``margin`` away;
- ``the <shape> that is not <colour>``: the objects of that shape of
  another colour (generated where exactly one is, and at least one of that
  colour exists, so the negation is needed); likewise ``the <colour>
  shape that is not a <shape>``;
- no target: ``the <np>`` where no object matches <np>, chosen so that its
  colour and shape words both occur in the image when possible (the model
  must bind them to one object to see that none fits).

:func:`parse_generalized` maps a sentence back to its rule and
:func:`resolve_generalized` evaluates it on a scene; the generator keeps a
sentence only if it resolves to exactly the ref's targets.

Written files (``out`` = the ``data_root`` of a config)::

    out/grefcoco/instances.json     COCO images / annotations / categories;
                                    ``attributes`` per annotation (shape,
                                    colour, size, centroid cx, cy)
    out/grefcoco/grefs(unc).json    gRefCOCO refs: ``ann_id`` a list,
                                    [-1] = no target; ``kind`` per sentence;
                                    splits train / val / testA / testB
    out/images/train2014/COCO_train2014_<image_id:012d>.jpg

Output is a function of the arguments only.
"""
import json
import os
import os.path as osp
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from .synthetic import (_CAT_ID, _NP, _SIDE_PHRASE,
                        CATEGORIES, COLOURS, DIRECTIONS, SHAPES, SIZES,
                        Desc, SynthConfig, SynthObject, _annotation,
                        _assign_splits, _candidates, _coord, _desc, _matches,
                        _np_text, _pick_sentences, make_image,
                        parse_sentence, render_sentence, resolve)

__all__ = [
    'GRES_KINDS', 'GresSynthConfig', 'parse_generalized',
    'resolve_generalized', 'render_generalized', 'generate_grefer_set'
]

#: sentence kinds of the generalized set
GRES_KINDS = ('attribute', 'position', 'relation', 'ordinal', 'negation',
              'multi', 'no_target')
ORDINALS = {2: 'second', 3: 'third'}
_ORDINAL_NUM = {v: k for k, v in ORDINALS.items()}
_PLURAL = {'square': 'squares', 'circle': 'circles',
           'triangle': 'triangles', None: 'shapes'}
_SINGULAR = {v: k for k, v in _PLURAL.items()}
_FROM_SIDE = dict(left='from the left', right='from the right',
                  top='from the top', bottom='from the bottom')
_NPS = (r'(?:(small|big) )?(?:(' + '|'.join(COLOURS) + r') )?(' +
        '|'.join(_PLURAL.values()) + r')')
_SIDES = '|'.join(_SIDE_PHRASE.values())
_RE_ALL = re.compile(rf'^all {_NPS}$')
_RE_TWO = re.compile(rf'^the two {_NPS} ({_SIDES})$')
_RE_AND = re.compile(rf'^the {_NP} and the {_NP}$')
_RE_ORD = re.compile(rf'^the ({"|".join(ORDINALS.values())}) {_NP} '
                     rf'from the (left|right|top|bottom)$')
_RE_NOT_COLOUR = re.compile(
    rf'^the ({"|".join(SHAPES)}) that is not ({"|".join(COLOURS)})$')
_RE_NOT_SHAPE = re.compile(
    rf'^the ({"|".join(COLOURS)}) shape that is not a '
    rf'({"|".join(SHAPES)})$')


@dataclass
class GresSynthConfig(SynthConfig):
    """Knobs of the generalized generator (fractions of the image side;
    the other fields as :class:`SynthConfig`)."""
    min_objects: int = 4
    max_objects: int = 8
    small_radius: Tuple[float, float] = (0.06, 0.075)
    big_radius: Tuple[float, float] = (0.095, 0.12)
    gap: float = 0.025
    single_refs_per_image: Tuple[int, int] = (1, 2)
    multi_ref_prob: float = 0.8
    no_target_ref_prob: float = 0.6
    sentences_per_ref: Tuple[int, int] = (2, 3)
    sentences_per_group_ref: Tuple[int, int] = (1, 2)


# ----------------------------------------------------------------- grammar
def _plural_text(desc: Desc) -> str:
    size, colour, shape = desc
    return ' '.join(w for w in (size, colour, _PLURAL[shape]) if w)


def render_generalized(spec: dict) -> str:
    """Text of a spec (inverse of :func:`parse_generalized`)."""
    form = spec.get('form')
    if form == 'all':
        return f'all {_plural_text(spec["target"])}'
    if form == 'two':
        return (f'the two {_plural_text(spec["target"])} '
                f'{_SIDE_PHRASE[spec["direction"]]}')
    if form == 'and':
        return (f'the {_np_text(spec["target"])} and the '
                f'{_np_text(spec["other"])}')
    if form == 'ordinal':
        return (f'the {ORDINALS[spec["rank"]]} {_np_text(spec["target"])} '
                f'{_FROM_SIDE[spec["direction"]]}')
    if form == 'not_colour':
        return f'the {spec["shape"]} that is not {spec["colour"]}'
    if form == 'not_shape':
        return f'the {spec["colour"]} shape that is not a {spec["shape"]}'
    if form == 'none':
        return f'the {_np_text(spec["target"])}'
    return render_sentence(spec)


def parse_generalized(text: str) -> dict:
    """The rule of a generalized sentence: ``dict(form, ...)``, or the
    spec of :func:`~mmseg_sera.datasets.synthetic.parse_sentence` for the
    RefCOCO-layout forms (``the <np>`` among them).

    Raises:
        ValueError: the text is in neither grammar.
    """
    m = _RE_ALL.match(text)
    if m:
        size, colour, plural = m.group(1, 2, 3)
        return dict(form='all', target=(size, colour, _SINGULAR[plural]))
    m = _RE_TWO.match(text)
    if m:
        size, colour, plural = m.group(1, 2, 3)
        return dict(form='two', target=(size, colour, _SINGULAR[plural]),
                    direction=m.group(4).split()[-1])
    m = _RE_AND.match(text)
    if m:
        return dict(form='and', target=_desc(*m.group(1, 2, 3)),
                    other=_desc(*m.group(4, 5, 6)))
    m = _RE_ORD.match(text)
    if m:
        return dict(form='ordinal', rank=_ORDINAL_NUM[m.group(1)],
                    target=_desc(*m.group(2, 3, 4)), direction=m.group(5))
    m = _RE_NOT_COLOUR.match(text)
    if m:
        return dict(form='not_colour', shape=m.group(1), colour=m.group(2))
    m = _RE_NOT_SHAPE.match(text)
    if m:
        return dict(form='not_shape', colour=m.group(1), shape=m.group(2))
    return parse_sentence(text)


def _group(objects: Sequence[SynthObject], desc: Desc) -> List[int]:
    return [i for i, o in enumerate(objects) if _matches(o, desc)]


def _ranked(objects: Sequence[SynthObject], group: List[int],
            direction: str) -> List[int]:
    """``group`` ordered from the ``direction`` side inwards."""
    return sorted(group, key=lambda i: -_coord(objects[i], direction))


def resolve_generalized(spec: dict, objects: Sequence[SynthObject],
                        margin: float) -> List[int]:
    """Sorted indices of the objects a parsed sentence names (empty: none;
    see the module docstring)."""
    form = spec.get('form')
    if form == 'all':
        return _group(objects, spec['target'])
    if form == 'two':
        ranked = _ranked(objects, _group(objects, spec['target']),
                         spec['direction'])
        return sorted(ranked[:2])
    if form == 'and':
        a = _group(objects, spec['target'])
        b = _group(objects, spec['other'])
        return sorted(set(a) | set(b))
    if form == 'ordinal':
        ranked = _ranked(objects, _group(objects, spec['target']),
                         spec['direction'])
        k = spec['rank']
        return [ranked[k - 1]] if len(ranked) >= k else []
    if form == 'not_colour':
        return [i for i, o in enumerate(objects)
                if o.shape == spec['shape'] and o.colour != spec['colour']]
    if form == 'not_shape':
        return [i for i, o in enumerate(objects)
                if o.colour == spec['colour'] and o.shape != spec['shape']]
    if form == 'none':
        return _group(objects, spec['target'])
    return sorted(resolve(spec, objects, margin))


# -------------------------------------------------------------- candidates
def _descs_of(objects: Sequence[SynthObject]) -> List[Desc]:
    """Every description (size / colour / shape words, each optional) of
    any object, without the empty one; in a fixed order."""
    seen: Dict[Desc, None] = {}
    for o in objects:
        for size in (None, o.size):
            for colour in (None, o.colour):
                for shape in (None, o.shape):
                    d = (size, colour, shape)
                    if d != (None, None, None):
                        seen.setdefault(d, None)
    return list(seen)


def _separated(objects: Sequence[SynthObject], ranked: List[int],
               direction: str, k: int, margin: float) -> bool:
    """The k-th of ``ranked`` (1-based) lies more than ``margin`` from its
    neighbours in the ranking, so counting cannot go wrong."""
    key = [_coord(objects[i], direction) for i in ranked]
    before = k < 2 or key[k - 2] - key[k - 1] > margin
    after = k >= len(key) or key[k - 1] - key[k] > margin
    return before and after


def _single_candidates(t: int, objects: Sequence[SynthObject],
                       margin: float) -> Dict[str, List[dict]]:
    """Sentences of every single-target kind that name exactly object t."""
    out = _candidates(t, objects, margin)
    out['ordinal'], out['negation'] = [], []
    target = objects[t]
    for d in _descs_of([target]):
        group = _group(objects, d)
        if len(group) < 3:
            continue
        for direction in DIRECTIONS:
            ranked = _ranked(objects, group, direction)
            k = ranked.index(t) + 1
            if k in ORDINALS and _separated(objects, ranked, direction, k,
                                            margin):
                out['ordinal'].append(dict(
                    kind='ordinal', form='ordinal', rank=k, target=d,
                    direction=direction))
    for colour in COLOURS:
        spec = dict(kind='negation', form='not_colour', shape=target.shape,
                    colour=colour)
        needed = any(o.shape == target.shape and o.colour == colour
                     for o in objects)
        if needed and resolve_generalized(spec, objects, margin) == [t]:
            out['negation'].append(spec)
    for shape in SHAPES:
        spec = dict(kind='negation', form='not_shape', colour=target.colour,
                    shape=shape)
        needed = any(o.colour == target.colour and o.shape == shape
                     for o in objects)
        if needed and resolve_generalized(spec, objects, margin) == [t]:
            out['negation'].append(spec)
    return out


def _multi_candidates(objects: Sequence[SynthObject], margin: float
                      ) -> Dict[FrozenSet[int], List[dict]]:
    """Multi-target sentences, grouped by the set of objects they name."""
    out: Dict[FrozenSet[int], List[dict]] = {}

    def add(spec: dict, targets: List[int]) -> None:
        out.setdefault(frozenset(targets), []).append(spec)

    descs = _descs_of(objects)
    for d in descs:
        group = _group(objects, d)
        if len(group) >= 2:
            add(dict(kind='multi', form='all', target=d), group)
        if len(group) >= 3:
            for direction in DIRECTIONS:
                ranked = _ranked(objects, group, direction)
                gap = (_coord(objects[ranked[1]], direction) -
                       _coord(objects[ranked[2]], direction))
                if gap > margin:
                    add(dict(kind='multi', form='two', target=d,
                             direction=direction), sorted(ranked[:2]))
    unique = {}
    for d in descs:
        group = _group(objects, d)
        if len(group) == 1 and (d[1] is not None or d[2] is not None):
            unique.setdefault(group[0], d)
    ids = sorted(unique)
    for a_pos, a in enumerate(ids):
        for b in ids[a_pos + 1:]:
            add(dict(kind='multi', form='and', target=unique[a],
                     other=unique[b]), [a, b])
    return out


def _no_target_candidates(objects: Sequence[SynthObject]) -> List[dict]:
    """Descriptions that fit no object: colour + shape (with or without a
    size) whose words occur in the image, else any absent colour + shape."""
    colours = sorted({o.colour for o in objects})
    shapes = sorted({o.shape for o in objects})
    out = []
    for colour in colours:
        for shape in shapes:
            for size in (None, ) + SIZES:
                d = (size, colour, shape)
                if not _group(objects, d):
                    out.append(dict(kind='no_target', form='none', target=d))
    if not out:
        for colour in COLOURS:
            for shape in SHAPES:
                d = (None, colour, shape)
                if not _group(objects, d):
                    out.append(dict(kind='no_target', form='none', target=d))
    return out


# ------------------------------------------------------------------ writer
def _sentences(chosen: List[dict], objects: Sequence[SynthObject],
               targets: List[int], margin: float, image_id: int,
               first_sent_id: int) -> List[dict]:
    """Sentence records, each checked from its text alone: its rule must
    name exactly ``targets``."""
    out = []
    for k, spec in enumerate(chosen):
        text = spec['text']
        got = resolve_generalized(parse_generalized(text), objects, margin)
        if got != sorted(targets):
            raise RuntimeError(
                f'generator bug: {text!r} names {got} in image {image_id}, '
                f'not {sorted(targets)}')
        out.append(dict(tokens=text.split(), raw=text, sent=text,
                        sent_id=first_sent_id + k, kind=spec['kind']))
    return out


def _image_refs(rng: np.random.Generator, objects: List[SynthObject],
                cfg: GresSynthConfig, margin: float
                ) -> List[Tuple[List[int], List[dict]]]:
    """(target indices, chosen specs) of the refs of one image."""
    refs: List[Tuple[List[int], List[dict]]] = []
    lo, hi = cfg.single_refs_per_image
    n_single = int(rng.integers(lo, hi + 1))
    for t in rng.permutation(len(objects)):
        if len(refs) >= n_single:
            break
        t = int(t)
        lo_s, hi_s = cfg.sentences_per_ref
        chosen = _pick_sentences(
            rng, _single_candidates(t, objects, margin),
            int(rng.integers(lo_s, hi_s + 1)), render=render_generalized)
        if len(chosen) >= lo_s:
            refs.append(([t], chosen))
    lo_g, hi_g = cfg.sentences_per_group_ref
    multi = _multi_candidates(objects, margin)
    if multi and rng.random() < cfg.multi_ref_prob:
        keys = sorted(multi, key=sorted)
        targets = keys[int(rng.integers(len(keys)))]
        chosen = _pick_sentences(rng, {'multi': multi[targets]},
                                 int(rng.integers(lo_g, hi_g + 1)),
                                 render=render_generalized)
        refs.append((sorted(targets), chosen))
    if rng.random() < cfg.no_target_ref_prob:
        chosen = _pick_sentences(rng,
                                 {'no_target': _no_target_candidates(objects)},
                                 int(rng.integers(lo_g, hi_g + 1)),
                                 render=render_generalized)
        if chosen:
            refs.append(([], chosen))
    return refs


def generate_grefer_set(out_dir: str,
                        num_images: int = 1000,
                        img_size: int = 112,
                        seed: int = 0,
                        progress: bool = True,
                        cfg: Optional[GresSynthConfig] = None
                        ) -> Dict[str, int]:
    """Write the generalized set under ``out_dir`` (see the module
    docstring).

    Returns:
        dict: counts ``images``, ``annotations``, ``refs``, ``sentences``,
        ``sentences_<kind>`` and ``refs_<split>`` / ``sentences_<split>``.
    """
    from PIL import Image

    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    cfg = cfg or GresSynthConfig()
    cfg = GresSynthConfig(**{**cfg.__dict__, 'img_size': int(img_size)})
    if cfg.img_size < 32:
        raise ValueError(f'img_size must be >= 32, got {cfg.img_size}')
    margin = cfg.margin_frac * cfg.img_size
    ann_dir = osp.join(out_dir, 'grefcoco')
    img_dir = osp.join(out_dir, 'images', 'train2014')
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
        # a stream apart from the RefCOCO-layout set's (seed, index)
        rng = np.random.default_rng([seed, index, 1])
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
            ann = _annotation(obj, ann_id, image_id)
            ann['attributes'].update(cx=obj.cx, cy=obj.cy)
            annotations.append(ann)
        for targets, chosen in _image_refs(rng, objects, cfg, margin):
            sentences = _sentences(chosen, objects, targets, margin,
                                   image_id, sent_id)
            sent_id += len(sentences)
            refs.append(dict(
                ref_id=ref_id, image_id=image_id, split=splits[index],
                ann_id=[obj_ann_ids[t] for t in targets] or [-1],
                category_id=[_CAT_ID[objects[t].shape] for t in targets],
                sent_ids=[s['sent_id'] for s in sentences],
                sentences=sentences))
            ref_id += 1
        if bar is not None:
            bar.update()
    if bar is not None:
        print()

    instances = dict(
        info=dict(description='mmseg_sera generalized synthetic referring '
                  'set', seed=seed, img_size=cfg.img_size,
                  num_images=num_images, margin=margin),
        images=images, annotations=annotations, categories=CATEGORIES)
    with open(osp.join(ann_dir, 'instances.json'), 'w') as f:
        json.dump(instances, f)
    with open(osp.join(ann_dir, 'grefs(unc).json'), 'w') as f:
        json.dump(refs, f)

    all_sents = [s for r in refs for s in r['sentences']]
    summary = dict(images=len(images), annotations=len(annotations),
                   refs=len(refs), sentences=len(all_sents))
    for kind in GRES_KINDS:
        summary[f'sentences_{kind}'] = sum(s['kind'] == kind
                                           for s in all_sents)
    for name in ('train', 'val', 'testA', 'testB'):
        sub = [r for r in refs if r['split'] == name]
        summary[f'refs_{name}'] = len(sub)
        summary[f'sentences_{name}'] = sum(len(r['sentences']) for r in sub)
    return summary
