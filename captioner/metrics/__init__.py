"""Caption metrics (pycocoevalcap, exact match) and attention grounding metrics, and their tables."""

from captioner.metrics.attention_correctness import (
    attention_correctness,
    evaluate_grounding,
    format_grounding_table,
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
from captioner.metrics.tables import markdown_table, percent

__all__ = [
    "METRIC_KEYS",
    "EvalResult",
    "attention_correctness",
    "check_ids",
    "evaluate_grounding",
    "exact_match",
    "format_grounding_table",
    "format_table",
    "markdown_table",
    "nltk_corpus_bleu4",
    "percent",
    "pointing_hit",
    "python_tokenize_caption",
    "score_captions",
    "upsample_attention",
    "validation_scores",
]
