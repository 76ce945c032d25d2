"""Markdown tables of scores, as the metrics and the evaluation report print them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percent(value: float | None) -> str:
    """A 0–1 score ×100 with one decimal (the papers' convention); ``nan`` for None/NaN/inf."""
    return "nan" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with right-aligned columns as wide as their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def row(items: Sequence[str]) -> str:
        return "| " + " | ".join(str(s).rjust(w) for s, w in zip(items, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([row(header), rule, *(row(r) for r in rows)])


__all__ = ["markdown_table", "percent"]
