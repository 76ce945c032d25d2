"""The chunk files of a resumable prediction (captions, a feature cache): one folder, one file per
chunk of results, ``chunk-<first position>-<images>.<suffix>``, each written whole (a reader sees
all of it or none). What a chunk holds is its store's business (:class:`captioner.predict.ChunkStore`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from captioner.files import atomic_write


class ChunkFolder:
    """``folder``'s chunk files of one ``suffix`` (``json``, ``jsonl``)."""

    def __init__(self, folder: Path, suffix: str) -> None:
        self.folder, self.suffix = Path(folder), suffix

    def start(self, fresh: bool) -> None:
        """Make the folder; ``fresh``: without the chunks of an earlier run."""
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def files(self) -> list[Path]:
        """The chunk files, in the order of their first positions."""
        return sorted(self.folder.glob(f"chunk-*.{self.suffix}")) if self.folder.is_dir() else []

    def path(self, first: int, images: int) -> Path:
        return self.folder / f"chunk-{first:09d}-{images:06d}.{self.suffix}"

    def write(self, first: int, images: int, data: bytes) -> None:
        """One chunk of ``images`` results from position ``first``, atomically."""
        atomic_write(self.path(first, images), lambda f: f.write(data))

    def written(self) -> int:
        """The results in the chunks written so far (by every process): the job's progress."""
        return sum(int(p.stem.rsplit("-", 1)[1]) for p in self.files())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
