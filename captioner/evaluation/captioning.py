"""Captioning a split for evaluation: every image once, batched, in the records' order."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from captioner.data.images import ImageLoadError
from captioner.data.records import ImageRecord
from captioner.inference import Caption, CaptionPipeline

logger = logging.getLogger(__name__)


def caption_records(
    pipeline: CaptionPipeline,
    records: Sequence[ImageRecord],
    batch_size: int = 32,
    num_workers: int = 0,
    keep_attention: bool = True,
    skip_bad_images: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[Caption]:
    """Caption every record once, in batches, in the records' order, through the pipeline's
    stream (``num_workers`` reader threads; JPEGs decoded by PIL, as the data module reads them).
    Each caption's ``image`` is its record's image id.

    ``on_batch(n)`` is called with the number of images of each finished batch (progress bars).
    With ``skip_bad_images`` unreadable images are left out (logged), otherwise they raise.
    """
    out: list[Caption] = []
    in_batch = 0
    for rec, result in zip(records, pipeline.stream([r.path for r in records], batch_size=batch_size,
                                                   num_workers=num_workers, jpeg_decode="cpu")):
        if isinstance(result, list):
            cap = result[0]
            cap.image = rec.image_id
            if not keep_attention:
                cap.alphas = None
            out.append(cap)
        elif skip_bad_images:
            logger.warning("skipping %s", ImageLoadError(rec.path, result.reason))
        else:
            raise ImageLoadError(rec.path, f"{result.reason} (run `captioner data check` first, or set "
                                 "`data.skip_bad_images: true` to skip such files)")
        in_batch += 1
        if in_batch == batch_size and on_batch is not None:
            on_batch(in_batch)
            in_batch = 0
    if in_batch and on_batch is not None:
        on_batch(in_batch)
    return out


def results_json(captions: Iterable[Caption]) -> list[dict[str, Any]]:
    """The COCO results format: ``[{"image_id": int, "caption": str}, ...]`` (the words joined by
    spaces, as the scorers split them)."""
    return [{"image_id": int(c.image), "caption": " ".join(c.words)} for c in captions]


def __getattr__(name: str):
    if name == "GeneratedCaption":  # before one Caption (issue 30)
        warnings.warn("captioner.evaluation.GeneratedCaption is deprecated; use captioner.inference.Caption "
                      "(its image id is .image)", DeprecationWarning, stacklevel=2)
        return Caption
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["caption_records", "results_json"]
