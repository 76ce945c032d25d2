"""Per-word attention maps drawn over the image, as in the paper's Figures 2 and 3.

Everything renders off-screen: figures are built on matplotlib's Agg canvas directly (no pyplot,
no global figure registry), so the CLI, the web server's threads and the evaluation report can call
these functions without ever opening a window or leaking figures.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from captioner.files import atomic_write

# Images smaller than this (the 64 px shapes) are enlarged for display so blocks and words stay legible.
MIN_DISPLAY_SIZE = 224
DEFAULT_CMAP: str | None = None  # None: dim what is not attended, as in the paper's figures
OVERLAY_OPACITY = 0.8  # darkening of unattended regions (or opacity of a colour map)


def _as_numpy(a) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like -> float32 numpy array."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def _as_maps(alphas, grid: tuple[int, int] | None = None) -> np.ndarray:
    """(T, h, w), or (T, N) with ``grid`` -> (T, h, w) float32."""
    a = _as_numpy(alphas)
    if a.ndim == 2 and grid is not None:
        a = a.reshape(a.shape[0], *grid)
    if a.ndim != 3:
        raise ValueError(f"alphas must be (T, h, w) or (T, N) with a grid, got shape {a.shape}")
    return a


def upsample_map(alpha, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """One attention map (h, w) -> (H, W) float32 at image resolution.

    ``smooth``: bicubic interpolation, the soft blobs of the paper's figures (clipped at 0, since
    bicubic overshoots); otherwise nearest neighbour, so each region shows as a block.
    Values are interpolated, not renormalised.
    """
    a = _as_numpy(alpha)
    if a.ndim != 2:
        raise ValueError(f"alpha must be (h, w), got shape {a.shape}")
    height, width = size
    img = Image.fromarray(np.ascontiguousarray(a), mode="F")
    resample = Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST
    out = np.asarray(img.resize((width, height), resample), dtype=np.float32)
    return np.clip(out, 0.0, None) if smooth else out


def _normalise(m: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] by its own maximum, so every word's focus is visible.

    Dividing by the maximum (not min-max) keeps a diffuse map looking diffuse: a word that attends
    everywhere lights up the whole image instead of having its small differences stretched into
    spurious blobs.
    """
    hi = float(m.max())
    return m / hi if hi > 1e-12 else np.zeros_like(m)


def display_image(image: Image.Image, min_size: int = MIN_DISPLAY_SIZE) -> Image.Image:
    """RGB copy, enlarged (aspect kept) so the shorter side is at least ``min_size``."""
    image = image.convert("RGB")
    short = min(image.size)
    if short >= min_size:
        return image
    scale = min_size / short
    return image.resize((round(image.width * scale), round(image.height * scale)),
                        Image.Resampling.LANCZOS)


def overlay_attention(
    image: Image.Image,
    alpha,
    smooth: bool = True,
    cmap: str | None = DEFAULT_CMAP,
    opacity: float = OVERLAY_OPACITY,
) -> Image.Image:
    """The image with one attention map (h, w) blended on top (the map normalised by its maximum).

    ``cmap=None`` (default), the look of the paper's figures: a black layer blended over the image
    with opacity ``opacity * (1 - attention)``, so attended regions keep their true colours and the
    rest is dimmed. A matplotlib colour map name (``"jet"``, ``"inferno"``) blends that heat map
    over the whole image at a constant ``opacity`` instead (red/yellow = attended).
    """
    image = image.convert("RGB")
    m = _normalise(upsample_map(alpha, (image.height, image.width), smooth))  # (H, W)
    base = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    if cmap is None:
        out = base * (1.0 - opacity * (1.0 - m))[..., None]
    else:
        heat = colormaps[cmap](m)[..., :3]  # (H, W, 3) in [0, 1]
        out = (1.0 - opacity) * base + opacity * heat
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8))


def plot_attention(
    image: Image.Image,
    words: Sequence[str],
    alphas,
    smooth: bool = True,
    max_cols: int = 5,
    cmap: str | None = DEFAULT_CMAP,
    panel_inches: float = 2.2,
) -> Figure:
    """A grid of panels: the image titled with the whole caption, then one panel per word.

    ``alphas`` (T, h, w), one map per word (a torch tensor or array). Returns an Agg-backed Figure;
    save it with ``fig.savefig`` (or :func:`save_attention_figure`); nothing is shown.
    """
    maps = _as_maps(alphas)
    if len(words) != maps.shape[0]:
        raise ValueError(f"{len(words)} words but {maps.shape[0]} attention maps")
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    shown = display_image(image)
    n = 1 + len(words)
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    aspect = shown.height / shown.width
    fig = Figure(figsize=(panel_inches * cols, (panel_inches * aspect + 0.45) * rows))
    FigureCanvasAgg(fig)

    caption = " ".join(words) if words else "(empty caption)"
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(shown)
    # The caption can be long: wrap it to the panel width (about 8 characters per inch at this size).
    ax.set_title("\n".join(textwrap.wrap(caption, width=max(12, int(panel_inches * 9)))),
                 fontsize=9, loc="left")
    ax.set_axis_off()
    for t, word in enumerate(words):
        ax = fig.add_subplot(rows, cols, t + 2)
        ax.imshow(overlay_attention(shown, maps[t], smooth, cmap))
        ax.set_title(word, fontsize=12, fontweight="bold")
        ax.set_axis_off()
    fig.tight_layout(pad=0.4, h_pad=0.6, w_pad=0.3)
    return fig


def save_attention_figure(
    image: Image.Image,
    words: Sequence[str],
    alphas,
    path: str | os.PathLike,
    smooth: bool = True,
    max_cols: int = 5,
    cmap: str | None = DEFAULT_CMAP,
    dpi: int = 100,
) -> Path:
    """:func:`plot_attention` written to ``path`` as PNG (atomically)."""
    path = Path(path)
    fig = plot_attention(image, words, alphas, smooth=smooth, max_cols=max_cols, cmap=cmap)
    data = figure_png_bytes(fig, dpi)
    atomic_write(path, lambda f: f.write(data))
    return path


def figure_png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (for HTTP responses and HTML reports)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def _wrap_words(draw: ImageDraw.ImageDraw, words: Sequence[str], font, width: int) -> list[list[int]]:
    """Indices of ``words`` per line so that no line is wider than ``width`` pixels."""
    lines: list[list[int]] = [[]]
    for i in range(len(words)):
        trial = " ".join(words[j] for j in [*lines[-1], i])
        if lines[-1] and draw.textlength(trial, font=font) > width:
            lines.append([])
        lines[-1].append(i)
    return lines


def attention_frames(
    image: Image.Image,
    words: Sequence[str],
    alphas,
    smooth: bool = True,
    cmap: str | None = DEFAULT_CMAP,
) -> list[Image.Image]:
    """One RGB frame per word: the overlay for that word above the sentence so far (word highlighted)."""
    maps = _as_maps(alphas)
    if len(words) != maps.shape[0]:
        raise ValueError(f"{len(words)} words but {maps.shape[0]} attention maps")
    shown = display_image(image)
    font_size = max(14, shown.width // 14)
    font = _font(font_size)
    margin = font_size // 2
    probe = ImageDraw.Draw(shown.copy())
    n_lines = len(_wrap_words(probe, list(words), font, shown.width - 2 * margin))
    bar = margin * 2 + n_lines * int(font_size * 1.3)  # same height for every frame
    frames = []
    for t in range(len(words)):
        frame = Image.new("RGB", (shown.width, shown.height + bar), "white")
        frame.paste(overlay_attention(shown, maps[t], smooth, cmap), (0, 0))
        draw = ImageDraw.Draw(frame)
        so_far = list(words[: t + 1])
        y = shown.height + margin
        for line in _wrap_words(draw, so_far, font, shown.width - 2 * margin):
            x = margin
            for i in line:
                colour = (200, 30, 30) if i == t else (40, 40, 40)
                draw.text((x, y), so_far[i], fill=colour, font=font)
                x += draw.textlength(so_far[i] + " ", font=font)
            y += int(font_size * 1.3)
        frames.append(frame)
    return frames


def save_attention_gif(
    image: Image.Image,
    words: Sequence[str],
    alphas,
    path: str | os.PathLike,
    smooth: bool = True,
    duration_ms: int = 800,
    cmap: str | None = DEFAULT_CMAP,
) -> Path:
    """The sentence as an animated GIF, one frame per word (looping)."""
    path = Path(path)
    frames = attention_frames(image, words, alphas, smooth, cmap)
    if not frames:  # an empty caption: a still of the image
        frames = [display_image(image)]
    # Each frame differs (the sentence grows), so PIL keeps exactly one GIF frame per word.
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                   duration=duration_ms, loop=0, disposal=1)
    return path


def attention_json(words: Sequence[str], alphas, grid: tuple[int, int] | None = None) -> dict:
    """The raw maps, one (h, w) nested list per word; each map sums to 1 over the grid.

    ``alphas`` (T, h, w), or (T, N) together with ``grid`` (h, w).
    """
    maps = _as_maps(alphas, grid)
    if len(words) != maps.shape[0]:
        raise ValueError(f"{len(words)} words but {maps.shape[0]} attention maps")
    h, w = maps.shape[1:]
    if grid is not None and tuple(grid) != (h, w):
        raise ValueError(f"grid {tuple(grid)} does not match maps of shape {(h, w)}")
    return {
        "caption": " ".join(words),
        "words": list(words),
        "grid": [int(h), int(w)],
        "maps": [np.round(m.astype(np.float64), 6).tolist() for m in maps],
    }
