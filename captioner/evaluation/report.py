"""The evaluation report: metrics files, a markdown summary, the run's validation curves and
attention figures of the best and worst images."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioner.evaluation.scoring import Evaluation
from captioner.files import atomic_write, atomic_write_json
from captioner.metrics import format_grounding_table, format_table, percent

# How many folders above the checkpoint's folder are searched for training logs.
LOG_SEARCH_LEVELS = 2
# CSVLogger columns drawn in curves.png -> their names on the plot.
CURVE_COLUMNS = {"val/CIDEr": "CIDEr-D", "val/Bleu_4": "BLEU-4"}


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


def _plot_validation_curves(csv_path: str | os.PathLike, out_path: Path) -> Path | None:
    """Validation CIDEr-D and BLEU-4 of a CSVLogger file as PNG; ``None`` when it has none."""
    from captioner.viz import plot_curves

    x_key, curves = read_curves(csv_path)
    if not curves:
        return None
    best = CURVE_COLUMNS["val/CIDEr"] if "val/CIDEr" in curves else None
    return plot_curves({CURVE_COLUMNS[c]: points for c, points in curves.items()}, out_path,
                       x_label=x_key, best=best)


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def _examples_table(ev: Evaluation, ranked: Sequence[tuple[int, float]]) -> str:
    lines = ["| # | image | CIDEr | caption | references |", "|---|---|---|---|---|"]
    for n, (k, score) in enumerate(ranked, 1):
        rec = ev.records.get(k)
        name = f"{k} ({rec.filename})" if rec is not None and rec.filename else str(k)
        refs = "<br>".join(_md(r) for r in ev.references.raw[k])
        lines.append(f"| {n} | {_md(name)} | {percent(score)} | {_md(ev.predictions[k])} | {refs} |")
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
    written = [atomic_write_json(out / "metrics.json", ev.to_json(), indent=2, newline=True),
               atomic_write_json(out / "per_image.json", ev.per_image(), indent=2, newline=True)]
    ranked = ev.result.ranked("CIDEr")
    best, worst = ranked[:examples], ranked[::-1][:examples]
    s = ev.settings

    md = [f"# Evaluation: {s.get('dataset') or Path(ev.references.source).name}"
          + (f", {s['split']} split" if s.get("split") else ""), ""]
    md += ["## Caption metrics (×100)", "", format_table(ev.result.metrics), ""]
    notes = [f"tokenizer: {'Stanford PTBTokenizer' if ev.result.tokenizer == 'ptb' else 'pure-Python PTB-style'}",
             f"exact match (caption equals a reference): {percent(ev.exact_match)}%"]
    if ev.result.nltk_corpus_bleu4 is not None:
        notes.append(f"NLTK corpus BLEU-4 ×100 (tutorial figure, not comparable): "
                     f"{percent(ev.result.nltk_corpus_bleu4)}")
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
        curves = _plot_validation_curves(metrics_csv, out / "curves.png")
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
            md += [f"**{label} {n}**: image {k}, CIDEr-D {percent(score)}: “{_md(ev.predictions[k])}”", "",
                   f"![{label} {n}]({name})", ""]

    summary = out / "summary.md"
    text = ("\n".join(md).rstrip() + "\n").encode()
    atomic_write(summary, lambda f: f.write(text))
    written.append(summary)
    return written


__all__ = ["CURVE_COLUMNS", "LOG_SEARCH_LEVELS", "find_metrics_csv", "read_curves", "write_report"]
