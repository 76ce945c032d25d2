"""Caption metrics of one set of captions: a checkpoint's captions of a split, or a results file.

Both entry points share one scoring path (:func:`captioner.metrics.score_captions` against *all*
raw references, plus :func:`captioner.metrics.exact_match`) and return an :class:`Evaluation`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from captioner.data.datamodule import CaptionDataModule
from captioner.data.records import ImageRecord
from captioner.data.tokenizers import get_tokenizer
from captioner.evaluation.captioning import caption_records
from captioner.evaluation.grounding import grounding_file, score_grounding
from captioner.evaluation.references import (
    References,
    align_ids,
    coco_annotation_references,
    karpathy_references,
    load_results,
    references_from_records,
)
from captioner.files import finite_json
from captioner.inference import Caption, CaptionPipeline
from captioner.metrics import EvalResult, exact_match, score_captions

logger = logging.getLogger(__name__)

NLTK_NOTE = ("nltk.translate.bleu_score.corpus_bleu on lower-cased whitespace tokens (the popular "
             "tutorial's BLEU-4): a different brevity penalty and no smoothing, not comparable "
             "with Bleu_4")
SCALE_NOTE = "0-1, as pycocoevalcap's COCOEvalCap reports them (CIDEr is CIDEr-D); tables print x100"


@dataclass
class Evaluation:
    """Scores of one set of captions, and what is needed to report them."""

    result: EvalResult
    predictions: dict[int, str]
    references: References
    exact_match: float
    settings: dict[str, Any] = field(default_factory=dict)
    grounding: dict[str, Any] | None = None
    captions: dict[int, Caption] = field(default_factory=dict)  # checkpoint mode
    records: dict[int, ImageRecord] = field(default_factory=dict)  # image paths, when known

    def to_json(self) -> dict[str, Any]:
        """The metrics file: COCOEvalCap keys (0–1) first, then how they were obtained."""
        r = self.result
        out: dict[str, Any] = dict(r.metrics)
        out.update({
            "scale": SCALE_NOTE,
            "tokenizer": r.tokenizer,
            "skipped": list(r.skipped),
            "skip_reasons": dict(r.skip_reasons),
            "nltk_corpus_bleu4": r.nltk_corpus_bleu4,
            "nltk_corpus_bleu4_note": NLTK_NOTE,
            "exact_match": self.exact_match,
            "num_images": r.num_images,
            **self.settings,
        })
        if self.grounding is not None:
            out.update(self.grounding)
        return finite_json(out)

    def per_image(self) -> list[dict[str, Any]]:
        """Caption, references and scores of every image, best CIDEr first."""
        return [{"image_id": k, "caption": self.predictions[k],
                 "references": self.references.raw[k], **self.result.per_image[k]}
                for k, _ in self.result.ranked("CIDEr")]


def _score(
    predictions: dict[int, str], references: References, meteor: bool, spice: bool,
    tokenizer: str = "simple",
) -> tuple[EvalResult, float]:
    result = score_captions(predictions, references.raw, spice=spice, meteor=meteor)
    if not meteor and "METEOR" not in result.skipped:
        result.skipped.append("METEOR")
        result.skip_reasons["METEOR"] = "disabled by the caller (meteor=False)"
    return result, exact_match(predictions, references.tokens, get_tokenizer(tokenizer).tokenize)


def evaluate_checkpoint(
    pipeline: CaptionPipeline,
    dm: CaptionDataModule,
    split: str = "test",
    batch_size: int | None = None,
    num_workers: int | None = None,
    meteor: bool = True,
    spice: bool = False,
    keep_attention: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Caption ``split`` of a data set once per image and score the captions against all its raw
    references. ``dm``: the data module, with the checkpoint's preprocessing.

    Decoding uses the checkpoint's vocabulary and preprocessing. ``batch_size``/``num_workers``
    default to the config's ``eval_batch_size``/``num_workers``. When the source has word-region
    grounding (``shapes``: a ``grounding.json`` beside the data) the attention maps are scored too; ``keep_attention``
    keeps every image's maps on the result (for figures).
    """
    tokenizer = dm.tokenizer_name
    if tokenizer != pipeline.loaded.tokenizer:
        raise ValueError(f"the checkpoint's captions are split with the {pipeline.loaded.tokenizer!r} "
                         f"tokenizer, the data's with {tokenizer!r}; score it on data made with the same one")
    records = dm.split_records(split)
    if not records:
        raise ValueError(f"split {split!r} of the data set has no images")
    grounding_path = grounding_file(dm)
    batch_size = batch_size or dm.eval_batch_size
    num_workers = dm.num_workers if num_workers is None else num_workers

    start = time.perf_counter()
    captions = caption_records(pipeline, records, batch_size, num_workers,
                               keep_attention=keep_attention or grounding_path is not None,
                               skip_bad_images=dm.skip_bad_images, on_batch=on_batch)
    seconds_captioning = time.perf_counter() - start
    logger.info("captioned %d %s images in %.1f s (beam %d, batch %d)", len(captions), split,
                seconds_captioning, pipeline.beam_size, batch_size)

    by_id = {c.image: c for c in captions}
    # with another tokenizer than `simple`, the words are scored (joined by spaces), not raw text
    references = references_from_records(records, f"{dm.dataset}:{split}",
                                         tokenized=tokenizer != "simple")
    if len(by_id) < len(records):
        logger.warning("%d of %d images could not be read and are not scored",
                       len(records) - len(by_id), len(records))
        references = references.subset([r.image_id for r in records if r.image_id in by_id])
    predictions = {k: " ".join(by_id[k].words) for k in references.raw}  # as the scorers split them
    result, exact = _score(predictions, references, meteor, spice, tokenizer)
    grounding = None if grounding_path is None else score_grounding(captions, grounding_path)

    settings = {
        "mode": "checkpoint",
        "checkpoint": str(pipeline.loaded.path),
        "dataset": dm.dataset,
        "split": split,
        "beam_size": pipeline.beam_size,
        "max_length": pipeline.max_length,
        "length_penalty": pipeline.length_penalty,
        "batch_size": batch_size,
        "device": str(pipeline.device),
        "quantize": pipeline.quantize,
        "images_not_read": len(records) - len(by_id),
        "seconds_captioning": round(seconds_captioning, 3),
        "seconds_scoring": round(result.seconds, 3),
    }
    if not keep_attention:
        for c in captions:
            c.alphas = None
    return Evaluation(result, predictions, references, exact, settings, grounding,
                      captions=by_id, records={r.image_id: r for r in records})


def evaluate_predictions(
    predictions_path: str | os.PathLike,
    references_path: str | os.PathLike | None = None,
    coco_annotations: str | os.PathLike | None = None,
    split: str = "test",
    allow_missing: bool = False,
    meteor: bool = True,
    spice: bool = False,
) -> Evaluation:
    """Score a COCO results file against a Karpathy split file's ``split`` (``references_path``)
    or a COCO caption annotation file (``coco_annotations``).

    Raises :class:`~captioner.evaluation.references.ResultsFormatError` for a malformed results
    file and :class:`~captioner.evaluation.references.ImageIdMismatch` when the image ids differ
    (unless ``allow_missing``: then the intersection is scored).
    """
    if (references_path is None) == (coco_annotations is None):
        raise ValueError("give exactly one of references_path and coco_annotations")
    predictions = load_results(predictions_path)
    if references_path is not None:
        references, records = karpathy_references(references_path, split)
    else:
        references, records = coco_annotation_references(coco_annotations)
    predictions, references, counts = align_ids(predictions, references, allow_missing)
    result, exact = _score(predictions, references, meteor, spice)
    settings: dict[str, Any] = {
        "mode": "predictions",
        "predictions": str(predictions_path),
        "references": str(references_path or coco_annotations),
        "split": split if references_path is not None else None,
        **counts,
        "seconds_scoring": round(result.seconds, 3),
    }
    return Evaluation(result, predictions, references, exact, settings,
                      records={r.image_id: r for r in records})


__all__ = ["Evaluation", "evaluate_checkpoint", "evaluate_predictions"]
