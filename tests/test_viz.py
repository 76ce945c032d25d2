"""Attention-map figures, GIFs and JSON (captioner.viz), on made-up maps: no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.viz import (
    attention_json,
    overlay_attention,
    plot_attention,
    plot_curves,
    save_attention_figure,
    save_attention_gif,
    upsample_map,
)

WORDS = ["a", "red", "circle", "a", "red"]  # repeated words with identical maps: frames must not merge


def _image(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _alphas(t: int = len(WORDS), h: int = 4, w: int = 3) -> torch.Tensor:
    """(T, h, w): word i attends mostly to region i (mod N); every map sums to 1."""
    a = torch.full((t, h * w), 0.1)
    for i in range(t):
        a[i, i % (h * w)] = 5.0
    a[3] = a[0]  # same word, same map
    a[4] = a[1]
    return (a / a.sum(1, keepdim=True)).view(t, h, w)


def test_upsample_nearest_is_blocky_and_smooth_is_not() -> None:
    alpha = np.arange(12, dtype=np.float32).reshape(4, 3) / 66.0
    blocky = upsample_map(alpha, (40, 30), smooth=False)
    assert blocky.shape == (40, 30)
    # Each 10 x 10 block holds exactly its region's value.
    np.testing.assert_allclose(blocky[::10, ::10], alpha, rtol=1e-6)
    assert len(np.unique(blocky)) == 12
    smooth = upsample_map(torch.from_numpy(alpha), (40, 30), smooth=True)
    assert smooth.shape == (40, 30)
    assert smooth.min() >= 0
    assert len(np.unique(smooth)) > 100
    # The interpolated map still peaks where the attention does.
    assert np.unravel_index(smooth.argmax(), smooth.shape)[0] >= 30


def test_upsample_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        upsample_map(np.zeros((2, 3, 4)), (8, 8))


def test_overlay_highlights_the_attended_region() -> None:
    image = Image.new("RGB", (60, 60), "white")
    alpha = np.zeros((3, 3), dtype=np.float32)
    alpha[0, 2] = 1.0  # top right
    out = np.asarray(overlay_attention(image, alpha, smooth=False, cmap="jet")).astype(int)
    assert out.shape == (60, 60, 3)
    # jet: hot = red, cold = blue
    top_right, bottom_left = out[5, 55], out[55, 5]
    assert top_right[0] > top_right[2] and bottom_left[2] > bottom_left[0]


def test_default_overlay_dims_what_is_not_attended() -> None:
    image = Image.new("RGB", (60, 60), (40, 160, 60))
    alpha = np.full((3, 3), 0.01, dtype=np.float32)
    alpha[1, 1] = 0.92  # the centre
    out = np.asarray(overlay_attention(image, alpha, smooth=True)).astype(int)
    # The attended region keeps its true colour; the rest is darkened, hue kept.
    np.testing.assert_allclose(out[30, 30], (40, 160, 60), atol=2)
    assert out[2, 2].sum() < 0.4 * sum((40, 160, 60)) and out[2, 2][1] == out[2, 2].max()
    # A uniform map leaves the whole image as it is.
    np.testing.assert_array_equal(np.asarray(overlay_attention(image, np.full((3, 3), 1 / 9))), image)


def test_plot_attention_one_panel_per_word() -> None:
    fig = plot_attention(_image(), WORDS, _alphas(), max_cols=4)
    axes = fig.get_axes()
    assert len(axes) == 1 + len(WORDS)
    assert " ".join(WORDS) in axes[0].get_title(loc="left").replace("\n", " ")
    assert [ax.get_title() for ax in axes[1:]] == WORDS
    # 6 panels at 4 per row: two rows.
    assert {ax.get_subplotspec().rowspan.start for ax in axes} == {0, 1}


def test_plot_attention_empty_caption_and_mismatch() -> None:
    fig = plot_attention(_image(), [], torch.zeros(0, 4, 3))
    assert len(fig.get_axes()) == 1
    with pytest.raises(ValueError, match="3 words but 5"):
        plot_attention(_image(), ["a", "b", "c"], _alphas())


def test_figures_are_drawn_without_pyplot(tmp_path, monkeypatch) -> None:
    """pyplot keeps a process-wide registry of open figures (not thread-safe, and a leak for
    figures nobody closes): the library builds Agg figures itself and leaves none in pyplot."""
    import matplotlib.pyplot as plt

    for name in ("figure", "subplots", "subplot", "gcf", "gca", "imshow", "savefig", "close"):
        monkeypatch.setattr(plt, name, lambda *args, _name=name, **kwargs: pytest.fail(f"pyplot.{_name} called"))
    open_before = plt.get_fignums()
    save_attention_figure(_image(), WORDS, _alphas(), tmp_path / "a.png")
    plot_attention(_image(), WORDS, _alphas())
    assert plt.get_fignums() == open_before


@pytest.mark.parametrize("smooth", [True, False])
def test_save_attention_figure_writes_a_png(tmp_path, smooth) -> None:
    path = save_attention_figure(_image(), WORDS, _alphas(), tmp_path / "att.png", smooth=smooth)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 400 and im.height > 200


def test_save_attention_gif_one_frame_per_word(tmp_path) -> None:
    path = save_attention_gif(_image(), WORDS, _alphas(), tmp_path / "att.gif", duration_ms=300)
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == len(WORDS)
        assert im.info["duration"] == 300


def test_attention_json_shapes_and_sums() -> None:
    alphas = _alphas()
    d = attention_json(WORDS, alphas, (4, 3))
    assert d["words"] == WORDS and d["grid"] == [4, 3] and d["caption"] == " ".join(WORDS)
    maps = np.asarray(d["maps"])
    assert maps.shape == (len(WORDS), 4, 3)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)
    json.dumps(d)  # plain JSON types only
    # (T, N) plus the grid gives the same maps.
    assert attention_json(WORDS, alphas.flatten(1).numpy(), (4, 3))["maps"] == d["maps"]
    with pytest.raises(ValueError, match="grid"):
        attention_json(WORDS, alphas, (3, 4))


def test_plot_curves_writes_a_png_and_needs_points(tmp_path) -> None:
    curves = {"CIDEr-D": [(0.0, 0.2), (1.0, 0.35), (2.0, 0.3)], "BLEU-4": [(0.0, 0.1), (2.0, 0.18)]}
    out = plot_curves(curves, tmp_path / "curves.png", x_label="epoch", best="CIDEr-D")
    assert out == tmp_path / "curves.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (640, 400)
    with pytest.raises(ValueError, match="no curve"):
        plot_curves({"CIDEr-D": []}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="best"):
        plot_curves(curves, tmp_path / "x.png", best="METEOR")
