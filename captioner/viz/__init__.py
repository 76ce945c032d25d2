"""Pictures of what the model looked at: per-word attention maps over the image."""

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

__all__ = [
    "attention_frames",
    "attention_json",
    "display_image",
    "figure_png_bytes",
    "overlay_attention",
    "plot_attention",
    "save_attention_figure",
    "save_attention_gif",
    "upsample_map",
]
