"""The synthetic shapes data set: determinism, format, groundings, masks, parsing, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import shapes
from captioner.data.records import SPLITS
from captioner.data.shapes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Mention,
    ShapesConfig,
    canonical_caption,
    generate_shapes,
    load_grounding,
    match_mentions,
    object_mask,
    parse_caption,
    relation_holds,
)
from captioner.data.vocab import tokenize

ATTRIBUTE = {**{c: "colour" for c in COLOURS}, **{s: "size" for s in SIZES},
             **{s: "shape" for s in SHAPES}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "ds",
                           ShapesConfig(num_images=50, seed=3, image_size=64))


@pytest.fixture(scope="module")
def dataset(data_dir) -> dict:
    return json.loads((data_dir / "dataset.json").read_text())


@pytest.fixture(scope="module")
def grounding(data_dir) -> dict:
    return load_grounding(data_dir)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(tmp_path):
    cfg = ShapesConfig(num_images=20, seed=7, image_size=48, compositional=True)
    a, b = _files(generate_shapes(tmp_path / "a", cfg)), _files(generate_shapes(tmp_path / "b", cfg))
    assert len(a) == 22 and a == b
    other = _files(generate_shapes(tmp_path / "c", ShapesConfig(num_images=20, seed=8, image_size=48)))
    assert other["dataset.json"] != a["dataset.json"]


def test_karpathy_format(dataset, data_dir):
    assert dataset["dataset"] == "shapes"
    images = dataset["images"]
    assert [im["imgid"] for im in images] == list(range(50))
    assert {im["split"] for im in images} == set(SPLITS)
    assert sum(im["split"] == "val" for im in images) == 5
    assert sum(im["split"] == "test" for im in images) == 5
    sentids = set()
    for im in images:
        assert len(im["sentences"]) == 5 and len({tuple(s["tokens"]) for s in im["sentences"]}) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids.update(im["sentids"])
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == tokenize(s["raw"]) and 1 <= len(s["tokens"]) <= shapes.MAX_TOKENS
            assert s["raw"][0].isupper() and s["raw"].endswith(".")
        with Image.open(data_dir / "images" / im["filename"]) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
    assert len(sentids) == 250


def test_read_by_the_karpathy_reader(data_dir):
    from captioner.data.karpathy import read_karpathy

    records = read_karpathy(data_dir / "dataset.json", data_dir / "images")
    assert sum(len(v) for v in records.values()) == 50
    assert all(r.path.is_file() and len(r.captions) == 5 for v in records.values() for r in v)


def test_groundings_name_the_right_objects(grounding, dataset):
    assert grounding["image_size"] == 64
    for im in dataset["images"]:
        g = grounding["images"][str(im["imgid"])]
        assert g["filename"] == im["filename"]
        objects = g["objects"]
        assert [o["id"] for o in objects] == list(range(len(objects)))
        assert 1 <= len(objects) <= 3 and len({o["colour"] for o in objects}) == len(objects)
        assert [c["tokens"] for c in g["captions"]] == [s["tokens"] for s in im["sentences"]]
        assert [c["sentid"] for c in g["captions"]] == im["sentids"]
        for cap in g["captions"]:
            tokens = cap["tokens"]
            grounded = {gr["token"]: gr["object"] for gr in cap["groundings"]}
            # every attribute word is grounded, and to an object with that attribute
            assert set(grounded) == {i for i, w in enumerate(tokens) if w in ATTRIBUTE}
            for i, j in grounded.items():
                assert objects[j][ATTRIBUTE[tokens[i]]] == tokens[i]
            # every object is mentioned
            assert set(grounded.values()) == set(range(len(objects)))
            for rel in cap["relations"]:
                assert rel["relation"] in RELATIONS
                assert relation_holds(objects[rel["subject"]], objects[rel["object"]], rel["relation"])


def test_every_pair_has_exactly_one_relation(grounding):
    for g in grounding["images"].values():
        for a in g["objects"]:
            for b in g["objects"]:
                if a is not b:
                    assert sum(relation_holds(a, b, r) for r in RELATIONS) == 1


def test_masks_boxes_and_pixels_agree(grounding, data_dir):
    size = grounding["image_size"]
    background = np.array(grounding["background"], dtype=np.uint8)
    for g in grounding["images"].values():
        pixels = np.asarray(Image.open(data_dir / "images" / g["filename"]))  # (H, W, 3)
        drawn = (pixels != background).any(axis=-1)
        union = np.zeros((size, size), dtype=int)
        for obj in g["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            mask = object_mask(obj, size)
            assert mask.shape == (size, size) and mask.dtype == bool and mask.any()
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not (mask & ~inside).any()
            ys, xs = np.nonzero(mask)  # the box is tight
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box"]
            # no anti-aliasing: the object's colour covers exactly its mask
            colour = np.array(grounding["colours"][obj["colour"]], dtype=np.uint8)
            assert np.array_equal((pixels == colour).all(axis=-1), mask)
            union += mask
        assert union.max() <= 1, "objects overlap"
        assert np.array_equal(drawn, union.astype(bool))


def test_sizes_are_clearly_different(grounding):
    areas = {s: [] for s in SIZES}
    for g in grounding["images"].values():
        for obj in g["objects"]:
            if obj["shape"] == "square":
                areas[obj["size"]].append(object_mask(obj, grounding["image_size"]).sum())
    assert max(areas["small"]) * 2 < min(areas["big"])


def test_parse_caption_round_trips_every_reference(grounding):
    for g in grounding["images"].values():
        objects = g["objects"]
        for cap in g["captions"]:
            mentions, relations = parse_caption(cap["tokens"])
            matched = match_mentions(mentions, objects)
            assert None not in matched
            grounded = {(gr["token"], gr["object"]) for gr in cap["groundings"]}
            assert {(t, j) for m, j in zip(mentions, matched, strict=True) for t in m.tokens} == grounded
            stated = [(matched[a], r, matched[b]) for a, r, b in relations]
            assert stated == [(r["subject"], r["relation"], r["object"]) for r in cap["relations"]]
            for a, r, b in stated:
                assert relation_holds(objects[a], objects[b], r)


def test_reference_zero_is_canonical(grounding):
    for g in grounding["images"].values():
        tokens = g["captions"][0]["tokens"]
        assert tokens == canonical_caption(list(reversed(g["objects"])))
        assert len(tokens) <= 16 and tokens[0] == "a"
        # reading order: objects sorted by their cell, row-major
        cells = [tuple(o["cell"]) for o in g["objects"]]
        assert cells == sorted(cells)


def test_canonical_caption_patterns():
    def obj(j, shape, colour, size, cx, cy):
        return {"id": j, "shape": shape, "colour": colour, "size": size,
                "geometry": {"type": "circle", "center": [cx, cy], "radius": 3}}

    a = obj(0, "circle", "red", "small", 10, 10)
    b = obj(1, "square", "blue", "big", 50, 12)
    c = obj(2, "triangle", "green", "small", 52, 50)
    assert " ".join(canonical_caption([a])) == "a small red circle"
    assert " ".join(canonical_caption([a, b])) == "a small red circle left of a big blue square"
    assert " ".join(canonical_caption([a, b, c])) == (
        "a small red circle left of a big blue square above a small green triangle")


def test_parse_caption_on_generated_text():
    mentions, relations = parse_caption(
        tokenize("there is a red circle to the right of the big square and small blue"))
    assert mentions == [Mention(None, "red", "circle", [3, 4]), Mention("big", None, "square", [10, 11])]
    assert relations == [(0, "right of", 1)]
    assert parse_caption(["a", "red"]) == ([], [])
    mentions, relations = parse_caption(tokenize("a circle below a circle"))
    assert [m.shape for m in mentions] == ["circle", "circle"] and relations == [(0, "below", 1)]


def test_match_mentions():
    objects = [{"shape": "circle", "colour": "red", "size": "small"},
               {"shape": "circle", "colour": "blue", "size": "small"},
               {"shape": "square", "colour": "green", "size": "big"}]
    # one-to-one preferred: the bare circle takes the circle the red one leaves free
    mentions = [Mention(None, None, "circle", [1]), Mention(None, "red", "circle", [4, 5])]
    assert match_mentions(mentions, objects) == [1, 0]
    # a repeated mention still finds its object; disagreeing attributes find none
    mentions = [Mention(None, "green", "square", [0, 1]), {"size": None, "colour": "green",
                "shape": "square", "tokens": [3, 4]}, Mention("small", None, "square", [6, 7]),
                Mention(None, "green", "triangle", [9, 10])]
    assert match_mentions(mentions, objects) == [2, 2, None, None]


def test_relation_holds_uses_the_dominant_axis():
    def at(x, y):
        return {"geometry": {"type": "polygon", "points": [[x - 2, y - 2], [x + 2, y + 2]]}}

    assert relation_holds(at(10, 10), at(30, 20), "left of")
    assert relation_holds(at(30, 20), at(10, 10), "right of")
    assert relation_holds(at(10, 10), at(15, 40), "above")
    assert relation_holds(at(15, 40), at(10, 10), "below")
    assert not relation_holds(at(10, 10), at(20, 20), "left of")  # diagonal: no dominant axis
    with pytest.raises(ValueError):
        relation_holds(at(0, 0), at(1, 0), "near")


def test_compositional_split(tmp_path):
    cfg = ShapesConfig(num_images=60, seed=1, image_size=32, compositional=True,
                       val_fraction=0.15, test_fraction=0.2)
    root = generate_shapes(tmp_path / "comp", cfg)
    g = load_grounding(root / "grounding.json")
    heldout = {tuple(p) for p in g["heldout_pairs"]}
    assert heldout == set(shapes.heldout_pairs(1)) and len(heldout) == 3
    # every colour and every shape still occurs in training
    assert {c for c, _ in heldout} < set(COLOURS) and len({s for _, s in heldout}) == 3
    splits = {im["imgid"]: im["split"] for im in json.loads((root / "dataset.json").read_text())["images"]}
    assert sum(s == "test" for s in splits.values()) == 12
    for imgid, entry in g["images"].items():
        pairs = {(o["colour"], o["shape"]) for o in entry["objects"]}
        assert bool(pairs & heldout) == (splits[int(imgid)] == "test")


@pytest.mark.parametrize("image_size", [32, 256])
def test_other_image_sizes(tmp_path, image_size):
    root = generate_shapes(tmp_path / "ds", ShapesConfig(num_images=12, image_size=image_size))
    g = load_grounding(root)
    for entry in g["images"].values():
        union = sum(object_mask(o, image_size).astype(int) for o in entry["objects"])
        assert union.max() == 1
        with Image.open(root / "images" / entry["filename"]) as img:
            assert img.size == (image_size, image_size)


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="too small"):
        ShapesConfig(image_size=16)


def test_existing_output_is_kept_or_replaced(tmp_path):
    out = tmp_path / "ds"
    cfg = ShapesConfig(num_images=6, image_size=32)
    generate_shapes(out, cfg)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    generate_shapes(out, cfg)  # same config: kept
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    generate_shapes(out, ShapesConfig(num_images=8, image_size=32))  # other config: replaced
    assert len(list((out / "images").iterdir())) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary leftovers
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path / "other", cfg)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "ds", ShapesConfig(num_images=4, image_size=32))
    assert list(tmp_path.iterdir()) == []
