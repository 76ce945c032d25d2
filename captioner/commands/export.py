"""``captioner export``: a checkpoint as a model folder to share (``model.safetensors``,
``config.json``, ``README.md`` model card), optionally uploaded to the Hugging Face Hub.

Every ``--checkpoint`` accepts the folder (or ``hf://owner/name`` once uploaded).
Exit status: 0 written, 2 bad arguments, an unusable checkpoint or a failed upload.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from captioner.commands.common import UsageError, run_config

logger = logging.getLogger(__name__)


def _metrics(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--metrics {path}: not a readable JSON file: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--metrics {path}: expected the JSON object `captioner evaluate --output` writes")
    return data


def cmd_export(a: argparse.Namespace) -> int:
    from captioner.checkpoint import CheckpointError, export_model_folder
    from captioner.hub import upload

    metrics = _metrics(a.metrics)
    config = run_config(a.checkpoint) if a.checkpoint.is_file() else None
    try:
        out = export_model_folder(a.checkpoint, a.out, metrics=metrics, run_config=config)
    except (CheckpointError, FileExistsError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from None
    print(f"model folder: {out}")
    if a.push_to_hub:
        try:
            url = upload(out, a.push_to_hub, private=a.private)
        except Exception as err:  # no token, no network, no permission: say which, in one line
            raise UsageError(f"--push-to-hub {a.push_to_hub}: upload failed ({type(err).__name__}: "
                             f"{' '.join(str(err).split())}); the folder is at {out}") from None
        print(f"uploaded: {url}  (load it with --checkpoint hf://{a.push_to_hub})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a model folder to share (safetensors + config + model card)",
        description="Write the model of a checkpoint as a folder: model.safetensors (weights), "
        "config.json (settings, preprocessing, vocabulary) and README.md (a model card with the "
        "data set, scores and training settings). Every --checkpoint accepts the folder; "
        "--push-to-hub uploads it (pip install 'captioner[hub]').",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt written by `captioner fit`")
    p.add_argument("--out", required=True, type=Path,
                   help="the folder to write (must not exist, or be empty)")
    p.add_argument("--metrics", type=Path, default=None,
                   help="a `captioner evaluate --output` JSON file: its scores go into the card")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="then upload the folder to this Hugging Face Hub model repository "
                   "(created if needed; needs a token: `hf auth login` or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.set_defaults(func=cmd_export)
