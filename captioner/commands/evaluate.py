"""``captioner evaluate``: COCO caption metrics (and attention grounding on ``shapes``).

Two modes:

- ``--checkpoint CKPT --config CFG``: caption a split of the config's data set (each image once,
  batched) and score it; writes ``--results`` (COCO results format) and ``--output`` (metrics).
- ``--predictions results.json --references dataset.json`` (or ``--coco-annotations``): score any
  model's COCO results file.

``--report DIR`` adds a markdown summary, validation curves and attention figures.
Exit status: 0 scored, 1 image ids differ / images unreadable, 2 bad arguments or malformed files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from captioner.commands.caption import add_quantize_argument, load_pipeline, positive_int

logger = logging.getLogger(__name__)


def _overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    from captioner.cli import UsageError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("data.")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE (a data setting), got {item!r}")
        out[key] = yaml.safe_load(value) if value else None
    return out


def _check_args(a: argparse.Namespace) -> None:
    from captioner.cli import UsageError

    if (a.checkpoint is None) == (a.predictions is None):
        raise UsageError("give --checkpoint CKPT --config CFG (caption and score a split), or "
                         "--predictions RESULTS.json --references DATASET.json (score a results file)")
    if a.checkpoint is not None:
        if not a.config:
            raise UsageError("--checkpoint needs --config CFG.yaml (its data: section says which data set)")
        wrong = [flag for flag, v in (("--references", a.references),
                                      ("--coco-annotations", a.coco_annotations),
                                      ("--allow-missing", a.allow_missing)) if v]
    else:
        if (a.references is None) == (a.coco_annotations is None):
            raise UsageError("--predictions needs --references DATASET.json (a Karpathy split file) "
                             "or --coco-annotations captions_*.json, one of them")
        wrong = [flag for flag, v in (("--config", a.config), ("--results", a.results),
                                      ("--beam-size", a.beam_size), ("--max-length", a.max_length),
                                      ("--batch-size", a.batch_size), ("--set", a.set),
                                      ("--quantize", a.quantize != "none")) if v]
    if wrong:
        mode = "--checkpoint" if a.checkpoint is not None else "--predictions"
        raise UsageError(f"{', '.join(wrong)} cannot be used with {mode}")
    if a.logs is not None and not a.logs.exists():
        raise UsageError(f"--logs: {a.logs} does not exist")


def _evaluate_checkpoint(a: argparse.Namespace):
    from tqdm import tqdm

    from captioner.cli import UsageError
    from captioner.evaluation import build_datamodule, evaluate_checkpoint, read_data_config

    pipeline = load_pipeline(a)
    try:
        data_cfg = read_data_config(a.config, _overrides(a.set))
        dm = build_datamodule(data_cfg, pipeline.loaded.preprocessing)
        n = len(dm.split_records(a.split))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(" ".join(str(err).split())) from None
    with tqdm(total=n, unit="img", file=sys.stderr, disable=not sys.stderr.isatty(),
              leave=False) as bar:
        ev = evaluate_checkpoint(
            pipeline, dm, a.split, batch_size=a.batch_size, num_workers=a.num_workers,
            meteor=a.meteor, spice=a.spice, keep_attention=a.report is not None,
            on_batch=bar.update,
        )
    ev.settings["config"] = [str(c) for c in a.config]
    return ev


def _evaluate_predictions(a: argparse.Namespace):
    from captioner.cli import UsageError
    from captioner.evaluation import ImageIdMismatch, evaluate_predictions

    try:
        return evaluate_predictions(
            a.predictions, a.references, a.coco_annotations, split=a.split,
            allow_missing=a.allow_missing, meteor=a.meteor, spice=a.spice,
        )
    except ImageIdMismatch:
        raise
    except (OSError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from None


def cmd_evaluate(a: argparse.Namespace) -> int:
    from captioner.data.images import ImageLoadError
    from captioner.evaluation import (
        ImageIdMismatch,
        find_metrics_csv,
        format_grounding_table,
        results_json,
        write_json,
        write_report,
    )
    from captioner.metrics import format_table

    _check_args(a)
    try:
        ev = _evaluate_checkpoint(a) if a.checkpoint is not None else _evaluate_predictions(a)
    except ImageIdMismatch as err:
        print(f"captioner: error: {err}. Score only the images in both with --allow-missing.",
              file=sys.stderr)
        return 1
    except ImageLoadError as err:
        print(f"captioner: error: {err}", file=sys.stderr)
        return 1

    written = []
    if a.results is not None:
        written.append(write_json(a.results, results_json(ev.captions.values())))
    if a.output is not None:
        written.append(write_json(a.output, ev.to_json()))
    if a.report is not None:
        csv_path = find_metrics_csv(a.checkpoint, a.logs)
        written += write_report(ev, a.report, metrics_csv=csv_path)

    s, r = ev.settings, ev.result
    what = f"{s['split']} split, " if s.get("split") else ""
    how = f", beam {s['beam_size']}" if "beam_size" in s else ""
    tok = "PTB tokenizer" if r.tokenizer == "ptb" else "Python PTB-style tokenizer"
    print(f"{what}{r.num_images} images{how}: scores ×100 (pycocoevalcap, {tok})")
    print(format_table(r))
    if r.skipped:
        print("skipped: " + ", ".join(r.skipped))
    print(f"exact match: {100 * ev.exact_match:.1f}%")
    if ev.grounding is not None:
        print("\nattention grounding ×100:")
        print(format_grounding_table(ev.grounding))
    for path in written:
        logger.info("wrote %s", path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="COCO caption metrics of a checkpoint on a split, or of a results file",
        description="Score captions the way the field reports them (pycocoevalcap: BLEU-1..4, "
        "METEOR, ROUGE-L, CIDEr-D, optional SPICE; JSON on the 0-1 scale, table x100). "
        "Either caption a split with --checkpoint and --config, or score a COCO results file "
        "with --predictions and --references/--coco-annotations. "
        "Exit status: 0 scored, 1 image ids differ or images unreadable, 2 bad arguments/files.",
    )
    m = p.add_argument_group("caption a split with a checkpoint")
    m.add_argument("--checkpoint", type=Path, help="a .ckpt written by `captioner fit`")
    m.add_argument("--config", type=Path, action="append", default=[],
                   help="the training YAML config; its data: section picks the data set "
                   "(repeatable, later files win)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data: setting, e.g. --set data_dir=data/shapes (repeatable)")
    m.add_argument("--beam-size", type=positive_int, default=None,
                   help="beam width (1 = greedy); default: the checkpoint's decoding.beam_size")
    m.add_argument("--max-length", type=positive_int, default=None,
                   help="most words per caption; default: the checkpoint's decoding.max_length")
    m.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per forward pass (default: the config's eval_batch_size)")
    m.add_argument("--num-workers", type=int, default=None,
                   help="image loading processes (default: the config's num_workers)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: cuda when available)")
    add_quantize_argument(m)
    m.add_argument("--results", type=Path, help='write the captions as a COCO results file '
                   '[{"image_id": int, "caption": str}, ...]')

    q = p.add_argument_group("score a results file")
    q.add_argument("--predictions", type=Path, help="a COCO results file of any model")
    q.add_argument("--references", type=Path, help="a Karpathy split file (dataset_coco.json, ...)")
    q.add_argument("--coco-annotations", type=Path,
                   help="a COCO caption annotation file (captions_val2014.json) instead")
    q.add_argument("--allow-missing", action="store_true",
                   help="score only the images in both files (with a warning) instead of failing")

    o = p.add_argument_group("both")
    o.add_argument("--split", default="test", help="which split to score (default: test)")
    o.add_argument("--output", type=Path, help="write the metrics as JSON")
    o.add_argument("--report", type=Path, metavar="DIR", help="write metrics.json, summary.md, "
                   "curves.png and attention figures of the best/worst images into DIR")
    o.add_argument("--logs", type=Path, metavar="PATH", help="the run's metrics.csv (or a folder "
                   "with it) for curves.png; default: found above the checkpoint")
    o.add_argument("--spice", action="store_true", help="also compute SPICE (Java; downloads "
                   "Stanford CoreNLP on first use)")
    o.add_argument("--no-meteor", dest="meteor", action="store_false",
                   help="skip METEOR (its Java process takes ~10 s to start)")
    p.set_defaults(func=cmd_evaluate)
