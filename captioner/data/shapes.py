"""``shapes``: an embedded synthetic data set where caption quality and attention can be measured.

Each image shows 1-3 flat shapes on a white background. Every object has a shape (``SHAPES``), a
colour (``COLOURS``, distinct within an image) and a size (``SIZES``), and sits in its own cell of a
3x3 layout with a little jitter. Layouts never put two objects on a diagonal of the grid, so for any
pair of objects one axis clearly dominates their displacement and exactly one of ``RELATIONS``
holds (see ``spatial_relation``).

Files written by ``generate_shapes(out_dir, config)``::

    out_dir/dataset.json    Karpathy format ("dataset": "shapes"), 5 references per image
    out_dir/images/*.png    RGB PNGs, image_size x image_size
    out_dir/grounding.json  objects (attributes, box, exact geometry) and, per reference, which
                            object every colour/size/shape token describes and which relations
                            the caption states

Caption grammar (all references, and what ``parse_caption`` reads back)::

    mention  := [article] [size] [colour] shape         e.g. "a small red circle"
    relation := ["is"] ("left of" | "to the left of" | "on the left of" | "right of" | ...
                        | "above" | "below")
    A relation phrase between two consecutive mentions states that the first is <relation> the
    second; any other words between mentions ("and", "and there is", ...) state nothing.

Reference 0 is canonical, a deterministic function of the scene (``canonical_caption``): the
objects in reading order (row-major cells) with article "a" and the short relation forms,
``A``, ``A rel(A,B) B`` or the chain ``A rel(A,B) B rel(B,C) C`` (at most 16 tokens). The other four
are distinct variants of at most ``MAX_TOKENS`` tokens: an opener that never starts with "a"
("there is", "we see", "the image shows", "only", ...), then the objects in a random order joined by
relation phrases in any of their forms or by "and", sometimes "on a white background".

Compositional split (``ShapesConfig(compositional=True)``): ``heldout_pairs(seed)`` picks 3 of the 15
colour-shape pairs (20%), no two sharing a colour or a shape, so every colour and every shape
still occurs in training. Train and val scenes never contain a held-out pair; every test scene
contains at least one. The pairs are listed in ``grounding.json`` under ``"heldout_pairs"``.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from captioner.files import DiskFullError, atomic_write_json, write_file

logger = logging.getLogger(__name__)

COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "big")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 190, 20),
    "purple": (140, 60, 180),
}
BACKGROUND_RGB = (255, 255, 255)
MAX_TOKENS = 20  # longest reference; the canonical one has at most 16
NUM_REFERENCES = 5
GRID = 3

# Surface forms of each relation; form 0 is the one canonical captions use.
_REL_FORMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "left of": (("left", "of"), ("to", "the", "left", "of"), ("on", "the", "left", "of")),
    "right of": (("right", "of"), ("to", "the", "right", "of"), ("on", "the", "right", "of")),
    "above": (("above",),),
    "below": (("below",),),
}
# The word that identifies a relation phrase when parsing (generated captions may be sloppy).
_REL_KEYWORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_OBJECT_COUNT_P = (0.2, 0.4, 0.4)  # P(1, 2, 3 objects)
_HELDOUT_PAIRS = 3  # 20% of the 15 colour-shape pairs


@dataclass
class ShapesConfig:
    """How to generate a ``shapes`` data set; stored in ``grounding.json`` as ``"config"``."""

    num_images: int = 4000
    seed: int = 0
    image_size: int = 64
    compositional: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must lie in [0, 1)")
        _radii(self.image_size)  # raises for sizes too small to draw both sizes apart


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _cell_edges(image_size: int) -> list[int]:
    return [round(k * image_size / GRID) for k in range(GRID + 1)]


def _radii(image_size: int) -> dict[str, int]:
    """Half-extent in pixels of small and big objects (an object spans ``2 r + 1`` pixels)."""
    edges = _cell_edges(image_size)
    width = min(b - a for a, b in itertools.pairwise(edges))
    r_max = (width - 3) // 2  # keep a 1 px margin in the cell on each side -> >= 2 px between objects
    big = min(r_max, round(0.36 * image_size / GRID))
    small = round(0.5 * big)
    if small < 1 or small >= big:
        raise ValueError(f"image_size {image_size} is too small for the shapes data set (need >= 24)")
    return {"small": small, "big": big}


def _jitter(image_size: int) -> int:
    # Small enough that same-row neighbours and knight-move pairs keep a clearly dominant axis.
    return round(0.08 * image_size / GRID)


def _is_diagonal(a: int, b: int) -> bool:
    return abs(a // GRID - b // GRID) == abs(a % GRID - b % GRID)


# Cell sets (row-major indices) with no two cells on a diagonal, for 1, 2 and 3 objects.
_LAYOUTS = {
    k: [c for c in itertools.combinations(range(GRID * GRID), k)
        if not any(_is_diagonal(a, b) for a, b in itertools.combinations(c, 2))]
    for k in (1, 2, 3)
}


def _geometry(shape: str, cx: int, cy: int, r: int) -> dict[str, Any]:
    if shape == "circle":
        return {"type": "circle", "center": [cx, cy], "radius": r}
    if shape == "square":
        pts = [[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]]
    elif shape == "triangle":
        pts = [[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return {"type": "polygon", "points": pts}


def _draw(draw: ImageDraw.ImageDraw, geometry: Mapping[str, Any], fill: Any) -> None:
    """The single place that rasterises a geometry, for images and masks alike."""
    if geometry["type"] == "circle":
        (cx, cy), r = geometry["center"], geometry["radius"]
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif geometry["type"] == "polygon":
        draw.polygon([tuple(p) for p in geometry["points"]], fill=fill)
    else:
        raise ValueError(f"unknown geometry type {geometry['type']!r}")


def object_mask(obj: Mapping[str, Any], image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels the object covers, rasterised exactly as drawn."""
    img = Image.new("L", (image_size, image_size), 0)
    _draw(ImageDraw.Draw(img), obj["geometry"], 255)
    return np.asarray(img) > 0  # (H, W)


def object_center(obj: Mapping[str, Any]) -> tuple[float, float]:
    """``(x, y)`` centre of the object's geometry (the middle of its extent for polygons)."""
    geom = obj["geometry"]
    if geom["type"] == "circle":
        cx, cy = geom["center"]
        return float(cx), float(cy)
    xs = [p[0] for p in geom["points"]]
    ys = [p[1] for p in geom["points"]]
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2


def spatial_relation(obj_a: Mapping[str, Any], obj_b: Mapping[str, Any]) -> str | None:
    """The relation of ``obj_a`` to ``obj_b`` along the dominant axis of their centres' displacement.

    ``None`` when neither axis dominates (never the case for two objects of one scene).
    """
    (ax, ay), (bx, by) = object_center(obj_a), object_center(obj_b)
    dx, dy = bx - ax, by - ay  # image y grows downwards
    if abs(dx) > abs(dy):
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return None


def relation_holds(obj_a: Mapping[str, Any], obj_b: Mapping[str, Any], relation: str) -> bool:
    """Whether ``obj_a`` is ``relation`` ``obj_b`` (dominant axis of the centres' displacement)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    return spatial_relation(obj_a, obj_b) == relation


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NP:
    obj: int
    article: str | None = "a"


@dataclass(frozen=True)
class _Rel:
    subject: int
    object: int
    form: int = 0


def _render(parts: Sequence[Any], objects: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Turn template parts into tokens, token groundings and the relations stated."""
    tokens: list[str] = []
    groundings: list[dict[str, int]] = []
    relations: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, _NP):
            obj = objects[part.obj]
            if part.article:
                tokens.append(part.article)
            for key in ("size", "colour", "shape"):
                groundings.append({"token": len(tokens), "object": part.obj})
                tokens.append(obj[key])
        elif isinstance(part, _Rel):
            rel = spatial_relation(objects[part.subject], objects[part.object])
            assert rel is not None, "scene objects must have a dominant-axis relation"
            forms = _REL_FORMS[rel]
            tokens.extend(forms[part.form % len(forms)])
            relations.append({"subject": part.subject, "relation": rel, "object": part.object})
        else:
            tokens.append(part)
    return {"tokens": tokens, "groundings": groundings, "relations": relations}


def _canonical_parts(n: int) -> list[Any]:
    parts: list[Any] = [_NP(0)]
    for j in range(1, n):
        parts += [_Rel(j - 1, j), _NP(j)]
    return parts


def canonical_caption(objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """Reference 0 of a scene: its objects in reading order (``objects`` sorted by ``id``)."""
    ordered = sorted(objects, key=lambda o: o["id"])
    return _render(_canonical_parts(len(ordered)), ordered)["tokens"]


# Openers of the variant references. None starts with "a", the canonical reference's first word:
# at every step the canonical continuation is then the most frequent one in training, so a
# well-trained model's greedy caption is the canonical reference (the quality bar counts exact
# matches), while the other four keep the references varied.
_OPENERS: tuple[tuple[str, ...], ...] = (
    ("there", "is"), ("an", "image", "with"), ("this", "is"), ("here", "is"), ("we", "see"),
    ("you", "can", "see"), ("in", "the", "picture", "there", "is"), ("the", "image", "shows"),
)
_SINGLE_OPENERS: tuple[tuple[str, ...], ...] = (("only",), ("one",))  # + _NP without article


def _variant_parts(n: int, rng: np.random.Generator) -> list[Any]:
    """One random template instance mentioning all ``n`` objects: an opener, then the objects in
    a random order joined by relation phrases (three surface forms each) or "and"."""

    def art() -> str:
        return "the" if rng.random() < 0.25 else "a"

    def rel(a: int, b: int) -> _Rel:
        return _Rel(a, b, int(rng.integers(3)))

    openers = _OPENERS + (_SINGLE_OPENERS if n == 1 else ())
    opener = list(openers[int(rng.integers(len(openers)))])
    order = [int(i) for i in rng.permutation(n)]
    body: list[Any] = [_NP(order[0], None if opener[0] == "one" else art())]
    for prev, cur in zip(order, order[1:]):
        body += [rel(prev, cur) if rng.random() < 0.7 else "and", _NP(cur, art())]
    suffix = ["on", "a", "white", "background"] if rng.random() < 0.2 else []
    return [*opener, *body, *suffix]


def _captions(objects: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Canonical reference plus ``NUM_REFERENCES - 1`` distinct template variants."""
    caps = [_render(_canonical_parts(len(objects)), objects)]
    seen = {tuple(caps[0]["tokens"])}
    for _ in range(10_000):
        if len(caps) == NUM_REFERENCES:
            return caps
        cap = _render(_variant_parts(len(objects), rng), objects)
        key = tuple(cap["tokens"])
        if key not in seen and len(key) <= MAX_TOKENS:
            seen.add(key)
            caps.append(cap)
    raise RuntimeError("could not draw enough distinct captions")  # unreachable with these templates


@dataclass
class Mention:
    """A noun phrase found by ``parse_caption``: attributes and the token positions naming them."""

    size: str | None
    colour: str | None
    shape: str
    tokens: list[int]


def parse_caption(tokens: Sequence[str]) -> tuple[list[Mention], list[tuple[int, str, int]]]:
    """Parse a (reference or generated) caption into mentions and the relations between them.

    A mention is a shape word with the size/colour words directly before it (at most one of
    each; attribute words that do not lead into a shape word are ignored). A relation
    ``(i, relation, i + 1)`` is stated when the words between mentions ``i`` and ``i + 1``
    contain a relation keyword (``left``, ``right``, ``above``, ``below``; the first one wins).
    """
    mentions: list[Mention] = []
    gaps: list[list[str]] = []  # words between consecutive mentions
    prev_end = 0  # first position after the previous mention's shape word
    for i, word in enumerate(tokens):
        if word not in SHAPES:
            continue
        attrs: dict[str, int] = {}
        j = i - 1
        while j >= prev_end:
            kind = "size" if tokens[j] in SIZES else "colour" if tokens[j] in COLOURS else None
            if kind is None or kind in attrs:
                break
            attrs[kind] = j
            j -= 1
        if mentions:
            gaps.append(list(tokens[prev_end: j + 1]))
        mentions.append(Mention(
            size=tokens[attrs["size"]] if "size" in attrs else None,
            colour=tokens[attrs["colour"]] if "colour" in attrs else None,
            shape=word,
            tokens=sorted([*attrs.values(), i]),
        ))
        prev_end = i + 1
    relations = []
    for k, gap in enumerate(gaps):
        rel = next((_REL_KEYWORDS[w] for w in gap if w in _REL_KEYWORDS), None)
        if rel is not None:
            relations.append((k, rel, k + 1))
    return mentions, relations


def _field(mention: Mention | Mapping[str, Any], name: str) -> Any:
    return mention.get(name) if isinstance(mention, Mapping) else getattr(mention, name)


def match_mentions(
    mentions: Sequence[Mention | Mapping[str, Any]], objects: Sequence[Mapping[str, Any]]
) -> list[int | None]:
    """Index into ``objects`` of the object each mention refers to, ``None`` when none agrees.

    An object agrees when its shape equals the mention's and so do its size and colour where the
    mention names them. A one-to-one assignment covering as many mentions as possible is preferred
    (earliest objects first); mentions it leaves out fall back to their first agreeing object.
    For ``grounding.json`` scenes the index equals the object's ``id``.
    """
    candidates = []
    for m in mentions:
        cands = []
        for k, obj in enumerate(objects):
            if obj["shape"] != _field(m, "shape"):
                continue
            if any(_field(m, a) is not None and _field(m, a) != obj[a] for a in ("size", "colour")):
                continue
            cands.append(k)
        candidates.append(cands)

    owner: dict[int, int] = {}  # object -> mention, a maximum bipartite matching (Kuhn)

    def augment(i: int, visited: set[int]) -> bool:
        for k in candidates[i]:
            if k in visited:
                continue
            visited.add(k)
            if k not in owner or augment(owner[k], visited):
                owner[k] = i
                return True
        return False

    for i in range(len(mentions)):
        augment(i, set())
    assigned: list[int | None] = [None] * len(mentions)
    for k, i in owner.items():
        assigned[i] = k
    return [a if a is not None else (c[0] if c else None) for a, c in zip(assigned, candidates, strict=True)]


# ---------------------------------------------------------------------------------------------
# Scenes and splits
# ---------------------------------------------------------------------------------------------


def heldout_pairs(seed: int) -> list[tuple[str, str]]:
    """The ``(colour, shape)`` pairs held out of train/val in the compositional split."""
    rng = np.random.default_rng([seed, 1])
    colours = rng.permutation(len(COLOURS))
    shapes = rng.permutation(len(SHAPES))
    pairs = [(COLOURS[colours[i]], SHAPES[shapes[i]]) for i in range(_HELDOUT_PAIRS)]
    return sorted(pairs)


def _assign_splits(config: ShapesConfig) -> list[str]:
    n = config.num_images

    def count(fraction: float) -> int:
        c = round(n * fraction)
        return max(c, 1) if fraction > 0 and n >= 3 else c  # tiny sets still get every split

    n_val, n_test = count(config.val_fraction), count(config.test_fraction)
    if n_val + n_test >= n:
        raise ValueError(f"{n} images leave no training images with val {n_val} and test {n_test}")
    labels = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    return [str(s) for s in labels[np.random.default_rng([config.seed, 0]).permutation(n)]]


def _sample_scene(
    rng: np.random.Generator, image_size: int, heldout: set[tuple[str, str]], need: bool | None
) -> list[dict[str, Any]]:
    """Objects of one scene in reading order. ``need``: True = must contain a held-out pair,
    False = must not, None = unconstrained."""
    radii, jitter = _radii(image_size), _jitter(image_size)
    edges = _cell_edges(image_size)
    n = int(rng.choice(3, p=_OBJECT_COUNT_P)) + 1
    layouts = _LAYOUTS[n]
    cells = layouts[int(rng.integers(len(layouts)))]
    while True:  # rejection sampling; P(scene has a held-out pair) is about 0.35
        colours = [COLOURS[int(i)] for i in rng.choice(len(COLOURS), n, replace=False)]
        shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=n)]
        has = any(pair in heldout for pair in zip(colours, shapes, strict=True))
        if need is None or has == need:
            break
    sizes = [SIZES[int(i)] for i in rng.integers(len(SIZES), size=n)]
    objects = []
    for j, cell in enumerate(cells):
        row, col = divmod(cell, GRID)
        r = radii[sizes[j]]
        centre = []
        for k in (col, row):  # x from the column, y from the row
            lo, hi = edges[k] + 1 + r, edges[k + 1] - 2 - r  # inside the cell with a 1 px margin
            mid = (edges[k] + edges[k + 1] - 1) // 2
            centre.append(int(rng.integers(max(lo, mid - jitter), min(hi, mid + jitter) + 1)))
        objects.append({
            "id": j, "shape": shapes[j], "colour": colours[j], "size": sizes[j],
            "cell": [row, col], "geometry": _geometry(shapes[j], centre[0], centre[1], r),
        })
    return objects


def _render_image(objects: Sequence[Mapping[str, Any]], image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw(draw, obj["geometry"], COLOUR_RGB[obj["colour"]])
    return img


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _write_json(path: Path, data: Any) -> None:
    # Sorted and compact: the same config gives byte-identical files.
    atomic_write_json(path, data, sort_keys=True, separators=(",", ":"), newline=True)


def _is_complete(out_dir: Path) -> bool:
    return (out_dir / "dataset.json").is_file() and (out_dir / "grounding.json").is_file()


def generate_shapes(out_dir: str | os.PathLike, config: ShapesConfig | None = None) -> Path:
    """Generate the data set into ``out_dir`` (see the module docstring) and return ``out_dir``.

    Deterministic: the same config gives byte-identical files. Written into a temporary sibling
    directory and renamed into place at the end, so ``out_dir`` is either absent, the previous
    data set, or complete. If ``out_dir`` already holds a data set generated with the same config
    it is kept as it is; one generated with another config is replaced. Any other non-empty
    ``out_dir`` raises ``FileExistsError``.
    """
    config = config or ShapesConfig()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if _is_complete(out_dir):
            try:
                old = load_grounding(out_dir).get("config")
            except (OSError, ValueError):
                old = None
            if old == asdict(config):
                logger.info("shapes: %s already holds this data set", out_dir)
                return out_dir
            if old is None:
                raise FileExistsError(f"{out_dir} exists and is not a shapes data set")
            logger.warning("shapes: replacing %s (generated with %s)", out_dir, old)
        elif any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists, is not empty and is not a shapes data set")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _generate_into(tmp, config)
        tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
        if out_dir.exists():  # swap the old data set out, then delete it
            trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, trash / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except DiskFullError as full:  # named as the data set's file, not the temporary folder's
        shutil.rmtree(tmp, ignore_errors=True)
        if full.path is not None and full.path.is_relative_to(tmp):
            full.path = out_dir / full.path.relative_to(tmp)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("shapes: wrote %d images to %s in %.1fs", config.num_images, out_dir,
                time.perf_counter() - start)
    return out_dir


def _generate_into(root: Path, config: ShapesConfig) -> None:
    size = config.image_size
    (root / "images").mkdir()
    heldout = set(heldout_pairs(config.seed)) if config.compositional else set()
    splits = _assign_splits(config)
    digits = max(6, len(str(config.num_images - 1)))
    karpathy, grounding = [], {}
    log_every = max(1, config.num_images // 10)
    for imgid, split in enumerate(splits):
        # One generator per image: an image never depends on how many draws earlier ones took.
        rng = np.random.default_rng([config.seed, 2, imgid])
        need = (split == "test") if config.compositional else None
        objects = _sample_scene(rng, size, heldout, need)
        for obj in objects:
            obj["box"] = _box(object_mask(obj, size))
        filename = f"{imgid:0{digits}d}.png"
        png = io.BytesIO()
        _render_image(objects, size).save(png, format="PNG", compress_level=6, optimize=False)
        write_file(root / "images" / filename, png.getvalue())
        sentences, caps = [], []
        for k, cap in enumerate(_captions(objects, rng)):
            sentid = imgid * NUM_REFERENCES + k
            raw = " ".join(cap["tokens"]).capitalize() + "."
            sentences.append({"tokens": cap["tokens"], "raw": raw, "imgid": imgid, "sentid": sentid})
            caps.append({"sentid": sentid, **cap})
        karpathy.append({
            "filename": filename, "imgid": imgid, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })
        grounding[str(imgid)] = {"filename": filename, "objects": objects, "captions": caps}
        if (imgid + 1) % log_every == 0:
            logger.info("shapes: %d/%d images", imgid + 1, config.num_images)
    _write_json(root / "grounding.json", {
        "image_size": size, "config": asdict(config), "background": list(BACKGROUND_RGB),
        "colours": {c: list(rgb) for c, rgb in COLOUR_RGB.items()},
        "heldout_pairs": [list(p) for p in sorted(heldout)], "images": grounding,
    })
    _write_json(root / "dataset.json", {"dataset": "shapes", "images": karpathy})


def load_grounding(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``grounding.json`` (give the file or the data set directory); keys of ``"images"``
    are the ``imgid``s as strings, as written."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "grounding.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise ValueError(f"{path}: not a shapes grounding file (expected an 'images' object)")
    return data
