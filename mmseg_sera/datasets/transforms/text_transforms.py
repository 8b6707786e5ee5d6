"""Sentence handling: cleaning (once, at index time), choosing one of an
object's sentences per draw, and swapping left/right words for flips."""
import re
from typing import Dict, Optional

import numpy as np
from mmcv.transforms import BaseTransform

from mmseg.registry import TRANSFORMS

__all__ = ['clean_sentence', 'swap_left_right', 'SelectSentence']


def clean_sentence(text: str) -> str:
    """Lower-case and collapse runs of whitespace to single spaces.

    This is the single place where sentences are normalised; the dataset
    applies it when it builds its index, so every pipeline sees the same
    text.  Punctuation and word order are left alone.

    >>> clean_sentence('  The  LEFT\\tman\\n')
    'the left man'
    """
    return ' '.join(str(text).lower().split())


# Whole words only: 'left' but not 'leftover'.  Keys are lower case.
_LR_SWAP = {
    'left': 'right', 'right': 'left',
    'leftmost': 'rightmost', 'rightmost': 'leftmost',
}
_LR_PATTERN = re.compile(r'\b(' + '|'.join(sorted(_LR_SWAP, key=len,
                                                  reverse=True)) + r')\b',
                         flags=re.IGNORECASE)


def _match_case(word: str, template: str) -> str:
    if template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_left_right(text: str) -> str:
    """Swap the words ``left``/``right`` (and ``leftmost``/``rightmost``) as
    whole words, case-insensitively, keeping the case of each occurrence.

    >>> swap_left_right('the Left dog, right of the leftover cake')
    'the Right dog, left of the leftover cake'
    """
    return _LR_PATTERN.sub(
        lambda m: _match_case(_LR_SWAP[m.group(0).lower()], m.group(0)), text)


@TRANSFORMS.register_module()
class SelectSentence(BaseTransform):
    """Pick the sentence of this draw from the object's sentences.

    The dataset stores every sentence of a referred object in
    ``results['sentences']`` (with ``'sent_ids'`` and, when known,
    ``'sentence_kinds'``).  In per-sentence mode (testing) these lists hold
    one element.  The draw uses :mod:`numpy.random`, which MMEngine seeds per
    dataloader worker, so a seeded run is reproducible.

    Required keys: ``sentences``, ``sent_ids`` (optional ``sentence_kinds``).
    Added keys: ``text`` (str), ``sent_id`` (int), ``kind`` (str, when the
    dataset has sentence kinds).

    If ``sentences`` is absent but ``text`` is present (inference on a
    user-given sentence) the transform leaves the results unchanged.

    Args:
        mode (str): ``'random'`` (uniform over the sentences, every draw) or
            ``'first'`` (always the first one). Default: ``'random'``.
        fixed_text (str, optional): if given, ``text`` is this sentence for
            every sample (``sent_id`` and ``kind`` still name the drawn
            one): the text-blind control, which shows how far the image
            alone gets.
    """

    def __init__(self, mode: str = 'random',
                 fixed_text: Optional[str] = None) -> None:
        if mode not in ('random', 'first'):
            raise ValueError(
                "SelectSentence mode must be 'random' or 'first', got "
                f'{mode!r}')
        if fixed_text is not None and not fixed_text.strip():
            raise ValueError('SelectSentence fixed_text must be a non-empty '
                             'sentence')
        self.mode = mode
        self.fixed_text = fixed_text

    def transform(self, results: Dict) -> Dict:
        sentences = results.get('sentences')
        if sentences is None:
            if 'text' in results:
                return results
            raise KeyError(
                "SelectSentence needs 'sentences' (from RefCocoDataset) or "
                f"'text' in the results; got keys {sorted(results)}")
        if len(sentences) == 0:
            raise ValueError(
                f'no sentence left for ref_id={results.get("ref_id")} '
                f'(ann_id={results.get("ann_id")})')
        if self.mode == 'random' and len(sentences) > 1:
            idx = int(np.random.randint(len(sentences)))
        else:
            idx = 0
        results['text'] = sentences[idx]
        sent_ids = results.get('sent_ids')
        if sent_ids is not None:
            results['sent_id'] = sent_ids[idx]
        kinds: Optional[list] = results.get('sentence_kinds')
        if kinds:
            results['kind'] = kinds[idx]
        if self.fixed_text is not None:
            results['text'] = self.fixed_text
        return results

    def __repr__(self) -> str:
        fixed = ('' if self.fixed_text is None else
                 f', fixed_text={self.fixed_text!r}')
        return f'{self.__class__.__name__}(mode={self.mode!r}{fixed})'
