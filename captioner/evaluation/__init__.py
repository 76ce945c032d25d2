"""Evaluation the way the field reports it: caption a split once per image, score with COCOEvalCap.

Two entry points, one scoring path (:mod:`~captioner.evaluation.scoring`):

- :func:`evaluate_checkpoint` captions a data set split with a trained model
  (:mod:`~captioner.evaluation.captioning`: batched decoding, every image once, not once per
  reference) and scores the captions against *all* raw references with
  :func:`captioner.metrics.score_captions`; on ``shapes`` it adds attention grounding
  (:mod:`~captioner.evaluation.grounding`).
- :func:`evaluate_predictions` scores any model's COCO results file
  (``[{"image_id": int, "caption": str}, ...]``) against a Karpathy split file or a COCO caption
  annotation file (:mod:`~captioner.evaluation.references`).

Both return an :class:`Evaluation`; :meth:`Evaluation.to_json` is the metrics file (COCOEvalCap
keys on their 0–1 scale, flat) and :func:`write_report` (:mod:`~captioner.evaluation.report`) a
folder with a markdown summary, the validation curves of the run and attention figures of the
best and worst images.
"""

from captioner.evaluation.captioning import caption_records, results_json
from captioner.evaluation.grounding import grounding_file, score_grounding
from captioner.evaluation.references import (
    ImageIdMismatch,
    References,
    ResultsFormatError,
    align_ids,
    coco_annotation_references,
    karpathy_references,
    load_results,
    references_from_records,
)
from captioner.evaluation.report import find_metrics_csv, read_curves, write_report
from captioner.evaluation.scoring import Evaluation, evaluate_checkpoint, evaluate_predictions

__all__ = [
    "Evaluation", "ImageIdMismatch", "References", "ResultsFormatError",
    "align_ids", "caption_records", "coco_annotation_references", "evaluate_checkpoint",
    "evaluate_predictions", "find_metrics_csv", "grounding_file", "karpathy_references",
    "load_results", "read_curves", "references_from_records", "results_json", "score_grounding",
    "write_report",
]


def __getattr__(name: str):
    if name == "GeneratedCaption":  # deprecated: captioner.inference.Caption
        from captioner.evaluation import captioning

        return getattr(captioning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
