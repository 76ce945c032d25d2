"""``captioner evaluate``: COCO caption metrics (and attention grounding on ``shapes``).

Two modes:

- ``--checkpoint CKPT [--config CFG]``: caption a split of the config's data set (each image
  once, batched) and score it; writes ``--results`` (COCO results format) and ``--output``
  (metrics). The config is parsed exactly as ``captioner fit`` parses it (same ``--config``
  files, same ``--data.*`` / ``--model.decoding.*`` overrides); without ``--config`` the run's
  own ``config.yaml`` (saved by ``fit`` in its run folder) is used.
- ``--predictions results.json --references dataset.json`` (or ``--coco-annotations``): score any
  model's COCO results file.

``--report DIR`` adds a markdown summary, validation curves and attention figures.
Exit status: 0 scored, 1 image ids differ / images unreadable, 2 bad arguments or malformed files.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner.commands.common import (
    UsageError,
    add_device_argument,
    add_quantize_argument,
    check_old_flags,
    load_pipeline,
    run_config,
)

logger = logging.getLogger(__name__)

# Flags of earlier releases -> what replaces them (the settings of the config, as for `fit`).
OLD_FLAGS = {
    "--set": "--data.KEY VALUE (e.g. --data.batch_size 8), as for captioner fit",
    "--beam-size": "--model.decoding.beam_size",
    "--max-length": "--model.decoding.max_length",
    "--batch-size": "--data.eval_batch_size",
    "--num-workers": "--data.num_workers",
}
# Options of the --predictions mode; everything else belongs to the --checkpoint mode.
PREDICTION_OPTIONS = ("--predictions", "--references", "--coco-annotations", "--allow-missing")


def add_options(p) -> None:
    """The options of ``evaluate`` beside the config's sections."""
    p.add_argument("--checkpoint", type=Path | None, default=None,
                   help="a .ckpt written by `captioner fit`, a model folder (`captioner export`) or hf://OWNER/NAME: caption the config's --split and score it")
    add_device_argument(p)
    add_quantize_argument(p)
    p.add_argument("--results", type=Path | None, default=None,
                   help='write the captions as a COCO results file [{"image_id": int, "caption": str}, ...]')
    p.add_argument("--predictions", type=Path | None, default=None,
                   help="score this COCO results file of any model instead")
    p.add_argument("--references", type=Path | None, default=None,
                   help="with --predictions: a Karpathy split file (dataset_coco.json, ...)")
    p.add_argument("--coco-annotations", type=Path | None, default=None,
                   help="with --predictions: a COCO caption annotation file (captions_val2014.json)")
    p.add_argument("--allow-missing", action="store_true",
                   help="with --predictions: score only the images in both files (with a warning)")
    p.add_argument("--split", default="test", help="which split to score (default: test)")
    p.add_argument("--output", type=Path | None, default=None, help="write the metrics as JSON")
    p.add_argument("--report", type=Path | None, default=None,
                   help="write metrics.json, summary.md, curves.png and attention figures of the "
                   "best/worst images into this folder")
    p.add_argument("--logs", type=Path | None, default=None,
                   help="the run's metrics.csv (or a folder with it) for curves.png; default: found "
                   "above the checkpoint")
    p.add_argument("--spice", action="store_true",
                   help="also compute SPICE (Java; downloads Stanford CoreNLP on first use)")
    p.add_argument("--no-meteor", dest="meteor", action="store_false",
                   help="skip METEOR (its Java process takes ~10 s to start)")


def _with_config(args: list[str]) -> list[str]:
    """``args`` with the run's config in front when a checkpoint is given without ``--config``."""
    flags = {a.split("=", 1)[0] for a in args}
    if "--checkpoint" not in flags or flags & {"--config", "-c"}:
        return args
    i = next(k for k, a in enumerate(args) if a.split("=", 1)[0] == "--checkpoint")
    value = args[i].split("=", 1)[1] if "=" in args[i] else (args[i + 1] if i + 1 < len(args) else "")
    found = run_config(Path(value)) if value else None
    if found is None:
        raise UsageError(f"--checkpoint {value}: no {Path(value).parent.parent / 'config.yaml'} beside "
                         "it; give the training config with --config CFG.yaml")
    logger.info("config: %s (the run's own)", found)
    return ["--config", str(found), *args]


def _parse(args: Sequence[str], prog: str):
    """-> (command options, ConfigCLI) parsed by the same parser as ``captioner fit``."""
    args = list(args)
    check_old_flags(args, OLD_FLAGS)
    flags = {a.split("=", 1)[0] for a in args}
    if "--checkpoint" in flags and "--predictions" in flags:
        raise UsageError("give --checkpoint (caption and score a split) or --predictions (score a "
                         "results file), not both")
    if "--predictions" in flags:
        wrong = sorted(f for f in flags if f.startswith("--") and (
            f in ("--config", "--results", "--quantize", "--device") or "." in f))
        if "-c" in flags:
            wrong.append("-c")
        if wrong:
            raise UsageError(f"{', '.join(wrong)} cannot be used with --predictions")
    elif "--checkpoint" in flags:
        wrong = sorted(f for f in flags if f in PREDICTION_OPTIONS[1:])
        if wrong:
            raise UsageError(f"{', '.join(wrong)} cannot be used with --checkpoint")
        args = _with_config(args)
    elif not ({"-h", "--help", "--print_config"} & flags):
        raise UsageError("give --checkpoint CKPT [--config CFG] (caption and score a split), or "
                         "--predictions RESULTS.json --references DATASET.json (score a results file)")
    from captioner.commands.config import ConfigCLI

    cli = ConfigCLI(prog, args, add_options, description=__doc__)
    return cli.config, cli


def _evaluate_checkpoint(a, cli):
    from tqdm import tqdm

    from captioner.evaluation import evaluate_checkpoint

    d = a.model.decoding
    pipeline = load_pipeline(a.checkpoint, a.device, a.quantize, beam_size=d.beam_size,
                             max_length=d.max_length, length_penalty=d.length_penalty,
                             suppress_unk=d.suppress_unk, cuda_graph=d.cuda_graph)
    dm = cli.datamodule
    # The checkpoint decides resizing and normalisation; images are read, not a feature cache.
    dm.preprocessing = pipeline.loaded.preprocessing
    dm.feature_cache = None
    try:
        dm.source.prepare()
        n = len(dm.split_records(a.split))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(" ".join(str(err).split())) from None
    with tqdm(total=n, unit="img", file=sys.stderr, disable=not sys.stderr.isatty(),
              leave=False) as bar:
        ev = evaluate_checkpoint(
            pipeline, dm, a.split, batch_size=dm.eval_batch_size, num_workers=dm.num_workers,
            meteor=a.meteor, spice=a.spice, keep_attention=a.report is not None,
            on_batch=bar.update,
        )
    ev.settings["config"] = [str(c) for c in (a.config or [])]
    return ev


def _evaluate_predictions(a):
    from captioner.evaluation import ImageIdMismatch, evaluate_predictions

    if (a.references is None) == (a.coco_annotations is None):
        raise UsageError("--predictions needs --references DATASET.json (a Karpathy split file) "
                         "or --coco-annotations captions_*.json, one of them")
    try:
        return evaluate_predictions(
            a.predictions, a.references, a.coco_annotations, split=a.split,
            allow_missing=a.allow_missing, meteor=a.meteor, spice=a.spice,
        )
    except ImageIdMismatch:
        raise
    except (OSError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from None


def run(args: Sequence[str], prog: str = "captioner evaluate") -> int:
    a, cli = _parse(args, prog)
    if a.logs is not None and not a.logs.exists():
        raise UsageError(f"--logs: {a.logs} does not exist")
    return report(a, cli)


def report(a, cli) -> int:
    from captioner.data.images import ImageLoadError
    from captioner.evaluation import ImageIdMismatch, find_metrics_csv, results_json, write_report
    from captioner.files import atomic_write_json
    from captioner.metrics import format_grounding_table, format_table

    try:
        ev = _evaluate_checkpoint(a, cli) if a.checkpoint is not None else _evaluate_predictions(a)
    except ImageIdMismatch as err:
        print(f"captioner: error: {err}. Score only the images in both with --allow-missing.",
              file=sys.stderr)
        return 1
    except ImageLoadError as err:
        print(f"captioner: error: {err}", file=sys.stderr)
        return 1

    written = []
    if a.results is not None:
        written.append(atomic_write_json(a.results, results_json(ev.captions.values()), indent=2,
                                         newline=True))
    if a.output is not None:
        written.append(atomic_write_json(a.output, ev.to_json(), indent=2, newline=True))
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
    subparsers.add_parser(
        "evaluate", add_help=False,
        help="COCO caption metrics of a checkpoint on a split (--checkpoint [--config]), or of a "
        "results file (--predictions --references)",
    )
