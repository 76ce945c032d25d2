"""Attention correctness and the pointing game (Liu et al. 2017), and grounding on ``shapes``.

A word's attention map lives on the encoder's grid (e.g. 14x14). To compare it with a pixel mask
it is upsampled to the mask's size with bilinear interpolation (what the attention visualiser
shows), negatives are clipped and the map is renormalised to sum 1. *Attention correctness* is the
mass inside the region; the *pointing game* asks whether the map's maximum lies inside it.

Bilinear upsampling spreads a grid cell's mass half a cell into its neighbours, so mass on cells
that touch the region's edge partly lands outside it; ``mode="nearest"`` gives each cell's mass
exactly to its own pixels instead.

Nothing is upsampled per word: upsampling is linear, so the mass inside a mask is a dot product
of the grid map with the mask projected onto the grid (computed once per object), and the
maximum of an upsampled map can only lie on a few candidate pixels (see ``_peak_candidates``).
Both agree with an explicit ``F.interpolate`` (tested); ties in the pointing game go to the
first maximal pixel in row-major order, and a map without information (all zero, negative or
constant) points at pixel 0, as its uniform renormalisation would.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from captioner.data.grounding import axis_weights, interp_kwargs
from captioner.data.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    match_mentions,
    object_mask,
    parse_caption,
    relation_holds,
)
from captioner.metrics.tables import markdown_table, percent

ArrayLike = np.ndarray | torch.Tensor
WORD_CLASSES = ("colour", "size", "shape")
_MODES = ("bilinear", "nearest")
# Candidate pixels evaluated at once for the pointing game (float64: 32 MiB), bounding memory.
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
    up = F.interpolate(a.reshape(-1, 1, h, w), size=size, mode=mode, **interp_kwargs(mode))
    up = up.squeeze(1).clamp_min(0.0)  # (B, H, W); bicubic can overshoot below zero
    total = up.sum(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    uniform = torch.full_like(up, 1.0 / (size[0] * size[1]))
    up = torch.where(total > 0, up / total.clamp_min(torch.finfo(up.dtype).tiny), uniform)
    return up.reshape(*lead, *size)


class _Region:
    """A pixel mask prepared for scoring attention maps on an ``(h, w)`` grid.

    Upsampling is linear: ``up = U_h @ alpha @ U_w.T``. So the upsampled mass inside the mask is
    ``<alpha, U_h.T @ mask @ U_w>`` and the total mass ``<alpha, U_h.T @ 1 @ U_w>``: correctness
    needs one (h, w) dot product per word instead of an upsampled image per word.
    """

    def __init__(self, mask: np.ndarray, grid: tuple[int, int], mode: str) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        (h, w), (H, W) = grid, mask.shape
        u_h, u_w = axis_weights(h, H, mode), axis_weights(w, W, mode)  # (H, h), (W, w)
        # numpy: torch's float64 matmul spins up threads even for these tiny products.
        self.size = (H, W)
        self.flat = mask.reshape(-1)  # (H * W,) bool, for pointing lookups
        self.share = float(mask.mean())  # what a uniform map scores
        self.projection = u_h.T @ (mask.astype(np.float64) @ u_w)  # (h, w) mass sent inside
        self.cell_mass = np.outer(u_h.sum(0), u_w.sum(0))  # (h, w) mass each cell sends


def _correctness(maps: torch.Tensor, regions: Sequence[_Region], mode: str) -> np.ndarray:
    """Attention correctness of ``maps`` (B, h, w) float64, one region per map."""
    a = maps.numpy()
    proj = np.stack([r.projection for r in regions])  # (B, h, w)
    cell_mass = np.stack([r.cell_mass for r in regions])  # (B, h, w)
    inside = np.einsum("bhw,bhw->b", a, proj)  # (B,)
    total = np.einsum("bhw,bhw->b", a, cell_mass)  # (B,)
    shares = np.array([r.share for r in regions])
    out = np.where(total > 0, inside / np.where(total > 0, total, 1.0), shares)
    # Clipping negatives after upsampling is not linear: score such (rare) maps explicitly.
    for i in np.flatnonzero((a < 0).reshape(len(a), -1).any(axis=1)):
        up = upsample_attention(maps[i], regions[i].size, mode).reshape(-1).numpy()  # (H * W,)
        out[i] = up[regions[i].flat].sum()
    return out


@functools.lru_cache(maxsize=32)
def _peak_candidates(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Output pixels along one axis where an upsampled map's first maximum can lie.

    The rows of ``U`` are piecewise affine in the pixel index, so on a product of a row piece
    and a column piece the upsampled map is bilinear and its row-major-first maximum sits on a
    corner of the piece: a pixel where ``U`` bends, or an end of the axis.
    """
    u = axis_weights(n_in, n_out, mode)  # (n_out, n_in)
    bends = np.abs(u[:-2] - 2 * u[1:-1] + u[2:]).max(axis=1, initial=0.0) > 1e-9  # (n_out - 2,)
    candidates = np.unique(np.concatenate([[0, n_out - 1], np.flatnonzero(bends) + 1]))
    # Pixels with identical weights (a plateau: clamped border, nearest runs) have identical
    # values; keep the first so that rounding cannot break the tie differently.
    keep = [True] + [not np.array_equal(u[a], u[b]) for a, b in itertools.pairwise(candidates)]
    return candidates[keep]


def _pointing(maps: torch.Tensor, regions: Sequence[_Region], mode: str) -> np.ndarray:
    """Whether the upsampled maximum of each map (B, h, w) lies in its region.

    Evaluates the upsampled maps only at the candidate pixels of ``_peak_candidates`` (a few
    percent of the image), which finds the same first maximum as a full upsampling.
    """
    a = maps.numpy()  # (B, h, w)
    (h, w), (H, W) = a.shape[1:], regions[0].size
    rows, cols = _peak_candidates(h, H, mode), _peak_candidates(w, W, mode)
    u_rows = axis_weights(h, H, mode)[rows]  # (R, h)
    u_cols_t = axis_weights(w, W, mode)[cols].T  # (w, C)
    chunk = max(1, _CHUNK_PIXELS // (len(rows) * len(cols)))
    hits = np.zeros(len(a), dtype=bool)
    for s in range(0, len(a), chunk):
        values = (u_rows @ a[s:s + chunk] @ u_cols_t).reshape(-1, len(rows) * len(cols))
        best = values.argmax(axis=1)  # (b,) first maximum in row-major order
        # Clipping negatives leaves a positive maximum in place; a map without one, or a
        # constant map, is uniform after renormalising: its first maximum is pixel 0.
        grid = a[s:s + chunk].reshape(len(best), -1)
        informative = (values[np.arange(len(best)), best] > 0) & (grid.max(1) > grid.min(1))
        pixel = np.where(informative, rows[best // len(cols)] * W + cols[best % len(cols)], 0)
        hits[s:s + chunk] = [r.flat[p] for r, p in zip(regions[s:s + chunk], pixel.tolist())]
    return hits


def _prepare(alpha: ArrayLike, mask: ArrayLike, mode: str) -> tuple[torch.Tensor, _Region]:
    a = _as_tensor(alpha, torch.float64)
    m = mask.numpy(force=True) if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if a.dim() != 2 or m.ndim != 2:
        raise ValueError(f"expected an (h, w) attention map and an (H, W) mask, got "
                         f"{tuple(a.shape)} and {m.shape}")
    return a[None], _Region(m.astype(bool), tuple(a.shape), mode)


def attention_correctness(alpha: ArrayLike, mask: ArrayLike, mode: str = "bilinear") -> float:
    """Share of the upsampled, renormalised attention ``alpha`` (h, w) inside ``mask`` (H, W)."""
    a, region = _prepare(alpha, mask, mode)
    return float(_correctness(a, [region], mode)[0])


def pointing_hit(alpha: ArrayLike, mask: ArrayLike, mode: str = "bilinear") -> bool:
    """Whether the maximum of the upsampled attention ``alpha`` (h, w) lies inside ``mask``
    (H, W). Ties go to the first maximum in row-major order."""
    a, region = _prepare(alpha, mask, mode)
    return bool(_pointing(a, [region], mode)[0])


_WORD_CLASS = {**{w: "colour" for w in COLOURS}, **{w: "size" for w in SIZES},
               **{w: "shape" for w in SHAPES}}


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _single_cell_best(regions: Sequence[_Region]) -> np.ndarray:
    """For each region, the highest correctness any one-cell map reaches: all mass on cell i
    scores ``projection[i] / cell_mass[i]`` (the region's share where a cell sends no mass)."""
    return np.array([np.where(r.cell_mass > 0, r.projection / np.where(r.cell_mass > 0, r.cell_mass, 1.0),
                              r.share).max() for r in regions])


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
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    native = int(grounding["image_size"])
    size = native if image_size is None else int(image_size)
    images = grounding["images"]

    def mask_of(key: str, k: int) -> np.ndarray:
        m = object_mask(images[key]["objects"][k], native)  # (H0, W0)
        if size != native:  # geometry is in native pixels: resize the mask (nearest), not it
            src = np.arange(size) * native // size  # (size,) source pixel of each output pixel
            m = m[np.ix_(src, src)]
        return m

    # Collect every grounded word first, then score them all at once.
    maps: list[torch.Tensor] = []
    word_masks: list[tuple[str, int]] = []
    classes: list[str] = []
    n_mentions = n_matched = n_objects = n_mentioned = n_relations = n_relations_hold = 0
    # colour-shape pairs held out of training (compositional split): recall split by pair kind
    heldout = {tuple(p) for p in grounding.get("heldout_pairs", [])}
    pair_objects = {True: 0, False: 0}  # held out? -> objects
    pair_named = {True: 0, False: 0}  # held out? -> objects a mention names by colour and shape
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
        named = {k for m, k in zip(mentions, matched) if k is not None and m.colour is not None}
        for k, obj in enumerate(objects):
            kind = (obj["colour"], obj["shape"]) in heldout
            pair_objects[kind] += 1
            pair_named[kind] += k in named
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

    correctness, hits, ceiling = np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0)
    if maps:
        grids = {tuple(m.shape) for m in maps}
        if len(grids) != 1:
            raise ValueError(f"attention grids differ between samples: {sorted(grids)}")
        (grid,) = grids
        regions = {wm: _Region(mask_of(*wm), grid, mode) for wm in dict.fromkeys(word_masks)}
        word_regions = [regions[wm] for wm in word_masks]
        stacked = torch.stack(maps)  # (N, h, w)
        correctness = _correctness(stacked, word_regions, mode)  # (N,)
        hits = _pointing(stacked, word_regions, mode)  # (N,)
        best = dict(zip(regions, _single_cell_best(list(regions.values())), strict=True))
        ceiling = np.array([best[wm] for wm in word_masks])  # (N,)

    def summary(select: Sequence[bool] | None = None) -> dict[str, Any]:
        c, h = correctness, hits
        if select is not None:
            sel = np.asarray(select, dtype=bool)
            c, h = c[sel], h[sel]
        n = len(c)
        return {"attention_correctness": float(c.mean()) if n else math.nan,
                "pointing_game": float(h.mean()) if n else math.nan, "count": n}

    overall = summary()
    overall_ceiling = float(ceiling.mean()) if len(ceiling) else math.nan
    precision, recall = _ratio(n_matched, n_mentions), _ratio(n_mentioned, n_objects)
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "attention_correctness": overall["attention_correctness"],
        "pointing_game": overall["pointing_game"],
        # the correctness of the best map on this grid (all mass on one cell), same words: the
        # metric's ceiling at this resolution, since upsampling spreads a cell over the region's edge
        "attention_correctness_ceiling": overall_ceiling,
        "per_class": {cls: summary([c == cls for c in classes]) for cls in WORD_CLASSES},
        "grounded_words": overall["count"],
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": f1,
        "relation_accuracy": _ratio(n_relations_hold, n_relations),
        "relations": n_relations,
        "mentions": n_mentions,
        "objects": n_objects,
        # the share of objects whose colour and shape one mention names together (the pair
        # recall of Nikolaus et al. 2019), for pairs seen in training and, where the data set
        # holds pairs out (``heldout_pairs``), for those
        "pair_recall_seen": _ratio(pair_named[False], pair_objects[False]),
        **({"pair_recall_heldout": _ratio(pair_named[True], pair_objects[True]),
            "heldout_objects": pair_objects[True]} if heldout else {}),
    }


def format_grounding_table(grounding: Mapping[str, Any]) -> str:
    """:func:`evaluate_grounding`'s scores as markdown tables ×100: attention correctness and
    pointing game per word class, then caption grounding (objects and relations)."""
    rows = [["all", percent(grounding["attention_correctness"]), percent(grounding["pointing_game"]),
             str(grounding["grounded_words"])]]
    for cls, s in grounding["per_class"].items():
        rows.append([cls, percent(s["attention_correctness"]), percent(s["pointing_game"]), str(s["count"])])
    words = markdown_table(["words", "attention correctness", "pointing game", "count"], rows)
    objects = markdown_table(
        ["object precision", "object recall", "object F1", "relation accuracy", "relations"],
        [[percent(grounding["object_precision"]), percent(grounding["object_recall"]),
          percent(grounding["object_f1"]), percent(grounding["relation_accuracy"]),
          str(grounding["relations"])]],
    )
    if "pair_recall_heldout" in grounding:
        objects += "\n\n" + markdown_table(
            ["pair recall, seen pairs", "pair recall, held-out pairs", "held-out objects"],
            [[percent(grounding["pair_recall_seen"]), percent(grounding["pair_recall_heldout"]),
              str(grounding["heldout_objects"])]])
    ceiling = grounding.get("attention_correctness_ceiling")
    note = "" if ceiling is None else (
        f"\n(attention correctness of the best one-cell map on this grid, same words: {percent(ceiling)})")
    return words + note + "\n\n" + objects


__all__ = [
    "attention_correctness", "evaluate_grounding", "format_grounding_table", "pointing_hit",
    "upsample_attention", "WORD_CLASSES",
]
