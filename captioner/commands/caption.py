"""``captioner caption``: caption images and folders of images, one line per image on stdout.

Runs the pipeline's stream (:meth:`captioner.inference.CaptionPipeline.stream`) batch by batch, so
memory stays flat for any number of images; a file that cannot be read is reported by path and
every other image is still captioned. On one process the rows go out as each batch is done. On
many (``--trainer.devices N --trainer.strategy ddp``, torchrun, SLURM), or to continue an
``--output`` with ``--resume``, ``Trainer.predict`` (:mod:`captioner.predict`) runs the same
stream's blocks: each image is captioned once, by one process, and the rows are merged into
``--output`` in the input's order (:mod:`captioner.commands.caption_output`). ``--files-from
LIST`` gives the images as a list instead, of which each process keeps only its share
(:class:`captioner.data.records.Deal`).
The options are parsed by jsonargparse (``--config`` files and flags, :mod:`captioner.commands.parsing`);
Lightning is imported only for ``--trainer.*`` settings or ``--resume``.
Exit status: 0 all captioned, 1 some files failed, 2 bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    from captioner.inference import CaptionOptions, OptionError, option_fields

    given = {f.name: getattr(a, f.name) for f in option_fields() if f.metadata["sampling"]}
    if not a.sample:
        for name, value in given.items():
            if value is not None:
                raise UsageError(f"--{name.replace('_', '-')} is an option of sampling: add --sample")
    try:
        return pipeline.options(CaptionOptions(), n_best=a.n_best, sample=a.sample,
                                **{k: v for k, v in given.items() if v is not None})
    except OptionError as err:
        raise UsageError(f"--{err.field.replace('_', '-')}: {err}") from None


def processes(trainer) -> int:
    """How many processes the trainer runs (known before they are started)."""
    return trainer.num_devices * trainer.num_nodes


def earlier_work(output: Path, overwrite: bool) -> None:
    """Refuse (UsageError) to start afresh over an earlier run's ``OUT.part`` or chunks, which
    would throw them away, unless ``overwrite``: then delete them. Every process may call it:
    the first one's chunk folder, made empty just before the others start, holds no chunk yet."""
    from captioner.commands.caption_output import ChunkRows, part_path

    part, chunks = part_path(output), ChunkRows.folder_of(output)
    found = [str(p) for p in (part,) if p.exists()] + ([str(chunks.folder)] if chunks.files() else [])
    if not found:
        return
    if not overwrite:
        raise UsageError(f"{' and '.join(found)}: an earlier run's work is there: add --resume to continue it, "
                         "or --overwrite to delete it and start afresh")
    part.unlink(missing_ok=True)
    chunks.remove()
    logger.info("--overwrite: deleted %s", " and ".join(found))


def prediction_trainer(a):
    """The Lightning Trainer of the ``trainer`` section (its defaults where none was parsed)."""
    from captioner.commands.config import prediction_trainer

    return prediction_trainer(a.get("trainer"), a.device)


def caption(a) -> int:
    """``captioner caption`` once parsed (``a``; ``"trainer" in a`` where a ``trainer`` section
    was given)."""
    from captioner.commands.caption_output import RESUME_TEXT, PartFile, RowWriter
    from captioner.data.images import FileList
    from captioner.inference import resolve_device

    if a.json and a.format not in (None, "jsonl"):
        raise UsageError(f"--json is --format jsonl; it cannot go with --format {a.format}")
    fmt = "jsonl" if a.json else (a.format or "text")
    if a.resume and a.output is None:
        raise UsageError("--resume continues an --output file: give --output")
    if a.resume and fmt == "text":
        raise UsageError(RESUME_TEXT)
    if a.resume and a.overwrite:
        raise UsageError("--resume keeps an earlier run's work and --overwrite deletes it: give one of them")
    if a.output is not None and not a.resume:
        earlier_work(a.output, a.overwrite)
    try:
        device = resolve_device(a.device)  # --device cuda without one: one line, before any work
    except ValueError as err:
        raise UsageError(str(err)) from None
    source = image_list(a)
    if isinstance(source, list) and not source:
        raise UsageError("no image files found in " + ", ".join(str(p) for p in a.paths))
    # loaded on the CPU: moved to the device below, or by Lightning to each process's
    pipeline = load_pipeline(a.checkpoint, "cpu", a.quantize, beam_size=a.beam_size, max_length=a.max_length)
    options = caption_options(a, pipeline)
    # Lightning only where it is needed: trainer settings (processes, precision, ...) or --resume
    trainer = prediction_trainer(a) if "trainer" in a or a.resume else None
    if trainer is not None:
        device = trainer.strategy.root_device
    if a.quantize != "none" and device.type != "cpu":
        raise UsageError(f"--quantize {a.quantize} decodes on the CPU: add --device cpu")
    many = trainer is not None and processes(trainer) > 1
    if many and a.output is None:
        raise UsageError("with more than one process (--trainer.devices, --trainer.num_nodes) the captions "
                         "go to a file: give --output FILE")
    if many and isinstance(source, FileList) and source.is_stdin:
        raise UsageError("--files-from - (standard input) is read by one process: with more than one, "
                         "save the list to a file and give its path")
    if trainer is not None and (many or a.resume or trainer.precision not in ("32-true", "32")):
        return _caption_resumable(a, fmt, source, pipeline, options, trainer)
    paths = source if isinstance(source, list) else _listed(source, a.files_from)

    # One process, from the start: the pipeline's stream, straight to stdout or OUT.part.
    out = PartFile(a.output, fmt, resume=False) if a.output is not None else None
    writer = out.writer if out is not None else RowWriter(fmt, _stdout, header=True)
    pipeline.loaded.model.to(device)
    failed, started = 0, time.monotonic()
    try:
        with _progress(a, len(paths)) as bar:
            for result in pipeline.stream(paths, options, batch_size=a.batch_size, num_workers=a.num_workers,
                                          jpeg_decode=a.jpeg_decode):
                if isinstance(result, list):
                    writer.rows([c.to_dict() for c in result])
                else:
                    failed += 1
                    if writer.keeps_errors:
                        writer.rows([result.to_dict()])
                    else:  # text rows say nothing of failures: stderr does
                        bar.write(f"{result.image}\tERROR: {result.reason}", file=sys.stderr)
                bar.update(1)
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except BaseException:
        if out is not None:
            out.close()  # stopped: FILE.part stays for --resume
        raise
    return _finish(a, out, failed, len(paths), time.monotonic() - started, 1)


def image_list(a):
    """The images to caption: PATHs and their folders walked (a list), or ``--files-from`` (a
    :class:`FileList`, read by each process as it needs it)."""
    from captioner.data.images import FileList, iter_image_paths

    if a.files_from is not None and a.paths:
        raise UsageError("give image PATHs or --files-from FILE, not both")
    if a.files_from is None:
        if not a.paths:
            raise UsageError("give image PATHs (files or folders) or --files-from FILE")
        return list(iter_image_paths(a.paths))  # Paths only: cheap even for many thousands
    listed = FileList(a.files_from)
    if not listed.is_stdin and not Path(a.files_from).is_file():
        raise UsageError(f"--files-from: {a.files_from} is not a file")
    return listed


def _listed(source, name: str) -> list[Path]:
    """Every path of a file list (one process); none -> UsageError."""
    paths = list(source)
    if not paths:
        raise UsageError(f"--files-from: {name} lists no files")
    return paths


def _caption_resumable(a, fmt: str, source, pipeline, options, trainer) -> int:
    """``Trainer.predict`` over the same stream's blocks (:mod:`captioner.predict`): many
    processes, or a resumed ``--output``; each process's rows in chunks (many) or streamed."""
    from tqdm import tqdm

    from captioner.commands.caption_output import (
        ChunkRows,
        PartFile,
        RowWriter,
        StreamRows,
        finished_images,
    )
    from captioner.data.records import Deal
    from captioner.inference import reader_threads
    from captioner.predict import CaptionPredictor, ChunkWriter, predict

    many = processes(trainer) > 1
    paths = Deal(source, a.batch_size)  # this process's share, read below
    out = None
    if many:
        store = ChunkRows(a.output, fmt, paths, a.resume)
        done = (finished_images(a.output, fmt) | store.done()) if a.resume else set()
    else:
        out = PartFile(a.output, fmt, a.resume) if a.output is not None else None
        store = StreamRows(out.writer if out is not None else RowWriter(fmt, _stdout, header=True), paths)
        done = out.done if out is not None else set()
    paths.skip = done
    try:
        paths.deal(trainer.global_rank, trainer.world_size)  # the one reading of the list, per process
    except OSError as err:
        raise UsageError(f"--files-from: {err}") from None
    if not paths.total:
        raise UsageError(f"--files-from: {a.files_from} lists no files")
    if done:
        logger.info("--resume: %d images already captioned, %d to caption", paths.total - paths.todo, paths.todo)

    def report(i: int, error: str) -> None:  # text rows say nothing of failures: stderr does
        tqdm.write(f"{paths[i]}\tERROR: {error}", file=sys.stderr)

    show = a.progress if a.progress is not None else (
        paths.todo >= PROGRESS_MIN_IMAGES and sys.stderr.isatty())
    writer = ChunkWriter(store, a.chunk_size if many else 1, paths.todo, fresh=not a.resume, progress=show,
                         errors=report if fmt == "text" else None)
    trainer.callbacks.insert(0, writer)  # before the user's: a chunk is written before they see the batch
    readers = reader_threads(trainer.strategy.root_device, a.num_workers)
    module = CaptionPredictor(pipeline, paths, options, num_workers=readers, jpeg_decode=a.jpeg_decode)
    finished = False
    try:
        failed = predict(trainer, module, writer)
        finished = True
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    finally:
        if out is not None and not finished:
            out.close()  # stopped: FILE.part stays for --resume
    if failed is None:  # not the first process: it merges and reports
        return 0
    return _finish(a, out, failed, paths.total, writer.seconds, processes(trainer), paths.todo)


def _finish(a, out, failed: int, total: int, seconds: float | None, procs: int, captioned: int | None = None) -> int:
    """The end of a run: OUT.part renamed over OUT, the log lines, the exit status."""
    if out is not None:
        out.finish()
    if a.output is not None:
        from captioner.inference import throughput

        took = throughput(total if captioned is None else captioned, seconds, procs)
        logger.info("wrote %s%s", a.output, f" ({took})" if took else "")
    if failed:
        logger.warning("%d of %d images could not be captioned", failed, total)
    return 1 if failed else 0


def _quiet_stdout() -> None:
    """`captioner caption DIR | head`: stop quietly; keep Python from complaining at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _progress(a, n: int):
    """A tqdm bar on stderr (``--progress``; default: for ``PROGRESS_MIN_IMAGES`` or more
    images when stderr is a terminal), disabled otherwise."""
    from tqdm import tqdm

    show = a.progress if a.progress is not None else (n >= PROGRESS_MIN_IMAGES and sys.stderr.isatty())
    return tqdm(total=n, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True, disable=not show)


def run(args: Sequence[str], prog: str = "captioner caption") -> int:
    from captioner.commands.parsing import parse_options

    return caption(parse_options(prog, args, add_options, _add_trainer, description=DESCRIPTION))


def _add_trainer(parser) -> None:
    """The ``trainer`` section; it imports Lightning, so only when a command line asks for it."""
    from captioner.commands.config import add_prediction_trainer

    add_prediction_trainer(parser)


DESCRIPTION = (
    "Caption images. PATH may be image files or folders (searched recursively). "
    "Prints `path<TAB>caption` per caption, or rows of --format jsonl|csv|tsv with each caption's "
    "rank, score, mean_logprob and word_probs. --trainer.devices N (with --output) captions on N "
    "processes, each image once. "
    "Exit status: 0 all captioned, 1 some files could not be read, 2 bad arguments/checkpoint.")


def add_options(p) -> None:
    """The options of ``caption`` beside the ``trainer`` section."""
    from captioner.commands.caption_output import FORMATS
    from captioner.inference import option_fields

    add_model_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="processes (per device) that read and resize images while the model works "
                   "(default: 0 on the CPU, where the model already uses every core; 4 on a GPU)")
    p.add_argument("--jpeg-decode", choices=JPEG_DECODE, default="auto", metavar="WHERE",
                   help="auto, cpu or device: where JPEG files are decoded and resized: on the model's device with "
                   "torchvision (nvJPEG on a GPU), or with PIL on the CPU (auto: the device when it "
                   "is a GPU). Other formats always go through PIL")
    g = p.add_argument_group("more than one caption per image")
    for f in option_fields():  # declared once, in CaptionOptions (beam size and length: the model's)
        m = f.metadata
        if m["help"] is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if m["kind"] is bool:
            g.add_argument(flag, action="store_true", help=m["help"])
            continue
        kind = positive_int if m["kind"] is int and m["minimum"] == 1 else m["kind"]
        # a sampling option's default is None: given or not tells whether it needs --sample
        g.add_argument(flag, type=kind, default=None if m["sampling"] else f.default, help=m["help"],
                       **({"metavar": m["metavar"]} if m["metavar"] else {}))
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
    o.add_argument("--overwrite", action="store_true",
                   help="with --output: delete what an earlier run left (FILE.part, FILE.parts/) and "
                   "start afresh (without it, or --resume, such a run is refused)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bar on stderr (default: on for >= {PROGRESS_MIN_IMAGES} images "
                   "when stderr is a terminal)")
    p.add_argument("--chunk-size", type=positive_int, default=256, metavar="N",
                   help="with more than one process: each writes its captions every N images (what a "
                   "killed run loses)")
    p.add_argument("--files-from", default=None, metavar="FILE",
                   help="caption the image files listed in FILE, one path a line (- : standard input, "
                   "one process only; blank lines and the spaces around a path are ignored; a relative "
                   "path is relative to the current folder), instead of PATHs: no folder is walked, and "
                   "with many processes each reads only its share of the list")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files and/or folders")


def register(subparsers) -> None:
    subparsers.add_parser("caption", add_help=False,
                          help="caption images or folders of images (one line per image); "
                          "--trainer.devices N for many processes")
