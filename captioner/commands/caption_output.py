"""What ``captioner caption`` writes: one row per caption in JSON lines, CSV, TSV or plain text,
to stdout or to a file that appears whole and can be resumed.

``--output OUT`` writes ``OUT.part`` beside it, appending each image's rows in one ``write`` as
soon as they are known, and renames it over ``OUT`` (after an fsync) when every image is done:
``OUT`` is never half written. A run that is stopped leaves ``OUT.part``; ``--resume`` keeps its
complete records (a torn last record, and with it the rows of that record's image, are cut off),
skips the images they name and appends the rest. ``--resume`` on a finished ``OUT`` copies it to
``OUT.part`` first, so ``OUT`` stays as it was until the new one is complete.

With more than one process (``--trainer.devices N``, torchrun, SLURM) each process writes its rows
in chunks, ``OUT.parts/chunk-*.jsonl``, each file whole (:class:`ChunkRows`), and the first process
merges them into ``OUT`` in the input's order at the end, streaming them through the same
``OUT.part`` (its memory does not grow with the number of images). A run that is stopped leaves
the chunks; ``--resume`` keeps them too, and a run without it refuses to start over them
(``captioner.commands.caption.earlier_work``).
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from captioner.commands.common import UsageError
from captioner.data.chunks import ChunkFolder
from captioner.inference import COLUMNS, ImageError, row_cells

FORMATS = ("jsonl", "csv", "tsv", "text")
MERGE_IMAGES = 256  # images whose rows the merge writes to OUT.part at once
RESUME_TEXT = "--resume needs --format jsonl, csv or tsv (text lines do not say which images failed)"  # the one message of --resume with text


def part_path(path: Path) -> Path:
    """``OUT.part``: ``OUT`` while it is written."""
    return path.with_name(path.name + ".part")


def caption_rows(path: Path, captions: Sequence) -> list[dict]:
    """An image's captions as rows (:meth:`captioner.inference.Caption.to_dict`), ``path`` their image."""
    return [c.to_dict() if c.image == path else replace(c, image=path).to_dict() for c in captions]


def caption_row(path: Path, rank: int, caption) -> dict:
    """Deprecated: ``caption.to_dict()`` (the caption knows its image and rank)."""
    warnings.warn("caption_row is deprecated; use Caption.to_dict()", DeprecationWarning, stacklevel=2)
    return replace(caption, image=path, rank=rank).to_dict()


def error_row(path: Path, message: str) -> dict:
    return ImageError(path, message).to_dict()


class RowWriter:
    """Rows of one format to a binary sink, one image's rows in one write (``sink(bytes)``)."""

    def __init__(self, fmt: str, sink, header: bool) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.fmt, self.sink = fmt, sink
        if header and fmt in ("csv", "tsv"):
            self._emit([], header=True)

    @property
    def keeps_errors(self) -> bool:
        """Whether error rows go to the output (text: they go to stderr)."""
        return self.fmt != "text"

    def captions(self, path: Path, captions: Sequence) -> None:
        self._emit(caption_rows(path, captions))

    def error(self, path: Path, message: str) -> None:
        self._emit([error_row(path, message)])

    def rows(self, rows: list[dict]) -> None:
        """One image's rows as :func:`caption_rows` or :func:`error_row` made them."""
        self._emit(rows)

    def _emit(self, rows: list[dict], header: bool = False) -> None:
        if self.fmt == "jsonl":
            text = "".join(json.dumps(row) + "\n" for row in rows)
        elif self.fmt == "text":
            text = "".join(f"{row['image']}\t{row['caption']}\n" for row in rows)
        else:
            buf = io.StringIO()
            out = csv.writer(buf, delimiter="," if self.fmt == "csv" else "\t", lineterminator="\n")
            if header:
                out.writerow(COLUMNS)
            out.writerows(row_cells(row) for row in rows)
            text = buf.getvalue()
        # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes
        self.sink(text.encode("utf-8", "surrogateescape"))


class PartFile:
    """``OUT.part``, appended to image by image and renamed over ``OUT`` by :meth:`finish`."""

    def __init__(self, path: Path, fmt: str, resume: bool) -> None:
        if not path.parent.is_dir():
            raise UsageError(f"--output: folder {path.parent} does not exist")
        self.path, self.part = path, part_path(path)
        self.done: set[str] = set()
        if resume:
            if fmt == "text":
                raise UsageError(RESUME_TEXT)
            copied = not self.part.exists() and path.exists()
            if copied:
                shutil.copyfile(path, self.part)  # OUT stays whole until the new one is
            if self.part.exists():
                data = self.part.read_bytes()
                try:
                    self.done, keep = read_done(data, fmt, path if copied else self.part)
                except UsageError:
                    if copied:
                        self.part.unlink()
                    raise
                if keep < len(data):
                    with open(self.part, "rb+") as f:
                        f.truncate(keep)
        fresh = not self.done and not (resume and self.part.exists() and self.part.stat().st_size)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fresh else os.O_APPEND)
        self.fd = os.open(self.part, flags, 0o666)  # the umask gives a plain open's permissions
        self.writer = RowWriter(fmt, self._write, header=fresh)

    def write(self, data: bytes) -> None:
        """Whole records (rows of :class:`RowWriter`), appended."""
        if data:
            self._write(data)

    def _write(self, data: bytes) -> None:
        from captioner.files import DiskFullError, writing

        view = memoryview(data)
        try:
            with writing(self.part, len(data)):
                while view:  # one write call for an image's rows unless the system splits it
                    view = view[os.write(self.fd, view):]
        except DiskFullError as full:  # the rows written so far stay in OUT.part
            full.hint = "free space and run the same command with --resume to continue"
            raise

    def finish(self) -> None:
        from captioner.files import publish

        os.close(self.fd)
        publish(self.part, self.path)

    def close(self) -> None:
        """Stopped before the end: OUT.part stays for a resume."""
        os.close(self.fd)


def finished_images(path: Path, fmt: str) -> set[str]:
    """The images ``--resume`` keeps from ``path`` (or its ``.part``), read only: what
    :class:`PartFile` will keep when it opens them (UsageError as it gives)."""
    if fmt == "text":
        raise UsageError(RESUME_TEXT)
    part = part_path(path)
    source = part if part.exists() else path
    if not source.exists():
        return set()
    return read_done(source.read_bytes(), fmt, source)[0]


class StreamRows:
    """The store of a one-process run: each batch's rows go out at once, in the input's order, to
    stdout or ``OUT.part`` (``writer``); nothing to merge."""

    def __init__(self, writer: RowWriter, paths: Sequence[Path]) -> None:
        self.writer, self.paths = writer, paths
        self.count = self.failed = 0

    def start(self, fresh: bool) -> None:
        pass

    def write(self, rank: int, results: list) -> None:
        for i, captions, error in results:
            if error is None:
                self.writer.captions(self.paths[i], captions)
            else:
                self.failed += 1
                if self.writer.keeps_errors:
                    self.writer.error(self.paths[i], error)
        self.count += len(results)

    def written(self) -> int:
        return self.count

    def merge(self) -> int:
        """The number of images that could not be read."""
        return self.failed


class ChunkRows:
    """The store of a run on many processes: each process's rows in ``OUT.parts/``, a JSON line
    ``{"i", "image", "rows"}`` per image (``i``: its input position), in files
    ``chunk-<first position>-<images>.jsonl`` written whole. :meth:`merge` (the first process,
    at the end) streams them to ``OUT`` in the input's order through :class:`PartFile`, after
    what ``--resume`` keeps of ``OUT``. ``paths``: the rank's share of the input (``paths[i]``)
    and, as ``paths.items``, the whole list in order, read again by the merge."""

    def __init__(self, path: Path, fmt: str, paths, resume: bool) -> None:
        if not path.parent.is_dir():
            raise UsageError(f"--output: folder {path.parent} does not exist")
        self.path, self.fmt, self.paths, self.resume = path, fmt, paths, resume
        self.chunks = self.folder_of(path)
        self.folder = self.chunks.folder

    @staticmethod
    def folder_of(path: Path) -> ChunkFolder:
        """The chunks of a run writing ``path``: ``OUT.parts/``."""
        return ChunkFolder(path.with_name(path.name + ".parts"), "jsonl")

    def start(self, fresh: bool) -> None:
        self.chunks.start(fresh)

    def done(self) -> set[str]:
        """The images the chunks have rows for."""
        return {item["image"] for chunk in self.chunks.files() for item in _chunk_items(chunk)}

    def write(self, rank: int, results: list) -> None:
        lines = []
        for i, captions, error in results:
            path = self.paths[i]
            rows = caption_rows(path, captions) if error is None else [error_row(path, error)]
            lines.append(json.dumps({"i": i, "image": str(path), "rows": rows}) + "\n")
        self.chunks.write(min(i for i, _, _ in results), len(results), "".join(lines).encode())

    def written(self) -> int:
        return self.chunks.written()

    def merge(self) -> int:
        """The chunks -> ``OUT``, image by image in the input's order, holding one image's rows
        per open chunk (about one chunk per process), then the chunks removed once ``OUT`` is
        whole on disk; the number of images that could not be read. An image with no rows
        anywhere (a process that died) -> RuntimeError after the rows before it are written to
        ``OUT.part``, chunks kept: ``--resume`` finishes the file."""
        out = PartFile(self.path, self.fmt, self.resume)
        failed = missing = 0
        first_missing = None
        items = _in_order(self.chunks.files())
        item = next(items, None)
        pending: list[bytes] = []  # the rows of up to MERGE_IMAGES images, written in one go
        rows = RowWriter(self.fmt, pending.append, header=False)
        try:
            for i, p in enumerate(self.paths.items):
                while item is not None and item["i"] < i:  # an image of an earlier run done twice
                    item = next(items, None)
                mine = None
                if item is not None and item["i"] == i:
                    mine, item = item["rows"], next(items, None)
                if str(p) in out.done:
                    continue
                if mine is None:
                    missing += 1
                    first_missing = first_missing or str(p)
                if missing:  # nothing after a hole, so that --resume keeps the input's order
                    continue
                if "error" in mine[0]:
                    failed += 1
                    if not rows.keeps_errors:
                        continue
                rows.rows(mine)  # an image given twice: its rows twice, as on one process
                if len(pending) >= MERGE_IMAGES:
                    out.write(b"".join(pending))
                    pending.clear()
            out.write(b"".join(pending))
            if missing:
                raise RuntimeError(f"{missing} images have no captions in {self.folder} (the first: "
                                   f"{first_missing}); run the same command with --resume to finish them")
        except BaseException:
            out.close()
            raise
        out.finish()
        self.chunks.remove()
        return failed


def _chunk_items(chunk: Path) -> Iterator[dict]:
    """A chunk's images, one JSON object each, read line by line."""
    with open(chunk, "rb") as f:
        for line in f:
            item = json.loads(line)
            if "i" not in item:
                raise UsageError(f"{chunk}: a chunk of an older captioner (no input positions): "
                                 "run the command with --overwrite to start afresh")
            yield item


def _in_order(chunks: list[Path]) -> Iterator[dict]:
    """The images of ``chunks`` (sorted by their first position, each in the order of its
    positions) in the order of their positions: a chunk is opened when the merge reaches its
    first position, so only the chunks whose positions interleave (one per process) are open."""
    heap: list[tuple[int, int, dict, Iterator[dict]]] = []

    def push(k: int, it: Iterator[dict]) -> None:
        item = next(it, None)
        if item is not None:
            heapq.heappush(heap, (item["i"], k, item, it))

    k = 0
    while heap or k < len(chunks):
        while k < len(chunks) and (not heap or _first(chunks[k]) <= heap[0][0]):
            push(k, _chunk_items(chunks[k]))
            k += 1
        if heap:
            _, n, item, it = heapq.heappop(heap)
            yield item
            push(n, it)


def _first(chunk: Path) -> int:
    """A chunk's first position, from its name (``chunk-<first>-<images>``)."""
    return int(chunk.stem.split("-")[1])


def read_done(data: bytes, fmt: str, name: Path) -> tuple[set[str], int]:
    """The images an output already has rows for, and the length of its complete records.
    A torn last record is not complete, and then the rows of its image before it are dropped too
    (that image's rows may not all be there). Anything else unreadable: UsageError."""
    records: list[tuple[str, int]] = []  # (image, end offset)
    torn = False
    for image, end in (_jsonl_records if fmt == "jsonl" else _csv_records)(data, fmt, name):
        if image is None:
            torn = True
            break
        records.append((image, end))
    if torn and records:
        last = records[-1][0]
        while records and records[-1][0] == last:
            records.pop()
    keep = records[-1][1] if records else 0
    images = {image for image, _ in records if image is not _HEADER}
    return images, keep


_HEADER = "\0header"


def _jsonl_records(data: bytes, fmt: str, name: Path) -> Iterator[tuple[str | None, int]]:
    end = 0
    for line in io.BytesIO(data):
        end += len(line)
        try:
            row = json.loads(line)
            image = row["image"] if line.endswith(b"\n") else None
        except (ValueError, KeyError, TypeError):
            image = None
        if image is None:
            if end < len(data) or line.endswith(b"\n"):
                raise UsageError(f"--resume: {name} is not a JSON lines output of captioner caption "
                                 f"(at byte {end - len(line)})")
            yield None, end  # torn: the run stopped in the middle of this line
            return
        yield image, end


def _csv_records(data: bytes, fmt: str, name: Path) -> Iterator[tuple[str | None, int]]:
    ends = [0]
    last_line = [b""]

    def lines():
        for line in io.BytesIO(data):
            ends[0] += len(line)
            last_line[0] = line
            yield line.decode("utf-8", "surrogateescape")

    reader = csv.reader(lines(), delimiter="," if fmt == "csv" else "\t", strict=True)
    first = True
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if ends[0] < len(data):
                raise UsageError(f"--resume: {name} is not a {fmt} output of captioner caption: {err}") from None
            yield None, ends[0]
            return
        if not (last_line[0].endswith(b"\n") and len(record) == len(COLUMNS)):
            if ends[0] < len(data) or last_line[0].endswith(b"\n"):
                raise UsageError(f"--resume: {name} is not a {fmt} output of captioner caption "
                                 f"(line {reader.line_num})")
            yield None, ends[0]  # torn: the run stopped in the middle of this record
            return
        if first:
            if tuple(record) != COLUMNS:
                raise UsageError(f"--resume: {name} is not a {fmt} output of captioner caption "
                                 f"(its first line is not the header {','.join(COLUMNS)})")
            first = False
            yield _HEADER, ends[0]
        else:
            yield record[0], ends[0]
