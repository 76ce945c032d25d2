"""Score curves over training (validation CIDEr-D and BLEU-4 of the evaluation report).

Drawn on matplotlib's Agg canvas directly, like the attention figures: no pyplot, no window.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from captioner.files import atomic_write
from captioner.viz.attention_maps import figure_png_bytes


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    out_path: str | os.PathLike,
    x_label: str = "epoch",
    best: str | None = None,
    title: str = "validation scores during training",
) -> Path:
    """Draw ``{label: [(x, score), ...]}`` (scores on the 0–1 scale, plotted ×100) as a PNG.

    ``best``: the label of the curve whose maximum is marked with a star (and named in the
    legend). Returns ``out_path``; ``ValueError`` when there is no point to draw.
    """
    if not any(curves.values()):
        raise ValueError("no curve has points to draw")
    if best is not None and best not in curves:
        raise ValueError(f"best: {best!r} is not one of the curves {sorted(curves)}")
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
    if best is not None and curves[best]:
        bx, by = max(curves[best], key=lambda p: p[1])
        ax.plot([bx], [100 * by], marker="*", markersize=12, color="black", linestyle="none",
                label=f"best {best} {100 * by:.1f} ({x_label} {bx:g})")
    ax.set_xlabel(x_label)
    ax.set_ylabel("score ×100")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    data = figure_png_bytes(fig, 100)
    atomic_write(out_path, lambda f: f.write(data))
    return out_path


__all__ = ["plot_curves"]
