"""Captioning a split for evaluation: every image once, batched, in the records' order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from captioner.data.datamodule import CaptionDataset, collate_captions
from captioner.data.records import ImageRecord
from captioner.inference import CaptionPipeline


@dataclass
class GeneratedCaption:
    image_id: int
    words: list[str]
    score: float
    alphas: Tensor | None  # (T, h, w), one map per word; None when not kept

    @property
    def text(self) -> str:
        return " ".join(self.words)


def caption_records(
    pipeline: CaptionPipeline,
    records: Sequence[ImageRecord],
    batch_size: int = 32,
    num_workers: int = 0,
    keep_attention: bool = True,
    skip_bad_images: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[GeneratedCaption]:
    """Caption every record once, in batches, in the records' order.

    ``on_batch(n)`` is called with the number of images of each finished batch (progress bars).
    With ``skip_bad_images`` unreadable images are left out (logged), otherwise they raise.
    """
    vocab = pipeline.loaded.vocab
    # mode="first": one item per image (its first reference only feeds the unused caption tensor).
    dataset = CaptionDataset(records, vocab, pipeline.loaded.preprocessing, mode="first",
                             skip_bad_images=skip_bad_images)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_captions)
    out: list[GeneratedCaption] = []
    for batch in loader:
        if not batch:  # every image of the batch was unreadable and skipped
            continue
        caps = pipeline.caption_tensors(batch["images"])  # images (B, 3, S, S)
        for image_id, cap in zip(batch["image_ids"].tolist(), caps):
            out.append(GeneratedCaption(int(image_id), cap.words, cap.score,
                                        cap.alphas if keep_attention else None))
        if on_batch is not None:
            on_batch(len(caps))
    return out


def results_json(captions: Iterable[GeneratedCaption]) -> list[dict[str, Any]]:
    """The COCO results format: ``[{"image_id": int, "caption": str}, ...]``."""
    return [{"image_id": int(c.image_id), "caption": c.text} for c in captions]


__all__ = ["GeneratedCaption", "caption_records", "results_json"]
