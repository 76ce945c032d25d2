"""``captioner data check``: count images and captions of a data set and find every broken file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.commands.common import UsageError


def cmd_data_check(a: argparse.Namespace) -> int:
    from captioner.data.check import run_data_check

    if not a.karpathy_json and not a.coco_annotations:
        raise UsageError("give --karpathy-json FILE --image-root DIR, or --coco-annotations FILE --image-root DIR")
    if not a.image_root:
        raise UsageError("--image-root DIR is required")
    report = run_data_check(
        karpathy_json=a.karpathy_json, image_root=a.image_root, coco_annotations=a.coco_annotations,
        min_count=a.min_count, restval_to_train=not a.keep_restval,
    )
    print(json.dumps(report.to_json()) if a.json else report.format_text())
    return 1 if report.problems else 0


def register(subparsers) -> None:
    d = subparsers.add_parser("data", help="data set tools")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("check", help="count images/captions and find every broken file")
    c.add_argument("--karpathy-json", type=Path)
    c.add_argument("--coco-annotations", type=Path)
    c.add_argument("--image-root", type=Path)
    c.add_argument("--min-count", type=int, default=5)
    c.add_argument("--keep-restval", action="store_true", help="report restval as its own split")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    c.set_defaults(func=cmd_data_check)
