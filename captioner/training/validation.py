"""Validation and test scores of a run: the captions each process generated in an epoch, gathered
across processes at its end, and scored against the split's references."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.data.vocab import PAD_ID, Vocabulary
from captioner.models.decoder import DecoderOutput

if TYPE_CHECKING:
    import lightning as L

logger = logging.getLogger(__name__)


def teacher_forced_ce(out: DecoderOutput, captions: Tensor) -> Tensor:
    """The mean cross-entropy per word of a teacher-forced ``out`` of ``captions`` (B, L): how well
    the model predicts the references, next to how well its own captions score."""
    mask = out.mask  # (B, T)
    return F.cross_entropy(out.logits.float()[mask], captions[:, 1:][mask])


class EpochCaptions:
    """The captions one process generated in a validation or test epoch."""

    def __init__(self) -> None:
        self._batches: list[tuple[Tensor, Tensor]] = []  # (image ids (B,), tokens (B, max_length))

    def add(self, image_ids: Tensor, tokens: Tensor, max_length: int) -> None:
        """A batch's ``tokens`` (B, T <= max_length), padded to ``max_length`` so that every
        process gathers tensors of one shape."""
        padded = torch.full((tokens.size(0), max_length), PAD_ID, dtype=torch.long, device=tokens.device)
        padded[:, : tokens.size(1)] = tokens
        self._batches.append((image_ids, padded))

    def gather(self, module: L.LightningModule, vocab: Vocabulary, max_length: int) -> dict[int, str]:
        """Every process's captions, each image once (the distributed sampler pads with repeats);
        the epoch's list starts afresh."""
        if not self._batches:
            ids = torch.zeros(0, dtype=torch.long, device=module.device)
            toks = torch.zeros(0, max_length, dtype=torch.long, device=module.device)
        else:
            ids = torch.cat([b[0] for b in self._batches])
            toks = torch.cat([b[1] for b in self._batches])
        self._batches.clear()
        if module.trainer.world_size > 1:
            ids = module.all_gather(ids).reshape(-1)
            toks = module.all_gather(toks).reshape(-1, toks.size(-1))
        preds: dict[int, str] = {}
        for i, row in zip(ids.tolist(), toks.tolist()):
            preds.setdefault(i, " ".join(vocab.decode(row)))
        return preds


def score_epoch(preds: dict[int, str], datamodule: object | None, split: str, stage: str) -> dict[str, float]:
    """CIDEr-D, BLEU-4 and exact match of ``preds`` on the images of ``split`` ("val", "test") that
    the data module has references for, logged as ``stage``; empty when there are none."""
    from captioner.data.tokenizers import get_tokenizer
    from captioner.metrics import exact_match, validation_scores

    refs = datamodule.references(split) if datamodule is not None and hasattr(datamodule, "references") else None
    if not refs:
        return {}
    preds = {i: p for i, p in preds.items() if i in refs}
    if not preds:
        return {}
    refs = {i: refs[i] for i in preds}
    scores = validation_scores(preds, refs)
    tokenizer = get_tokenizer(getattr(datamodule, "tokenizer_name", "simple"))
    exact = exact_match(preds, {i: [r.split() for r in rs] for i, rs in refs.items()}, tokenize=tokenizer.tokenize)
    logger.info("%s: CIDEr-D %.3f  BLEU-4 %.3f  exact %.3f on %d images", stage,
                scores["CIDEr"], scores["Bleu_4"], exact, len(preds))
    for i in sorted(preds)[:3]:  # a glimpse of what the numbers mean
        logger.info("  %s: %r (reference: %r)", i, preds[i], refs[i][0])
    return {"CIDEr": float(scores["CIDEr"]), "Bleu_4": float(scores["Bleu_4"]), "exact_match": float(exact)}
