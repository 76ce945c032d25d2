"""Exact match: the share of generated captions that repeat one of their image's references.

One definition for the validation loop (``CaptioningSystem``) and ``captioner evaluate``: a
caption counts when its words (``tokenize``, by default :func:`captioner.data.vocab.tokenize`;
the data's tokenizer for other languages) equal one of the image's tokenised references.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

from captioner.data.vocab import tokenize


def exact_match(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[Sequence[str]]],
    tokenize: Callable[[str], list[str]] = tokenize,
) -> float:
    """Share of ``predictions`` (``{image_id: caption}``) whose words equal one of the image's
    tokenised references (``{image_id: [[word, ...], ...]}``); ``nan`` without predictions."""
    if not predictions:
        return math.nan
    hits = sum(tokenize(p) in [list(r) for r in references[k]] for k, p in predictions.items())
    return hits / len(predictions)


__all__ = ["exact_match"]
