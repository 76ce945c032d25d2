"""Caption metrics (pycocoevalcap, exact match) and attention grounding metrics."""

from captioner.metrics.attention_correctness import (
    attention_correctness,
    evaluate_grounding,
    pointing_hit,
    upsample_attention,
)
from captioner.metrics.coco_eval import (
    METRIC_KEYS,
    EvalResult,
    check_ids,
    format_table,
    nltk_corpus_bleu4,
    python_tokenize_caption,
    score_captions,
    validation_scores,
)
from captioner.metrics.exact_match import exact_match

__all__ = [
    "METRIC_KEYS",
    "EvalResult",
    "attention_correctness",
    "check_ids",
    "evaluate_grounding",
    "exact_match",
    "format_table",
    "nltk_corpus_bleu4",
    "pointing_hit",
    "python_tokenize_caption",
    "score_captions",
    "upsample_attention",
    "validation_scores",
]
