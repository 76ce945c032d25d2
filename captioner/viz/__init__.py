"""Pictures of what the model looked at (per-word attention maps over the image) and of how
training went (score curves)."""

from captioner.viz.attention_maps import (
    attention_frames,
    attention_json,
    display_image,
    figure_png_bytes,
    overlay_attention,
    plot_attention,
    save_attention_figure,
    save_attention_gif,
    upsample_map,
)
from captioner.viz.curves import plot_curves

__all__ = [
    "attention_frames",
    "attention_json",
    "display_image",
    "figure_png_bytes",
    "overlay_attention",
    "plot_attention",
    "plot_curves",
    "save_attention_figure",
    "save_attention_gif",
    "upsample_map",
]
