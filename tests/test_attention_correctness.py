"""Attention correctness, the pointing game and grounding on a hand-built shapes scene."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captioner.data.shapes import ShapesConfig, generate_shapes, load_grounding, object_mask
from captioner.metrics.attention_correctness import (
    attention_correctness,
    evaluate_grounding,
    format_grounding_table,
    pointing_hit,
    upsample_attention,
)

S = 64  # image size; a 4x4 grid has 16-pixel cells


def _cells_mask(cells, grid=4, size=S):
    """Pixel mask covering whole grid cells."""
    step = size // grid
    mask = np.zeros((size, size), dtype=bool)
    for r, c in cells:
        mask[r * step:(r + 1) * step, c * step:(c + 1) * step] = True
    return mask


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("grid", [4, 7, 8])
def test_uniform_map_scores_the_region_area_share(mode, grid):
    rng = np.random.default_rng(grid)
    mask = rng.random((S, S)) < 0.3
    uniform = np.full((grid, grid), 1.0 / grid**2)
    assert attention_correctness(uniform, mask, mode=mode) == pytest.approx(mask.mean(), abs=1e-12)
    # An all-zero map carries no information and counts as uniform.
    assert attention_correctness(np.zeros((grid, grid)), mask, mode=mode) == \
        pytest.approx(mask.mean(), abs=1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize(("grid", "size"), [((4, 4), (64, 64)), ((7, 5), (50, 90)), ((14, 14), (224, 224))])
def test_correctness_equals_the_mass_of_the_upsampled_map(mode, grid, size):
    # attention_correctness works on the grid (upsampling is linear); check it against the
    # explicit upsample-then-sum definition.
    rng = np.random.default_rng(sum(size))
    for trial in range(6):
        alpha = rng.random(grid) ** 4 - (0.3 if trial >= 4 else 0.0)  # some with negatives
        mask = rng.random(size) < rng.random()
        up = upsample_attention(alpha, size, mode).numpy()  # (H, W)
        explicit = float(up[mask].sum())
        assert attention_correctness(alpha, mask, mode=mode) == pytest.approx(explicit, abs=1e-12)
        # The peak is the first maximal pixel in row-major order; pixels within rounding of the
        # maximum count as ties (F.interpolate's own values wobble by an ulp on plateaus).
        maximal = up >= up.max() - 1e-12
        first = np.zeros_like(maximal)
        first.flat[int(np.flatnonzero(maximal)[0])] = True
        assert pointing_hit(alpha, first, mode=mode)
        assert not pointing_hit(alpha, ~maximal, mode=mode)
        assert pointing_hit(alpha, mask, mode=mode) == bool(mask[first].any())


def test_nearest_mass_in_cells_inside_the_region_scores_one():
    rng = np.random.default_rng(0)
    region = [(0, 1), (1, 1), (1, 2), (2, 2)]
    alpha = np.zeros((4, 4))
    for r, c in region:
        alpha[r, c] = rng.random() + 0.1
    mask = _cells_mask(region)
    mask[40:, :10] = True  # extra pixels in the region change nothing
    assert attention_correctness(alpha, mask, mode="nearest") == pytest.approx(1.0, abs=1e-12)
    assert attention_correctness(alpha, ~mask, mode="nearest") == pytest.approx(0.0, abs=1e-12)


def test_bilinear_mass_in_cells_inside_the_region_scores_one():
    # Bilinear upsampling spreads a cell's mass half a cell into its neighbours, so the region
    # must hold the cells plus that margin (or reach the image border).
    alpha = np.zeros((4, 4))
    alpha[1, 1], alpha[1, 2] = 0.7, 0.3
    mask = np.zeros((S, S), dtype=bool)
    mask[8:40, 8:56] = True  # cells (1, 1) and (1, 2) with an 8 px (half-cell) margin
    assert attention_correctness(alpha, mask) == pytest.approx(1.0, abs=1e-12)
    corner = np.zeros((4, 4))
    corner[0, 0] = 1.0
    assert attention_correctness(corner, _cells_mask([(0, 0), (0, 1), (1, 0), (1, 1)])) == \
        pytest.approx(1.0, abs=1e-12)
    # Without the margin a single interior cell keeps 0.75 of its mass per axis.
    single = np.zeros((4, 4))
    single[1, 1] = 1.0
    assert attention_correctness(single, _cells_mask([(1, 1)])) == pytest.approx(0.75**2)


def test_scale_negatives_and_input_types():
    rng = np.random.default_rng(1)
    alpha = rng.random((7, 7))
    mask = rng.random((S, S)) < 0.5
    base = attention_correctness(alpha, mask)
    assert attention_correctness(alpha * 13.0, mask) == pytest.approx(base, rel=1e-12)
    assert attention_correctness(torch.tensor(alpha, dtype=torch.float32), torch.tensor(mask)) == \
        pytest.approx(base, rel=1e-6)
    clipped = alpha.copy()
    clipped[:3] = -5.0
    zeroed = np.where(clipped < 0, 0.0, clipped)
    # Negatives are clipped after upsampling: with nearest that equals zeroing them first...
    assert attention_correctness(clipped, mask, mode="nearest") == \
        pytest.approx(attention_correctness(zeroed, mask, mode="nearest"), rel=1e-12)
    # ...with bilinear they still pull neighbouring pixels down, but no negative mass counts.
    up = upsample_attention(clipped, S)
    assert float(up.min()) >= 0.0 and float(up.sum()) == pytest.approx(1.0)
    assert 0.0 <= attention_correctness(clipped, mask) <= 1.0


def test_upsample_attention_batches_and_normalises():
    maps = torch.rand(3, 5, 2, 4, 4)
    up = upsample_attention(maps, (32, 48))
    assert up.shape == (3, 5, 2, 32, 48) and up.dtype == torch.float64
    assert torch.allclose(up.sum(dim=(-2, -1)), torch.ones(3, 5, 2, dtype=torch.float64))


def test_pointing_hit():
    alpha = np.zeros((4, 4))
    alpha[2, 3] = 1.0
    assert pointing_hit(alpha, _cells_mask([(2, 3)]))
    assert not pointing_hit(alpha, _cells_mask([(0, 0), (3, 3)]))
    assert pointing_hit(alpha, _cells_mask([(2, 3)]), mode="nearest")
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        pointing_hit(np.zeros((2, 4, 4)), _cells_mask([(0, 0)]))


# A hand-built scene in grounding.json's format: a big red square filling cells (0..1, 0..1) of
# a 4x4 grid, a small blue square filling cell (0, 3) (so red is left of blue), and a circle.
RED = {"id": 0, "shape": "square", "colour": "red", "size": "big", "box": [0, 0, 32, 32],
       "geometry": {"type": "polygon", "points": [[0, 0], [31, 0], [31, 31], [0, 31]]}}
BLUE = {"id": 1, "shape": "square", "colour": "blue", "size": "small", "box": [48, 0, 64, 16],
        "geometry": {"type": "polygon", "points": [[48, 0], [63, 0], [63, 15], [48, 15]]}}
GREEN = {"id": 2, "shape": "circle", "colour": "green", "size": "small", "box": [38, 44, 51, 57],
         "geometry": {"type": "circle", "center": [44, 50], "radius": 6}}
GROUNDING = {"image_size": S, "images": {
    "7": {"objects": [RED, BLUE], "captions": []},
    "8": {"objects": [RED, BLUE, GREEN], "captions": []},
}}


def _words(text):
    return text.split()


def _one_hot(cell, grid=4):
    a = np.zeros((grid, grid))
    a[cell] = 1.0
    return a


def test_masks_of_the_hand_built_scene():
    assert object_mask(RED, S).sum() == 32 * 32 and object_mask(RED, S)[:32, :32].all()
    assert np.array_equal(object_mask(BLUE, S), _cells_mask([(0, 3)]))


def test_evaluate_grounding_on_a_hand_built_scene():
    uniform = np.full((4, 4), 1 / 16)
    tokens_a = _words("a big red square left of a small blue square <end>")
    # big/red/square look at the red square's corner cell (all mass stays inside it); small
    # looks at the blue square, blue and the second "square" look at the red one.
    att_a = np.stack([uniform] * len(tokens_a))
    att_a[1] = att_a[2] = att_a[3] = _one_hot((0, 0))
    att_a[7] = _one_hot((0, 3))
    att_a[8] = att_a[9] = _one_hot((0, 0))
    # A wrong relation, a hallucinated purple triangle, the green circle looked at uniformly.
    tokens_b = _words("a small blue square left of a red square and a purple triangle and a "
                      "green circle")
    att_b = np.stack([_one_hot((3, 0))] * len(tokens_b))
    att_b[tokens_b.index("green")] = uniform
    samples = [{"image_id": 8, "tokens": tokens_a, "attention": att_a},
               {"image_id": 8, "tokens": tokens_b, "attention": torch.tensor(att_b)}]
    out = evaluate_grounding(samples, GROUNDING, S)

    # Reference: the same words scored one at a time.
    red, blue, green = (object_mask(o, S) for o in (RED, BLUE, GREEN))
    words = [(att_a[t], red, c) for t, c in ((1, "size"), (2, "colour"), (3, "shape"))]
    words += [(att_a[t], blue, c) for t, c in ((7, "size"), (8, "colour"), (9, "shape"))]
    words += [(att_b[t], blue, c) for t, c in ((1, "size"), (2, "colour"), (3, "shape"))]
    words += [(att_b[t], red, c) for t, c in ((7, "colour"), (8, "shape"))]
    words += [(att_b[t], green, c) for t, c in ((15, "colour"), (16, "shape"))]
    corr = [attention_correctness(a, m) for a, m, _ in words]
    hits = [pointing_hit(a, m) for a, m, _ in words]
    assert corr[:3] == [pytest.approx(1.0)] * 3 and corr[4] == corr[5] == 0.0
    assert corr[-2] == pytest.approx(green.mean())  # uniform attention: the area share
    assert out["grounded_words"] == len(words) == 13
    assert out["attention_correctness"] == pytest.approx(np.mean(corr), abs=1e-12)
    assert out["pointing_game"] == pytest.approx(np.mean(hits))
    for cls in ("size", "colour", "shape"):
        sel = [i for i, w in enumerate(words) if w[2] == cls]
        per = out["per_class"][cls]
        assert per["count"] == len(sel)
        assert per["attention_correctness"] == pytest.approx(np.mean([corr[i] for i in sel]))
        assert per["pointing_game"] == pytest.approx(np.mean([hits[i] for i in sel]))
    # 6 mentions, 5 match (not the purple triangle); 2 + 3 of 3 + 3 scene objects mentioned.
    assert (out["mentions"], out["objects"]) == (6, 6)
    assert out["object_precision"] == pytest.approx(5 / 6)
    assert out["object_recall"] == pytest.approx(5 / 6)
    assert out["object_f1"] == pytest.approx(5 / 6)
    # "red left of blue" holds, "blue left of red" does not; relations with the purple
    # triangle are not stated ("and") and would not count anyway.
    assert (out["relations"], out["relation_accuracy"]) == (2, 0.5)

    # Masks rasterised at the data set's size and resized: the corner words stay fully inside.
    big = evaluate_grounding(samples[:1], GROUNDING, image_size=128)
    assert big["per_class"]["size"]["count"] == 2
    assert big["grounded_words"] == 6


def test_evaluate_grounding_edge_cases():
    empty = evaluate_grounding([], GROUNDING)
    assert empty["grounded_words"] == 0 and math.isnan(empty["attention_correctness"])
    assert math.isnan(empty["object_precision"]) and empty["per_class"]["shape"]["count"] == 0
    nothing = evaluate_grounding(
        [{"image_id": 7, "tokens": ["a", "purple", "circle"], "attention": np.ones((3, 4, 4))}],
        GROUNDING)
    assert nothing["object_precision"] == 0.0 and nothing["object_f1"] == 0.0
    assert math.isnan(nothing["relation_accuracy"]) and nothing["relations"] == 0
    with pytest.raises(ValueError, match="not in the grounding"):
        evaluate_grounding([{"image_id": 99, "tokens": [], "attention": np.ones((1, 4, 4))}],
                           GROUNDING)
    with pytest.raises(ValueError, match="attention must be"):
        evaluate_grounding([{"image_id": 7, "tokens": ["a", "red", "square"],
                             "attention": np.ones((2, 4, 4))}], GROUNDING)


def test_evaluate_grounding_on_generated_shapes_with_oracle_attention(tmp_path):
    root = generate_shapes(tmp_path / "shapes", ShapesConfig(num_images=30, seed=3))
    grounding = load_grounding(root)
    size, grid = grounding["image_size"], 8
    samples = []
    for key, image in grounding["images"].items():
        caption = image["captions"][0]  # canonical reference: true objects, true relations
        attention = np.full((len(caption["tokens"]), grid, grid), 1 / grid**2)
        for g in caption["groundings"]:  # look at the described object (mask pooled to the grid)
            mask = object_mask(image["objects"][g["object"]], size).astype(float)
            attention[g["token"]] = mask.reshape(grid, size // grid, grid, size // grid).mean((1, 3))
        samples.append({"image_id": int(key), "tokens": caption["tokens"], "attention": attention})
    out = evaluate_grounding(samples, grounding)
    assert out["object_precision"] == out["object_recall"] == out["relation_accuracy"] == 1.0
    assert out["grounded_words"] == 3 * out["objects"]
    assert out["pointing_game"] > 0.95  # a triangle's blurred peak can sit just off its tip
    # Objects span 9-17 px against 8 px cells, so blurring the pooled mask loses about half the
    # mass at the edges; uniform attention would score the area share (about 0.04).
    assert out["attention_correctness"] > 0.4
    # Shuffled attention (each word looks at another image's object) scores far lower.
    shuffled = [dict(s, attention=np.roll(s["attention"], 3, axis=2)) for s in samples]
    assert evaluate_grounding(shuffled, grounding)["attention_correctness"] < \
        out["attention_correctness"] / 2


def test_ceiling_is_the_best_one_cell_map_and_bounds_every_map(tmp_path):
    """attention_correctness_ceiling: the best one-cell map reaches it, and no map (a mixture of
    cells) beats it, word by word."""
    root = generate_shapes(tmp_path / "shapes", ShapesConfig(num_images=12, seed=5))
    grounding = load_grounding(root)
    grid, rng = 8, np.random.default_rng(0)
    for key, image in list(grounding["images"].items())[:6]:
        caption = image["captions"][0]
        n = len(caption["tokens"])
        one = evaluate_grounding([{"image_id": int(key), "tokens": caption["tokens"],
                                   "attention": rng.random((n, grid, grid)) ** 8}], grounding)
        assert one["attention_correctness"] <= one["attention_correctness_ceiling"] + 1e-12
        # the best single cell, on every word of the first mention, reaches that mention's ceiling
        end = max(g["token"] for g in caption["groundings"] if g["object"] == caption["groundings"][0]["object"])
        first = {"image_id": int(key), "tokens": caption["tokens"][: end + 1]}
        scores = []
        for cell in range(grid * grid):
            att = np.zeros((end + 1, grid, grid))
            att[:, cell // grid, cell % grid] = 1.0
            scores.append(evaluate_grounding([dict(first, attention=att)], grounding))
        best = max(s["attention_correctness"] for s in scores)
        assert best == pytest.approx(scores[0]["attention_correctness_ceiling"])
        assert 0 < best < 1  # 8-px cells on 9-17 px objects: upsampling spills over the edge


def test_pair_recall_splits_objects_by_held_out_colour_shape_pairs():
    """An object counts as named when one mention gives its colour and shape together; a shape
    named without its colour does not count. Seen and held-out pairs are reported apart."""
    captions = [(8, "a big red square left of a small blue square"),
                (8, "a small blue square left of a red square and a purple triangle and a green circle"),
                (7, "a small square")]
    samples = [{"image_id": i, "tokens": _words(c), "attention": np.ones((len(_words(c)), 4, 4))} for i, c in captions]
    plain = evaluate_grounding(samples, GROUNDING, S)
    assert "pair_recall_heldout" not in plain and plain["pair_recall_seen"] == pytest.approx(5 / 8)
    held = evaluate_grounding(samples, {**GROUNDING, "heldout_pairs": [["blue", "square"]]}, S)
    # blue squares: named twice in image 8, not in image 7 ("small square" has no colour)
    assert held["heldout_objects"] == 3 and held["pair_recall_heldout"] == pytest.approx(2 / 3)
    # red square x3 (named twice), green circle x2 (named once)
    assert held["pair_recall_seen"] == pytest.approx(3 / 5)
    assert "held-out pairs" in format_grounding_table(held)
