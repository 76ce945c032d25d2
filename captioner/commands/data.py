"""``captioner data check``: count images and captions of a data set and find every broken file;
``captioner data convert``: your captions -> a Karpathy split file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.commands.common import LazyChoices, UsageError

FORMATS = ("csv", "tsv", "jsonl", "folder", "coco")  # captioner.data.convert.FORMATS, without importing it
PUBLISHED = ("flickr8k", "coco-karpathy")  # captioner.data.published.READERS: Flickr8k's and COCO's split files
# the options of one --from format only: given with another, they would be ignored
FORMAT_OPTIONS = {"train_list": "flickr8k", "val_list": "flickr8k", "test_list": "flickr8k",
                  "coco_captions": "coco-karpathy"}
TOKENIZERS = LazyChoices("captioner.data.tokenizers", "TOKENIZERS")


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


_DELIMITER_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def cmd_data_convert(a: argparse.Namespace) -> int:
    from captioner.data.convert import ConvertError, convert_rows, read_rows, table_dialect
    from captioner.files import atomic_write_json

    image_root = a.image_root or (a.input if a.format == "folder" else None)
    if image_root is None:
        raise UsageError("--image-root DIR is required (the folder the image names are relative to)")
    for dest, fmt in FORMAT_OPTIONS.items():
        if getattr(a, dest) and a.format != fmt:
            raise UsageError(f"--{dest.replace('_', '-')} is an option of --from {fmt}, not of --from {a.format}")
    published = None
    encoding, delimiter = a.encoding, _DELIMITER_NAMES.get(a.delimiter, a.delimiter)
    try:
        if a.format in PUBLISHED:
            from captioner.data.published import read_published

            published = read_published(a.format, a.input, {"train": a.train_list, "val": a.val_list,
                                                            "test": a.test_list}, a.coco_captions)
            rows = published.rows
        else:
            if a.format in ("csv", "tsv") and a.input.is_file():  # sniffed here, to say in the report
                encoding, delimiter = table_dialect(a.input, encoding, delimiter, "," if a.format == "csv" else "\t",
                                                    a.image_column, a.caption_column)
            rows = read_rows(a.format, a.input, a.image_column, a.caption_column, encoding, delimiter)
        dataset, report = convert_rows(rows, image_root, a.tokenizer, a.val_fraction,
                                       a.test_fraction, a.seed)
    except ConvertError as err:
        raise UsageError(" ".join(str(err).split())) from None
    left_out = published.left_out if published else []
    if published:
        dataset = published.finish(dataset)
    if a.format in ("csv", "tsv"):
        report.encoding, report.delimiter = encoding, delimiter
    if report.images == 0:
        print(report.format_text())
        raise UsageError(f"{a.input}: no image with a caption was found; nothing written")
    atomic_write_json(a.out, dataset, newline=True)
    if a.json:
        print(json.dumps({**report.to_json(), **({"left_out": left_out} if published else {}), "out": str(a.out)}))
    else:
        print("\n".join([report.format_text(), *left_out]))
        print(f"wrote {a.out}")
    if report.dropped and not a.allow_missing:
        print(f"{report.dropped} caption(s) or image(s) dropped (see above); --allow-missing accepts that")
        return 1
    return 0


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

    v = dsub.add_parser("convert", help="your captions (CSV, TSV, JSON Lines, a folder, COCO) -> a "
                        "Karpathy split file")
    v.add_argument("input", type=Path, metavar="INPUT", help="the file (the folder for --from folder)")
    v.add_argument("--from", dest="format", required=True, choices=FORMATS + PUBLISHED,
                   help="flickr8k: INPUT is Flickr8k.token.txt (or its folder), with the split lists "
                   "beside it; coco-karpathy: INPUT is the folder of BLIP/LAVIS's coco_karpathy_*.json")
    v.add_argument("--image-root", type=Path, help="the folder image names are relative to "
                   "(default for --from folder: INPUT)")
    v.add_argument("--out", type=Path, required=True, help="the split file to write, e.g. dataset.json")
    v.add_argument("--image-column", default="image", help="csv/tsv column, jsonl key (default: image)")
    v.add_argument("--caption-column", default="caption",
                   help="csv/tsv column, jsonl key (default: caption; jsonl also takes a list under captions)")
    v.add_argument("--tokenizer", default="unicode", choices=TOKENIZERS, metavar="NAME",
                   help="unicode (words of any alphabet, default), char (one token per character: "
                   "Chinese, Japanese, Thai) or simple (ASCII only: Karpathy's English tokens); "
                   "recorded in the split file, which training follows")
    v.add_argument("--encoding", help="the text's encoding, e.g. cp1252, shift_jis, gbk (default: "
                   "UTF-8 or UTF-16 by their BOM; a table that is not UTF-8 is read as cp1252)")
    v.add_argument("--delimiter", help="csv/tsv field separator, e.g. ';' or tab (default: the one of "
                   ", ; tab | that splits the header into the image and caption columns)")
    v.add_argument("--val-fraction", type=float, default=0.1, help="share of images for val (default 0.1)")
    v.add_argument("--test-fraction", type=float, default=0.1, help="share of images for test (default 0.1)")
    v.add_argument("--seed", type=int, default=0, help="the split's shuffle (default 0)")
    for split, name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        v.add_argument(f"--{split}-list", type=Path, metavar="FILE",
                       help=f"--from flickr8k: the {split} image list (default: Flickr_8k.{name}.txt beside INPUT)")
    v.add_argument("--coco-captions", type=Path, nargs="+", metavar="FILE",
                   help="--from coco-karpathy: COCO's caption files (default: captions_train2014.json and "
                   "captions_val2014.json in INPUT or INPUT/annotations)")
    v.add_argument("--allow-missing", action="store_true",
                   help="exit 0 even when missing images, empty or duplicate captions were dropped")
    v.add_argument("--json", action="store_true", help="the report as one JSON object")
    v.set_defaults(func=cmd_data_convert)
