"""Attention correctness and the pointing game (Liu et al. 2017), and grounding on ``shapes``.

A word's attention map lives on the encoder's grid (e.g. 14x14). To compare it with a pixel mask
it is upsampled to the mask's size with bilinear interpolation (what the attention visualiser
shows), negatives are clipped and the map is renormalised to sum 1. *Attention correctness* is the
mass inside the region; the *pointing game* asks whether the map's maximum lies inside it.

Bilinear upsampling spreads a grid cell's mass half a cell into its neighbours, so mass on cells
that touch the region's edge partly lands outside it; ``mode="nearest"`` gives each cell's mass
exactly to its own pixels instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from captioner.data.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    match_mentions,
    object_mask,
    parse_caption,
    relation_holds,
)

ArrayLike = np.ndarray | torch.Tensor
WORD_CLASSES = ("colour", "size", "shape")
# Pixels upsampled per chunk in evaluate_grounding (float64: 32 MiB), bounding memory.
_CHUNK_PIXELS = 1 << 22


def _as_tensor(x: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=dtype)
    arr = np.asarray(x)
    if not arr.flags.writeable:  # torch warns on read-only buffers (e.g. memory-mapped .npy)
        arr = arr.copy()
    return torch.from_numpy(arr).to(dtype=dtype)


def upsample_attention(
    alpha: ArrayLike, size: int | tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Upsample grid attention ``(..., h, w)`` to ``(..., H, W)``, clip negatives, renormalise.

    Each map sums to 1 afterwards; a map with no positive mass becomes uniform (it says nothing
    about where the model looked). Float64 on the CPU.
    """
    a = _as_tensor(alpha, torch.float64)
    assert a.dim() >= 2, f"attention must be (..., h, w), got shape {tuple(a.shape)}"
    lead, (h, w) = a.shape[:-2], a.shape[-2:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    up = F.interpolate(a.reshape(-1, 1, h, w), size=size, mode=mode, **kwargs)  # (B, 1, H, W)
    up = up.squeeze(1).clamp_min(0.0)  # bicubic can overshoot below zero
    total = up.sum(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    uniform = torch.full_like(up, 1.0 / (size[0] * size[1]))
    up = torch.where(total > 0, up / total.clamp_min(torch.finfo(up.dtype).tiny), uniform)
    return up.reshape(*lead, *size)


def _score_batch(
    maps: torch.Tensor, masks: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and pointing hits of ``maps`` (B, h, w) against ``masks`` (B, H, W)."""
    up = upsample_attention(maps, tuple(masks.shape[-2:]), mode=mode)  # (B, H, W)
    correctness = (up * masks).sum(dim=(1, 2))  # (B,)
    peak = up.flatten(1).argmax(dim=1)  # (B,) first maximum in row-major order
    hits = masks.flatten(1).gather(1, peak[:, None]).squeeze(1)  # (B,)
    return correctness, hits


def _check_pair(alpha: torch.Tensor, mask: torch.Tensor) -> None:
    if alpha.dim() != 2 or mask.dim() != 2:
        raise ValueError(f"expected an (h, w) attention map and an (H, W) mask, got "
                         f"{tuple(alpha.shape)} and {tuple(mask.shape)}")


def attention_correctness(alpha: ArrayLike, mask: ArrayLike, mode: str = "bilinear") -> float:
    """Share of the upsampled, renormalised attention ``alpha`` (h, w) inside ``mask`` (H, W)."""
    a, m = _as_tensor(alpha, torch.float64), _as_tensor(mask, torch.bool)
    _check_pair(a, m)
    correctness, _ = _score_batch(a[None], m[None], mode)
    return float(correctness[0])


def pointing_hit(alpha: ArrayLike, mask: ArrayLike, mode: str = "bilinear") -> bool:
    """Whether the maximum of the upsampled attention ``alpha`` (h, w) lies inside ``mask``
    (H, W). Ties go to the first maximum in row-major order."""
    a, m = _as_tensor(alpha, torch.float64), _as_tensor(mask, torch.bool)
    _check_pair(a, m)
    _, hits = _score_batch(a[None], m[None], mode)
    return bool(hits[0])


_WORD_CLASS = {**{w: "colour" for w in COLOURS}, **{w: "size" for w in SIZES},
               **{w: "shape" for w in SHAPES}}


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def evaluate_grounding(
    samples: Iterable[Mapping[str, Any]],
    grounding: Mapping[str, Any],
    image_size: int | None = None,
    mode: str = "bilinear",
) -> dict[str, Any]:
    """Attention correctness, pointing game and caption grounding on the ``shapes`` data set.

    ``samples``: ``{"image_id", "tokens": generated words, "attention": (T, h, w)}`` with row ``t``
    the attention used to generate ``tokens[t]`` (``T >= len(tokens)``; extra rows, e.g. for
    ``<end>``, are ignored). ``grounding``: the ``grounding.json`` dict. Masks are rasterised at
    ``image_size`` (default: the data set's own size; the attention covers the whole image).

    Every size/colour/shape word of a mention that matches a scene object is scored against that
    object's mask. Object precision is the share of mentions matching a scene object, recall the
    share of scene objects mentioned, relation accuracy the share of stated relations between
    matched mentions that hold. Means over nothing are ``nan``.
    """
    native = int(grounding["image_size"])
    size = native if image_size is None else int(image_size)
    images = grounding["images"]

    mask_cache: dict[tuple[str, int], torch.Tensor] = {}

    def mask_of(key: str, k: int) -> torch.Tensor:
        if (key, k) not in mask_cache:
            m = torch.from_numpy(object_mask(images[key]["objects"][k], native))  # (H0, W0)
            if size != native:  # geometry is in native pixels; resize the mask, not the shape
                m = F.interpolate(m[None, None].double(), size=(size, size), mode="nearest")[0, 0] > 0.5
            mask_cache[(key, k)] = m
        return mask_cache[(key, k)]

    # Collect every grounded word first, then score them in a few batched interpolations.
    maps: list[torch.Tensor] = []
    word_masks: list[tuple[str, int]] = []
    classes: list[str] = []
    n_mentions = n_matched = n_objects = n_mentioned = n_relations = n_relations_hold = 0
    for sample in samples:
        key = str(sample["image_id"])
        if key not in images:
            raise ValueError(f"image {sample['image_id']!r} is not in the grounding file")
        objects = images[key]["objects"]
        tokens = list(sample["tokens"])
        attention = _as_tensor(sample["attention"], torch.float64)
        if attention.dim() != 3 or attention.shape[0] < len(tokens):
            raise ValueError(f"image {key}: attention must be (T >= {len(tokens)}, h, w), "
                             f"got {tuple(attention.shape)}")
        mentions, relations = parse_caption(tokens)
        matched = match_mentions(mentions, objects)
        n_mentions += len(mentions)
        n_matched += sum(k is not None for k in matched)
        n_objects += len(objects)
        n_mentioned += len({k for k in matched if k is not None})
        for i, relation, j in relations:
            a, b = matched[i], matched[j]
            if a is None or b is None:
                continue
            n_relations += 1
            n_relations_hold += relation_holds(objects[a], objects[b], relation)
        for mention, k in zip(mentions, matched):
            if k is None:
                continue
            for t in mention.tokens:
                maps.append(attention[t])
                word_masks.append((key, k))
                classes.append(_WORD_CLASS[tokens[t]])

    correctness = torch.zeros(len(maps), dtype=torch.float64)
    hits = torch.zeros(len(maps), dtype=torch.bool)
    if maps:
        grid = {tuple(m.shape) for m in maps}
        if len(grid) != 1:
            raise ValueError(f"attention grids differ between samples: {sorted(grid)}")
        chunk = max(1, _CHUNK_PIXELS // (size * size))
        for s in range(0, len(maps), chunk):
            batch = torch.stack(maps[s:s + chunk])  # (B, h, w)
            masks = torch.stack([mask_of(*wm) for wm in word_masks[s:s + chunk]])  # (B, H, W)
            correctness[s:s + chunk], hits[s:s + chunk] = _score_batch(batch, masks, mode)

    def summary(select: Sequence[bool] | None = None) -> dict[str, Any]:
        c, h = correctness, hits.double()
        if select is not None:
            sel = torch.tensor(select, dtype=torch.bool)
            c, h = c[sel], h[sel]
        n = int(c.numel())
        return {"attention_correctness": float(c.mean()) if n else math.nan,
                "pointing_game": float(h.mean()) if n else math.nan, "count": n}

    overall = summary()
    precision, recall = _ratio(n_matched, n_mentions), _ratio(n_mentioned, n_objects)
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "attention_correctness": overall["attention_correctness"],
        "pointing_game": overall["pointing_game"],
        "per_class": {cls: summary([c == cls for c in classes]) for cls in WORD_CLASSES},
        "grounded_words": overall["count"],
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": f1,
        "relation_accuracy": _ratio(n_relations_hold, n_relations),
        "relations": n_relations,
        "mentions": n_mentions,
        "objects": n_objects,
    }


__all__ = [
    "attention_correctness", "evaluate_grounding", "pointing_hit", "upsample_attention",
    "WORD_CLASSES",
]
