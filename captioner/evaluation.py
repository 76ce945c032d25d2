"""Evaluation the way the field reports it: caption a split once per image, score with COCOEvalCap.

Two entry points, one scoring path:

- :func:`evaluate_checkpoint` captions a data set split with a trained model (batched decoding,
  every image once, not once per reference) and scores the captions against *all* raw references
  with :func:`captioner.metrics.score_captions`; on ``shapes`` it adds attention grounding
  (:func:`captioner.metrics.evaluate_grounding`).
- :func:`evaluate_predictions` scores any model's COCO results file
  (``[{"image_id": int, "caption": str}, ...]``) against a Karpathy split file or a COCO caption
  annotation file.

Both return an :class:`Evaluation`; :meth:`Evaluation.to_json` is the metrics file (COCOEvalCap
keys on their 0–1 scale, flat) and :func:`write_report` a folder with a markdown summary, the
validation curves of the run and attention figures of the best and worst images.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from captioner.data.datamodule import (
    CaptionDataModule,
    CaptionDataset,
    collate_captions,
)
from captioner.data.records import ImageRecord
from captioner.inference import CaptionPipeline
from captioner.metrics import (
    EvalResult,
    check_ids,
    evaluate_grounding,
    exact_match,
    format_table,
    score_captions,
)

logger = logging.getLogger(__name__)

NLTK_NOTE = ("nltk.translate.bleu_score.corpus_bleu on lower-cased whitespace tokens (the popular "
             "tutorial's BLEU-4): a different brevity penalty and no smoothing, not comparable "
             "with Bleu_4")
SCALE_NOTE = "0-1, as pycocoevalcap's COCOEvalCap reports them (CIDEr is CIDEr-D); tables print x100"
# How many folders above the checkpoint's folder are searched for training logs.
LOG_SEARCH_LEVELS = 2


class ResultsFormatError(ValueError):
    """A results file that is not ``[{"image_id": int, "caption": str}, ...]``; names file and field."""


class ImageIdMismatch(ValueError):
    """Predictions and references cover different images."""


# ---------------------------------------------------------------------------------------------
# captioning
# ---------------------------------------------------------------------------------------------
@dataclass
class GeneratedCaption:
    image_id: int
    words: list[str]
    score: float
    alphas: Tensor | None  # (T, h, w), one map per word; None when not kept

    @property
    def text(self) -> str:
        return " ".join(self.words)


def caption_records(
    pipeline: CaptionPipeline,
    records: Sequence[ImageRecord],
    batch_size: int = 32,
    num_workers: int = 0,
    keep_attention: bool = True,
    skip_bad_images: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[GeneratedCaption]:
    """Caption every record once, in batches, in the records' order.

    ``on_batch(n)`` is called with the number of images of each finished batch (progress bars).
    With ``skip_bad_images`` unreadable images are left out (logged), otherwise they raise.
    """
    vocab = pipeline.loaded.vocab
    # mode="first": one item per image (its first reference only feeds the unused caption tensor).
    dataset = CaptionDataset(records, vocab, pipeline.loaded.preprocessing, mode="first",
                             skip_bad_images=skip_bad_images)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_captions)
    out: list[GeneratedCaption] = []
    for batch in loader:
        if not batch:  # every image of the batch was unreadable and skipped
            continue
        caps = pipeline.caption_tensors(batch["images"])  # images (B, 3, S, S)
        for image_id, cap in zip(batch["image_ids"].tolist(), caps):
            out.append(GeneratedCaption(int(image_id), cap.words, cap.score,
                                        cap.alphas if keep_attention else None))
        if on_batch is not None:
            on_batch(len(caps))
    return out


def results_json(captions: Iterable[GeneratedCaption]) -> list[dict[str, Any]]:
    """The COCO results format: ``[{"image_id": int, "caption": str}, ...]``."""
    return [{"image_id": int(c.image_id), "caption": c.text} for c in captions]


# ---------------------------------------------------------------------------------------------
# results and reference files
# ---------------------------------------------------------------------------------------------
def load_results(path: str | os.PathLike) -> dict[int, str]:
    """Read a COCO results file into ``{image_id: caption}`` (file order).

    Raises ``FileNotFoundError``, or :class:`ResultsFormatError` naming the file and the entry's
    field for anything but a non-empty list of ``{"image_id": int, "caption": str}`` objects with
    one caption per image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsFormatError(f"{path}: not valid JSON ({err})") from None
    expected = 'a COCO results list [{"image_id": int, "caption": str}, ...]'
    if not isinstance(data, list):
        raise ResultsFormatError(f"{path}: expected {expected}, got a JSON {_json_type(data)}")
    if not data:
        raise ResultsFormatError(f"{path}: the results list is empty")
    out: dict[int, str] = {}
    first_at: dict[int, int] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry [{i}]"
        if not isinstance(entry, dict):
            raise ResultsFormatError(f"{where}: expected an object with 'image_id' and 'caption', "
                                     f"got a JSON {_json_type(entry)}")
        for key in ("image_id", "caption"):
            if key not in entry:
                raise ResultsFormatError(f"{where}: missing field '{key}'")
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            hint = " (a string: write the id as a JSON number)" if isinstance(image_id, str) else ""
            raise ResultsFormatError(f"{where}: field 'image_id' must be an integer, "
                                     f"got {image_id!r}{hint}")
        if not isinstance(caption, str):
            raise ResultsFormatError(f"{where}: field 'caption' must be a string, got {caption!r}")
        if image_id in out:
            raise ResultsFormatError(f"{where}: image_id {image_id} appears again (first at "
                                     f"[{first_at[image_id]}]); give one caption per image")
        out[image_id] = caption
        first_at[image_id] = i
    return out


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


@dataclass
class References:
    """Reference captions per image id: raw text (what is scored) and tokens (exact match)."""

    raw: dict[int, list[str]]
    tokens: dict[int, list[list[str]]]
    source: str

    def subset(self, ids: Iterable[int]) -> References:
        ids = list(ids)
        return References({k: self.raw[k] for k in ids}, {k: self.tokens[k] for k in ids},
                          self.source)


def references_from_records(records: Sequence[ImageRecord], source: str) -> References:
    raw = {r.image_id: list(r.raw) or [" ".join(c) for c in r.captions] for r in records}
    return References(raw, {r.image_id: [list(c) for c in r.captions] for r in records}, source)


def karpathy_references(path: str | os.PathLike, split: str) -> tuple[References, list[ImageRecord]]:
    """References of one split of a Karpathy split file (``ValueError`` if it has no images)."""
    from captioner.data.karpathy import read_karpathy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file not found")
    # Image paths are not needed for scoring; the root only completes the records.
    records = read_karpathy(path, path.parent, restval_to_train=split != "restval").get(split, [])
    records = [r for r in records if r.captions]
    if not records:
        raise ValueError(f"{path}: split {split!r} has no images with captions")
    return references_from_records(records, str(path)), records


def coco_annotation_references(path: str | os.PathLike) -> tuple[References, list[ImageRecord]]:
    """References from a COCO caption annotation file (images without captions left out)."""
    from captioner.data.coco import read_coco_annotations

    path = Path(path)
    records = [r for r in read_coco_annotations(path, path.parent) if r.captions]
    if not records:
        raise ValueError(f"{path}: no image has captions")
    return references_from_records(records, str(path)), records


def align_ids(
    predictions: Mapping[int, str], references: References, allow_missing: bool = False
) -> tuple[dict[int, str], References, dict[str, int]]:
    """Predictions and references restricted to the same images (the references' order).

    Without ``allow_missing`` any difference raises :class:`ImageIdMismatch` with counts and
    examples; with it, only the images in both are kept (warning) and the counts are returned.
    """
    try:
        check_ids(predictions.keys(), references.raw.keys())
    except ValueError as err:
        if not allow_missing:
            raise ImageIdMismatch(str(err)) from None
        common = [k for k in references.raw if k in predictions]
        if not common:
            raise ImageIdMismatch(f"{err}; no image is in both") from None
        counts = {"missing_predictions": len(references.raw) - len(common),
                  "extra_predictions": len(predictions) - len(common)}
        logger.warning("%s; scoring only the %d images in both", err, len(common))
        return {k: predictions[k] for k in common}, references.subset(common), counts
    return {k: predictions[k] for k in references.raw}, references, {}


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scores of one set of captions, and what is needed to report them."""

    result: EvalResult
    predictions: dict[int, str]
    references: References
    exact_match: float
    settings: dict[str, Any] = field(default_factory=dict)
    grounding: dict[str, Any] | None = None
    captions: dict[int, GeneratedCaption] = field(default_factory=dict)  # checkpoint mode
    records: dict[int, ImageRecord] = field(default_factory=dict)  # image paths, when known

    def to_json(self) -> dict[str, Any]:
        """The metrics file: COCOEvalCap keys (0–1) first, then how they were obtained."""
        r = self.result
        out: dict[str, Any] = dict(r.metrics)
        out.update({
            "scale": SCALE_NOTE,
            "tokenizer": r.tokenizer,
            "skipped": list(r.skipped),
            "skip_reasons": dict(r.skip_reasons),
            "nltk_corpus_bleu4": r.nltk_corpus_bleu4,
            "nltk_corpus_bleu4_note": NLTK_NOTE,
            "exact_match": self.exact_match,
            "num_images": r.num_images,
            **self.settings,
        })
        if self.grounding is not None:
            out.update(self.grounding)
        return _finite(out)

    def per_image(self) -> list[dict[str, Any]]:
        """Caption, references and scores of every image, best CIDEr first."""
        return [{"image_id": k, "caption": self.predictions[k],
                 "references": self.references.raw[k], **self.result.per_image[k]}
                for k, _ in self.result.ranked("CIDEr")]


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _score(
    predictions: dict[int, str], references: References, meteor: bool, spice: bool
) -> tuple[EvalResult, float]:
    result = score_captions(predictions, references.raw, spice=spice, meteor=meteor)
    if not meteor and "METEOR" not in result.skipped:
        result.skipped.append("METEOR")
        result.skip_reasons["METEOR"] = "disabled by the caller (meteor=False)"
    return result, exact_match(predictions, references.tokens)


def evaluate_checkpoint(
    pipeline: CaptionPipeline,
    dm: CaptionDataModule,
    split: str = "test",
    batch_size: int | None = None,
    num_workers: int | None = None,
    meteor: bool = True,
    spice: bool = False,
    keep_attention: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Caption ``split`` of a data set once per image and score the captions against all its raw
    references. ``dm``: the data module, with the checkpoint's preprocessing.

    Decoding uses the checkpoint's vocabulary and preprocessing. ``batch_size``/``num_workers``
    default to the config's ``eval_batch_size``/``num_workers``. When the source has word-region
    grounding (``shapes``: a ``grounding.json`` beside the data) the attention maps are scored too; ``keep_attention``
    keeps every image's maps on the result (for figures).
    """
    records = dm.split_records(split)
    if not records:
        raise ValueError(f"split {split!r} of the data set has no images")
    grounding_file = dm.source.grounding_file()
    has_grounding = grounding_file is not None and grounding_file.is_file()
    batch_size = batch_size or dm.eval_batch_size
    num_workers = dm.num_workers if num_workers is None else num_workers

    start = time.perf_counter()
    captions = caption_records(pipeline, records, batch_size, num_workers,
                               keep_attention=keep_attention or has_grounding,
                               skip_bad_images=dm.skip_bad_images, on_batch=on_batch)
    seconds_captioning = time.perf_counter() - start
    logger.info("captioned %d %s images in %.1f s (beam %d, batch %d)", len(captions), split,
                seconds_captioning, pipeline.beam_size, batch_size)

    by_id = {c.image_id: c for c in captions}
    references = references_from_records(records, f"{dm.dataset}:{split}")
    if len(by_id) < len(records):
        logger.warning("%d of %d images could not be read and are not scored",
                       len(records) - len(by_id), len(records))
        references = references.subset([r.image_id for r in records if r.image_id in by_id])
    predictions = {k: by_id[k].text for k in references.raw}
    result, exact = _score(predictions, references, meteor, spice)

    grounding = None
    if has_grounding:
        from captioner.data.shapes import load_grounding

        samples = ({"image_id": c.image_id, "tokens": c.words, "attention": c.alphas}
                   for c in captions)
        grounding = evaluate_grounding(samples, load_grounding(grounding_file))

    settings = {
        "mode": "checkpoint",
        "checkpoint": str(pipeline.loaded.path),
        "dataset": dm.dataset,
        "split": split,
        "beam_size": pipeline.beam_size,
        "max_length": pipeline.max_length,
        "length_penalty": pipeline.length_penalty,
        "batch_size": batch_size,
        "device": str(pipeline.device),
        "quantize": pipeline.quantize,
        "images_not_read": len(records) - len(by_id),
        "seconds_captioning": round(seconds_captioning, 3),
        "seconds_scoring": round(result.seconds, 3),
    }
    if not keep_attention:
        for c in captions:
            c.alphas = None
    return Evaluation(result, predictions, references, exact, settings, grounding,
                      captions=by_id, records={r.image_id: r for r in records})


def evaluate_predictions(
    predictions_path: str | os.PathLike,
    references_path: str | os.PathLike | None = None,
    coco_annotations: str | os.PathLike | None = None,
    split: str = "test",
    allow_missing: bool = False,
    meteor: bool = True,
    spice: bool = False,
) -> Evaluation:
    """Score a COCO results file against a Karpathy split file's ``split`` (``references_path``)
    or a COCO caption annotation file (``coco_annotations``).

    Raises :class:`ResultsFormatError` for a malformed results file and :class:`ImageIdMismatch`
    when the image ids differ (unless ``allow_missing``: then the intersection is scored).
    """
    if (references_path is None) == (coco_annotations is None):
        raise ValueError("give exactly one of references_path and coco_annotations")
    predictions = load_results(predictions_path)
    if references_path is not None:
        references, records = karpathy_references(references_path, split)
    else:
        references, records = coco_annotation_references(coco_annotations)
    predictions, references, counts = align_ids(predictions, references, allow_missing)
    result, exact = _score(predictions, references, meteor, spice)
    settings: dict[str, Any] = {
        "mode": "predictions",
        "predictions": str(predictions_path),
        "references": str(references_path or coco_annotations),
        "split": split if references_path is not None else None,
        **counts,
        "seconds_scoring": round(result.seconds, 3),
    }
    return Evaluation(result, predictions, references, exact, settings,
                      records={r.image_id: r for r in records})


# ---------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def row(items: Sequence[str]) -> str:
        return "| " + " | ".join(str(s).rjust(w) for s, w in zip(items, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([row(header), rule, *(row(r) for r in rows)])


def format_grounding_table(grounding: Mapping[str, Any]) -> str:
    """Attention correctness and pointing game ×100 per word class, then caption grounding ×100
    (markdown tables)."""
    rows = [["all", _pct(grounding["attention_correctness"]), _pct(grounding["pointing_game"]),
             str(grounding["grounded_words"])]]
    for cls, s in grounding["per_class"].items():
        rows.append([cls, _pct(s["attention_correctness"]), _pct(s["pointing_game"]), str(s["count"])])
    words = _table(["words", "attention correctness", "pointing game", "count"], rows)
    objects = _table(
        ["object precision", "object recall", "object F1", "relation accuracy", "relations"],
        [[_pct(grounding["object_precision"]), _pct(grounding["object_recall"]),
          _pct(grounding["object_f1"]), _pct(grounding["relation_accuracy"]),
          str(grounding["relations"])]],
    )
    ceiling = grounding.get("attention_correctness_ceiling")
    note = "" if ceiling is None else (
        f"\n(attention correctness of the best one-cell map on this grid, same words: {_pct(ceiling)})")
    return words + note + "\n\n" + objects


def find_metrics_csv(
    checkpoint: str | os.PathLike | None = None, logs: str | os.PathLike | None = None
) -> Path | None:
    """The run's Lightning CSV log (``metrics.csv``), newest first.

    ``logs``: a ``metrics.csv`` or a folder searched recursively. Otherwise the checkpoint's
    folder and up to ``LOG_SEARCH_LEVELS`` folders above it are searched for
    ``logs/**/metrics.csv`` (``runs/X/checkpoints/best.ckpt`` -> ``runs/X/logs/version_N/``) and
    ``lightning_logs/version_*/metrics.csv``. ``None`` when nothing is found.
    """
    def newest(paths: Iterable[Path]) -> Path | None:
        found = [p for p in paths if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    if logs is not None:
        logs = Path(logs)
        if logs.is_file():
            return logs
        if logs.is_dir():
            return newest(logs.rglob("metrics.csv"))
        raise FileNotFoundError(f"{logs}: no such file or folder")
    if checkpoint is None:
        return None
    folder = Path(checkpoint).resolve().parent
    for d in [folder, *folder.parents][: LOG_SEARCH_LEVELS + 1]:
        found = newest([*d.glob("logs/**/metrics.csv"), *d.glob("lightning_logs/version_*/metrics.csv")])
        if found is not None:
            return found
    return None


CURVE_COLUMNS = {"val/CIDEr": "CIDEr-D", "val/Bleu_4": "BLEU-4"}


def read_curves(csv_path: str | os.PathLike) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """``(x axis name, {column: [(x, value), ...]})`` of the validation scores in a CSVLogger file.

    x is the epoch when logged, else the step. Columns absent or never filled are left out.
    """
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    x_key = "epoch" if rows and any(r.get("epoch") for r in rows) else "step"
    curves: dict[str, list[tuple[float, float]]] = {}
    for column in CURVE_COLUMNS:
        points = []
        for r in rows:
            x, y = r.get(x_key), r.get(column)
            if x and y:
                try:
                    points.append((float(x), float(y)))
                except ValueError:
                    continue
        if points:
            curves[column] = points
    return x_key, curves


def plot_curves(csv_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Validation CIDEr-D and BLEU-4 (×100) over training, as PNG; ``None`` when the CSV has none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_key, curves = read_curves(csv_path)
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for column, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=CURVE_COLUMNS[column])
    if "val/CIDEr" in curves:
        bx, by = max(curves["val/CIDEr"], key=lambda p: p[1])
        ax.plot([bx], [100 * by], marker="*", markersize=12, color="black", linestyle="none",
                label=f"best CIDEr-D {100 * by:.1f} ({x_key} {bx:g})")
    ax.set_xlabel(x_key)
    ax.set_ylabel("score ×100")
    ax.set_title("validation scores during training")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, format="png", dpi=100)
    return out_path


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def _examples_table(ev: Evaluation, ranked: Sequence[tuple[int, float]]) -> str:
    lines = ["| # | image | CIDEr | caption | references |", "|---|---|---|---|---|"]
    for n, (k, score) in enumerate(ranked, 1):
        rec = ev.records.get(k)
        name = f"{k} ({rec.filename})" if rec is not None and rec.filename else str(k)
        refs = "<br>".join(_md(r) for r in ev.references.raw[k])
        lines.append(f"| {n} | {_md(name)} | {_pct(score)} | {_md(ev.predictions[k])} | {refs} |")
    return "\n".join(lines)


def write_report(
    ev: Evaluation,
    out_dir: str | os.PathLike,
    metrics_csv: str | os.PathLike | None = None,
    examples: int = 5,
    figures: int = 3,
) -> list[Path]:
    """Write ``metrics.json``, ``per_image.json``, ``summary.md``, ``curves.png`` (from
    ``metrics_csv``) and ``attention_{best,worst}_{i}.png`` (checkpoint mode) into ``out_dir``.

    Returns the files written. Whatever cannot be drawn is explained in ``summary.md``.
    """
    from captioner.data.images import ImageLoadError, load_image
    from captioner.viz import save_attention_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(out / "metrics.json", ev.to_json()),
               write_json(out / "per_image.json", ev.per_image())]
    ranked = ev.result.ranked("CIDEr")
    best, worst = ranked[:examples], ranked[::-1][:examples]
    s = ev.settings

    md = [f"# Evaluation: {s.get('dataset') or Path(ev.references.source).name}"
          + (f", {s['split']} split" if s.get("split") else ""), ""]
    md += ["## Caption metrics (×100)", "", format_table(ev.result.metrics), ""]
    notes = [f"tokenizer: {'Stanford PTBTokenizer' if ev.result.tokenizer == 'ptb' else 'pure-Python PTB-style'}",
             f"exact match (caption equals a reference): {_pct(ev.exact_match)}%"]
    if ev.result.nltk_corpus_bleu4 is not None:
        notes.append(f"NLTK corpus BLEU-4 ×100 (tutorial figure, not comparable): "
                     f"{_pct(ev.result.nltk_corpus_bleu4)}")
    notes += [f"skipped {m}: {ev.result.skip_reasons.get(m, '')}" for m in ev.result.skipped]
    md += [f"- {n}" for n in notes] + [""]
    if ev.grounding is not None:
        md += ["## Attention grounding (×100)", "", format_grounding_table(ev.grounding), ""]

    md += ["## Settings", "", "| setting | value |", "|---|---|"]
    md += [f"| {k} | {_md(', '.join(map(str, v)) if isinstance(v, list) else str(v))} |"
           for k, v in s.items() if v is not None]
    md += [f"| images scored | {ev.result.num_images} |", ""]

    md += ["## Validation during training", ""]
    curves = None
    if metrics_csv is not None:
        curves = plot_curves(metrics_csv, out / "curves.png")
        if curves is None:
            md.append(f"_{metrics_csv} has no val/CIDEr or val/Bleu_4 values: no plot._")
        else:
            written.append(curves)
            md += ["![validation CIDEr-D and BLEU-4](curves.png)", "", f"_From {metrics_csv}._"]
    else:
        where = ("no checkpoint to search from" if s.get("mode") != "checkpoint" else
                 f"searched for logs/**/metrics.csv up to {LOG_SEARCH_LEVELS} folders above "
                 "the checkpoint")
        md.append(f"_No training logs found ({where}); pass --logs PATH to plot the curves._")
    md.append("")

    md += [f"## Best {len(best)} images by CIDEr-D", "", _examples_table(ev, best), ""]
    md += [f"## Worst {len(worst)} images by CIDEr-D", "", _examples_table(ev, worst), ""]

    md += ["## Attention maps", ""]
    drawable = [k for k, _ in ranked if k in ev.captions and ev.captions[k].alphas is not None]
    if not drawable:
        md.append("_No attention maps: these captions were not generated here (evaluate with "
                  "a checkpoint to draw them)._")
    for label, chosen in (("best", best[:figures]), ("worst", worst[:figures])):
        for n, (k, score) in enumerate(chosen, 1):
            cap, rec = ev.captions.get(k), ev.records.get(k)
            if cap is None or cap.alphas is None or rec is None:
                continue
            name = f"attention_{label}_{n}.png"
            try:
                image = load_image(rec.path)
            except ImageLoadError as err:
                md.append(f"_{label} {n} (image {k}): {err}_")
                continue
            written.append(save_attention_figure(image, cap.words, cap.alphas, out / name))
            md += [f"**{label} {n}**: image {k}, CIDEr-D {_pct(score)}: “{_md(cap.text)}”", "",
                   f"![{label} {n}]({name})", ""]

    summary = out / "summary.md"
    summary.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    written.append(summary)
    return written


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Strict JSON (NaN -> null), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


__all__ = [
    "Evaluation", "GeneratedCaption", "ImageIdMismatch", "References", "ResultsFormatError",
    "align_ids", "caption_records", "coco_annotation_references",
    "evaluate_checkpoint", "evaluate_predictions", "exact_match", "find_metrics_csv",
    "format_grounding_table", "karpathy_references", "load_results", "plot_curves",
    "read_curves", "results_json", "write_json", "write_report",
]
