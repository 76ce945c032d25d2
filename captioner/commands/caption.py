"""``captioner caption``: caption images and folders of images, one line per image on stdout.

Streams through :meth:`CaptionPipeline.caption_paths`, so memory stays flat for any number of
images; a file that cannot be read is reported by path and every other image is still captioned.
Exit status: 0 all captioned, 1 some files failed, 2 bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from captioner.commands.caption_output import FORMATS
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


def _stdout(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.flush()  # line by line, so a pipe downstream sees captions as they come


def caption_options(a: argparse.Namespace, pipeline):
    """The caption options of the command line, checked against the pipeline (UsageError naming
    the flag)."""
    from captioner.inference import CaptionOptions, OptionError

    if not a.sample:
        for flag, value in (("--temperature", a.temperature), ("--top-k", a.top_k), ("--top-p", a.top_p),
                            ("--seed", a.seed), ("--num-samples", a.num_samples)):
            if value is not None:
                raise UsageError(f"{flag} is an option of sampling: add --sample")
    given = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "seed": a.seed,
             "num_samples": a.num_samples}
    try:
        return pipeline.options(CaptionOptions(), n_best=a.n_best, sample=a.sample,
                                **{k: v for k, v in given.items() if v is not None})
    except OptionError as err:
        raise UsageError(f"--{err.field.replace('_', '-')}: {err}") from None


def cmd_caption(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from captioner.commands.caption_output import PartFile, RowWriter
    from captioner.data.images import iter_image_paths

    if a.json and a.format not in (None, "jsonl"):
        raise UsageError(f"--json is --format jsonl; it cannot go with --format {a.format}")
    fmt = "jsonl" if a.json else (a.format or "text")
    if a.resume and a.output is None:
        raise UsageError("--resume continues an --output file: give --output")
    paths = list(iter_image_paths(a.paths))  # Paths only: cheap even for many thousands
    if not paths:
        raise UsageError("no image files found in " + ", ".join(str(p) for p in a.paths))
    pipeline = load_pipeline(a.checkpoint, a.device, a.quantize, beam_size=a.beam_size,
                             max_length=a.max_length)
    options = caption_options(a, pipeline)

    out = PartFile(a.output, fmt, a.resume) if a.output is not None else None
    writer = out.writer if out is not None else RowWriter(fmt, _stdout, header=True)
    if out is not None and out.done:
        paths = [p for p in paths if str(p) not in out.done]
        logger.info("--resume: %d images already in %s, %d to caption", len(out.done), out.part, len(paths))

    show = a.progress if a.progress is not None else (
        len(paths) >= PROGRESS_MIN_IMAGES and sys.stderr.isatty())
    failed = 0
    finished = False
    try:
        with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not show, leave=False) as bar:
            for path, captions, error in pipeline.captions_for_paths(paths, options, batch_size=a.batch_size,
                                                                     num_workers=a.num_workers,
                                                                     jpeg_decode=a.jpeg_decode):
                if error is not None:
                    failed += 1
                    if writer.keeps_errors:
                        writer.error(path, error)
                    else:
                        # tqdm.write keeps the bar intact below the message
                        tqdm.write(f"{path}\tERROR: {error}", file=sys.stderr)
                else:
                    writer.captions(path, captions)
                bar.update(1)
        finished = True
    except BrokenPipeError:
        # `captioner caption DIR | head`: stop quietly; keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if out is not None and finished:
            out.finish()
        elif out is not None:
            out.close()  # stopped: FILE.part stays for --resume
    if out is not None:
        logger.info("wrote %s", a.output)
    if failed:
        logger.warning("%d of %d images could not be captioned", failed, len(paths))
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption images or folders of images (one line per image)",
        description="Caption images. PATH may be image files or folders (searched recursively). "
        "Prints `path<TAB>caption` per caption, or rows of --format jsonl|csv|tsv with each caption's "
        "rank, score, mean_logprob and word_probs. "
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
    g = p.add_argument_group("more than one caption per image")
    g.add_argument("--n-best", type=positive_int, default=1, metavar="N",
                   help="the N best distinct captions of the beam search, best first (N <= beam size)")
    g.add_argument("--sample", action="store_true",
                   help="draw captions from the model instead of searching for the most likely")
    g.add_argument("--num-samples", type=positive_int, default=None, metavar="N",
                   help="--sample: captions drawn per image (default 1)")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="--sample: > 1 flattens the distribution, < 1 sharpens it (default 1)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="--sample: draw among the K most likely words only (default 0: all)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="--sample: draw among the most likely words that together reach P (0 < P <= 1)")
    g.add_argument("--seed", type=int, default=None,
                   help="--sample: the same seed, inputs and --batch-size give the same captions")
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default=None,
                   help="text (default): path<TAB>caption, errors on stderr; jsonl, csv, tsv: one row "
                   "per caption with image, rank, caption, score, mean_logprob, word_probs (or image, error)")
    o.add_argument("--json", action="store_true", help="the same as --format jsonl")
    o.add_argument("--output", "-o", type=Path, default=None, metavar="FILE",
                   help="write FILE (appears whole when done; FILE.part meanwhile) instead of stdout")
    o.add_argument("--resume", action="store_true",
                   help="with --output: keep the images FILE (or FILE.part of a stopped run) has "
                   "and caption only the rest")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bar on stderr (default: on for >= {PROGRESS_MIN_IMAGES} images "
                   "when stderr is a terminal)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.set_defaults(func=cmd_caption)
