"""Word-region grounding for training: which object each reference word names, and where it is.

Attention supervision (``loss.attention_supervision``, in the spirit of Liu et al. 2017, who
train the attention map towards the region a word is aligned to) needs, for every target word of
a reference caption, the pixel mask of the object it names. ``shapes`` records it in
``grounding.json``; ``attach_shapes_grounding`` copies it onto the ``ImageRecord``s, and
``CaptionDataset`` turns it into per-step object indices and object masks.

``cell_shares`` projects a pixel mask onto the attention grid the way the attention-correctness
metric sees it: the share of each cell's bilinearly upsampled mass that lands inside the mask.
A map with all its mass on cell i scores exactly ``cell_shares[i]`` on that metric (tested), so
the training target and the evaluation measure agree.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.data.records import ImageRecord


def interp_kwargs(mode: str) -> dict[str, Any]:
    """Keyword arguments of ``F.interpolate`` for ``mode`` (corners not aligned where it applies)."""
    return {"align_corners": False} if mode in ("bilinear", "bicubic", "linear") else {}


@functools.lru_cache(maxsize=32)
def axis_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of ``F.interpolate`` along one axis (it is separable and
    linear), for ``mode`` ``bilinear`` or ``nearest``. Read-only: shared through the cache."""
    basis = torch.eye(n_in, dtype=torch.float64)[None]  # (1, n_in channels, n_in)
    mode_1d = "linear" if mode == "bilinear" else mode
    u = F.interpolate(basis, size=n_out, mode=mode_1d, **interp_kwargs(mode_1d))[0].T.numpy()
    u.flags.writeable = False
    return u


def cell_shares(masks: Tensor, grid: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Share of each grid cell's upsampled attention that falls inside each mask.

    ``masks`` (..., H, W) bool or float; returns (..., h, w) in [0, 1], float32 on the masks'
    device. With ``up = U_h @ alpha @ U_w.T`` the mass cell (i, j) sends inside the mask is
    ``(U_h.T @ mask @ U_w)[i, j]`` and its total mass ``U_h[:, i].sum() * U_w[:, j].sum()``.
    """
    (h, w), (H, W) = grid, masks.shape[-2:]
    u_h = _axis_weights_on(h, H, mode, masks.device)  # (H, h)
    u_w = _axis_weights_on(w, W, mode, masks.device)  # (W, w)
    inside = u_h.T @ masks.float() @ u_w  # (..., h, w)
    total = torch.outer(u_h.sum(0), u_w.sum(0))  # (h, w)
    return (inside / total).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=32)
def _axis_weights_on(n_in: int, n_out: int, mode: str, device: torch.device) -> Tensor:
    """``axis_weights`` as float32 on ``device``, made once (not copied to the device per step)."""
    return torch.tensor(axis_weights(n_in, n_out, mode), dtype=torch.float32, device=device)


def attach_shapes_grounding(records: Sequence[ImageRecord], grounding: Mapping[str, Any],
                            relations: bool = False) -> None:
    """Give each ``shapes`` record its objects and, per reference caption, the object index of
    every token (-1 for words that name none). Matched by ``imgid`` and ``sentid``; records the
    file does not cover are left without grounding.

    ``relations=True`` also grounds each relation's keyword (``left``, ``right``, ``above``,
    ``below``) in the relation's object, the mention that follows: choosing between "left of"
    and "above" needs where that object is, and no attribute word has looked at it yet."""
    images = grounding["images"]
    for rec in records:
        entry = images.get(str(rec.image_id))
        if entry is None:
            continue
        by_sentid = {c["sentid"]: c for c in entry["captions"]}
        per_caption = []
        for k, tokens in enumerate(rec.captions):
            cap = by_sentid.get(rec.sentids[k]) if k < len(rec.sentids) else None
            if cap is None or list(cap["tokens"]) != list(tokens):
                raise ValueError(
                    f"grounding.json: image {rec.image_id} ({rec.filename}) caption {k} does not "
                    "match dataset.json; regenerate the data set")
            objects = [-1] * len(tokens)
            for g in cap["groundings"]:
                objects[g["token"]] = g["object"]
            if relations:
                _ground_relation_keywords(rec, k, tokens, cap.get("relations", []), objects)
            per_caption.append(objects)
        rec.grounding = {"image_size": int(grounding["image_size"]), "objects": list(entry["objects"]),
                         "token_objects": per_caption}


def _ground_relation_keywords(rec: ImageRecord, k: int, tokens: Sequence[str],
                              relations: Sequence[Mapping[str, Any]], objects: list[int]) -> None:
    """The i-th relation of a caption is stated by the i-th keyword after the previous one."""
    tokens, start = list(tokens), 0
    for rel in relations:
        keyword = str(rel["relation"]).split()[0]  # "left of" -> "left"
        try:
            pos = tokens.index(keyword, start)
        except ValueError:
            raise ValueError(
                f"grounding.json: image {rec.image_id} ({rec.filename}) caption {k} states "
                f"{rel['relation']!r} but has no {keyword!r} after token {start}") from None
        objects[pos] = int(rel["object"])
        start = pos + 1
