"""``captioner caption``: caption images and folders of images, one line per image on stdout.

Streams through :meth:`CaptionPipeline.caption_paths`, so memory stays flat for any number of
images; a file that cannot be read is reported by path and every other image is still captioned.
Exit status: 0 all captioned, 1 some files failed, 2 bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from captioner.commands.common import (
    JPEG_DECODE,
    UsageError,
    add_model_arguments,
    load_pipeline,
    positive_int,
)

logger = logging.getLogger(__name__)

# With at least this many images a progress bar is drawn when stderr is a terminal.
PROGRESS_MIN_IMAGES = 20


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # line by line, so a pipe downstream sees captions as they come


def cmd_caption(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from captioner.data.images import iter_image_paths

    paths = list(iter_image_paths(a.paths))  # Paths only: cheap even for many thousands
    if not paths:
        raise UsageError("no image files found in " + ", ".join(str(p) for p in a.paths))
    pipeline = load_pipeline(a.checkpoint, a.device, a.quantize, beam_size=a.beam_size,
                             max_length=a.max_length)

    show = a.progress if a.progress is not None else (
        len(paths) >= PROGRESS_MIN_IMAGES and sys.stderr.isatty())
    failed = 0
    with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not show, leave=False) as bar:
        try:
            for path, caption, error in pipeline.caption_paths(paths, batch_size=a.batch_size,
                                                               num_workers=a.num_workers,
                                                               jpeg_decode=a.jpeg_decode):
                if error is not None:
                    failed += 1
                    if a.json:
                        _write(json.dumps({"image": str(path), "error": error}))
                    else:
                        # tqdm.write keeps the bar intact below the message
                        tqdm.write(f"{path}\tERROR: {error}", file=sys.stderr)
                elif a.json:
                    _write(json.dumps({"image": str(path), "caption": caption.text,
                                       "score": round(caption.score, 6)}))
                else:
                    _write(f"{path}\t{caption.text}")
                bar.update(1)
        except BrokenPipeError:
            # `captioner caption DIR | head`: stop quietly; keep Python from complaining at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    if failed:
        logger.warning("%d of %d images could not be captioned", failed, len(paths))
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption images or folders of images (one line per image)",
        description="Caption images. PATH may be image files or folders (searched recursively). "
        "Prints `path<TAB>caption` per image, or one JSON object per line with --json. "
        "Exit status: 0 all captioned, 1 some files could not be read, 2 bad arguments/checkpoint.",
    )
    add_model_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="threads that read and resize images while the model works (default: 0 on "
                   "the CPU, where the model already uses every core; 4 on a GPU)")
    p.add_argument("--jpeg-decode", choices=JPEG_DECODE, default="auto", metavar="WHERE",
                   help="auto, cpu or device: where JPEG files are decoded and resized: on the model's device with "
                   "torchvision (nvJPEG on a GPU), or with PIL on the CPU (auto: the device when it "
                   "is a GPU). Other formats always go through PIL")
    p.add_argument("--json", action="store_true",
                   help='JSON lines: {"image", "caption", "score"} or {"image", "error"}')
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bar on stderr (default: on for >= {PROGRESS_MIN_IMAGES} images "
                   "when stderr is a terminal)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.set_defaults(func=cmd_caption)
