"""Prediction over a list of images on one process or many (Lightning DDP, torchrun, SLURM):
each image once, results written as they come and merged at the end.

``Trainer.predict`` runs an :class:`ImagePredictor` on every rank. The images still to do are cut
into *blocks* of ``block_size`` consecutive input positions (a block is one batch) and the blocks
are dealt round-robin to the ranks: no image is given twice and none is padded in, and a batch
holds the same images whatever the number of processes, so the results do not depend on it.

A :class:`ChunkWriter` hands every ``chunk_size`` results of a rank to a store that writes them
atomically (a file per chunk). A run that is killed keeps its finished chunks; the next run
leaves out the images they hold (the store's ``done``), and at the end rank 0 merges the chunks
into the output (the store's ``merge``, called by :func:`predict`). What a chunk holds and what
the output is (caption rows, a feature cache) is the store's business, not this module's.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captioner.data.features import encode
from captioner.data.images import read_image
from captioner.data.records import Deal, ImageRecord, blocks
from captioner.data.transforms import Preprocessing
from captioner.inference import CaptionOptions, CaptionPipeline, ImageError, block_seed, throughput  # noqa: F401 (block_seed: here before)

logger = logging.getLogger(__name__)

# An image's result: (input position, what the predictor made of it, or None, and the reason
# it could not be read, or None).
Result = tuple[int, Any, str | None]


def rank_blocks(todo: Iterable[int], size: int, rank: int, world: int) -> list[list[int]]:
    """The blocks of ``rank`` out of ``world``: every ``world``-th, starting at ``rank``."""
    return blocks(todo, size)[rank::world]


class _Blocks(Dataset):
    """One item per block: (positions, what ``read`` gives for each)."""

    def __init__(self, blocks: Sequence[list[int]], read: Callable[[int], Any]) -> None:
        self.blocks, self.read = blocks, read

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, k: int) -> tuple[list[int], list[Any]]:
        block = self.blocks[k]
        return block, [self.read(i) for i in block]


def _one_block(items: list):
    return items[0]  # a block is already a batch


class ImagePredictor(L.LightningModule):
    """``Trainer.predict`` over the images at positions ``todo``: subclasses say how to read an
    image (``read(i)``, in DataLoader workers) and what to predict of a block
    (``predict_block(positions, items) -> list[Result]``)."""

    def __init__(self, todo: Sequence[int], block_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.todo, self.block_size, self.num_workers = list(todo), block_size, num_workers
        self.remaining = len(self.todo)  # images left to do, on every rank together
        # a rank may be dealt no block (fewer blocks than ranks, or a resumed run's last few)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def read(self, i: int) -> Any:
        raise NotImplementedError

    def predict_block(self, positions: list[int], items: list[Any]) -> list[Result]:
        raise NotImplementedError

    def rank_todo(self, rank: int, world: int) -> list[int]:
        """The positions ``rank`` of ``world`` does, in order (its blocks, :func:`rank_blocks`)."""
        return [i for block in rank_blocks(self.todo, self.block_size, rank, world) for i in block]

    def predict_dataloader(self) -> DataLoader:
        mine = blocks(self.rank_todo(self.trainer.global_rank, self.trainer.world_size), self.block_size)
        # one block per batch (batch_size 1, unwrapped): Lightning re-makes a predict DataLoader
        # around its batch sampler, which must be a plain one
        return DataLoader(_Blocks(mine, self.read), batch_size=1, collate_fn=_one_block,
                          num_workers=self.num_workers)

    def predict_step(self, batch: tuple[list[int], list[Any]], batch_idx: int) -> list[Result]:
        positions, items = batch
        return self.predict_block(positions, items)


class ChunkStore(Protocol):
    """Where the chunks of a prediction go (see the module's docstring)."""

    def start(self, fresh: bool) -> None:
        """Rank 0, before any chunk is written: ``fresh`` -> remove the chunks of earlier runs."""

    def write(self, rank: int, results: list[Result]) -> None:
        """One chunk, atomically (a reader sees all of it or none)."""

    def written(self) -> int:
        """Results in the chunks written so far (by every rank): the progress of the job."""

    def merge(self) -> Any:
        """Rank 0, once every rank is done: the chunks -> the output."""


class ChunkWriter(BasePredictionWriter):
    """Hands each rank's results to ``store`` every ``chunk_size`` images and at the end; on rank
    0, draws one progress bar for the whole job (its images/s is every rank's), from the chunks
    the store has and rank 0's own unwritten results. ``errors``: called with (position, reason)
    for each image that could not be read, on the rank that met it."""

    def __init__(self, store: ChunkStore, chunk_size: int, total: int, fresh: bool,
                 progress: bool = True, errors: Callable[[int, str], None] | None = None) -> None:
        super().__init__(write_interval="batch")
        self.store, self.chunk_size, self.total, self.fresh = store, chunk_size, total, fresh
        self.progress, self.errors = progress, errors
        self.pending: list[Result] = []
        self.started: float | None = None
        self.seconds: float | None = None  # rank 0, after predict: from every process up to all written
        self._bar = None
        self._base = 0
        self._polled = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.store.start(self.fresh)
        trainer.strategy.barrier("chunks ready")  # nobody writes before old chunks are gone
        self.started = time.monotonic()  # every process is up: the job's images/s counts from here
        if trainer.is_global_zero and self.progress:
            from tqdm import tqdm

            self._base = self.store.written()
            self._bar = tqdm(total=self.total, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)

    def write_on_batch_end(self, trainer, pl_module, prediction: list[Result], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.errors is not None:
            for i, _value, error in prediction:
                if error is not None:
                    self.errors(i, error)
        self.pending += prediction
        if len(self.pending) >= self.chunk_size:
            self.flush(trainer.global_rank)
        self._update(len(prediction))

    def flush(self, rank: int) -> None:
        if self.pending:
            self.store.write(rank, self.pending)
            self.pending = []

    def _update(self, n: int) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        if now - self._polled > 1.0:  # other ranks' chunks, once a second
            self._polled = now
            done = self.store.written() - self._base + len(self.pending)
            self._bar.update(max(0, min(done, self.total) - self._bar.n))
        else:
            self._bar.update(min(n, self.total - self._bar.n))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer.global_rank)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.flush(trainer.global_rank)  # a rank with no blocks never sees on_predict_end
        self._close_bar()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.pending = []  # stopped: what is not in a chunk is done again by the next run
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def predict(trainer: L.Trainer, module: ImagePredictor, writer: ChunkWriter) -> Any:
    """Run ``module`` on every rank of ``trainer`` with ``writer`` among its callbacks, wait for
    every rank, and merge on rank 0: its merge's result there, None on the other ranks. With
    nothing left to do (every image in a chunk already), only the merge runs."""
    assert writer in trainer.callbacks, "the writer must be one of the trainer's callbacks"
    if module.remaining:
        trainer.predict(module, return_predictions=False)
        trainer.strategy.barrier("chunks written")
    elif trainer.is_global_zero:
        writer.store.start(writer.fresh)
    if not trainer.is_global_zero:
        return None
    if writer.started is not None:
        writer.seconds = time.monotonic() - writer.started
    return writer.store.merge()


def speed(writer: ChunkWriter, images: int, processes: int) -> str:
    """``images`` in the time from every process up to every image written (merge not included),
    as a log line says it; empty when nothing was run."""
    return throughput(images, writer.seconds, processes)


class CaptionPredictor(ImagePredictor):
    """Captions of the images ``paths`` deals to each rank (a :class:`Deal` of paths in blocks of
    ``batch_size``, the images done already skipped): per image (i, captions, None) or (i, None,
    why the file could not be read). A rank reads only its share of the list. Seeded sampling
    draws each block from a generator of its own (:func:`block_seed`)."""

    def __init__(self, pipeline: CaptionPipeline, paths: Deal, options: CaptionOptions,
                 num_workers: int = 0, jpeg_decode: str = "auto") -> None:
        super().__init__([], paths.size, num_workers)
        self.pipeline, self.paths, self.options, self.jpeg_decode = pipeline, paths, options, jpeg_decode
        self.remaining = paths.todo
        self.model = pipeline.loaded.model  # a submodule: Lightning moves it to the rank's device
        if pipeline.decoder is not pipeline.loaded.model.decoder:
            self.quantized = pipeline.decoder
        self.on_device = False

    def rank_todo(self, rank: int, world: int) -> list[int]:
        return self.paths.deal(rank, world).positions()  # read once: dealt already where started

    def predict_dataloader(self) -> DataLoader:
        # the model is on the rank's device by now: decide where JPEGs are decoded before the
        # readers start
        self.on_device = self.pipeline.jpeg_on_device(self.jpeg_decode)
        return super().predict_dataloader()

    def read(self, i: int) -> tuple[Tensor | bytes | None, str | None]:
        return self.pipeline.read(self.paths[i], self.on_device)

    def predict_block(self, positions: list[int], items: list) -> list[Result]:
        """A block of the pipeline's stream (:meth:`CaptionPipeline.caption_block`)."""
        files = [(self.paths[i], data, error) for i, (data, error) in zip(positions, items)]
        done = self.pipeline.caption_block(files, self.options, positions[0] // self.block_size)
        return [(i, None, r.reason) if isinstance(r, ImageError) else (i, r, None) for i, r in zip(positions, done)]


class FeaturePredictor(ImagePredictor):
    """Region features of ``records[i]`` for the positions ``todo``: per image (i, its arrays
    stored as ``dtype`` (``captioner.data.features.Codec.pack``), None) or (i, None, why the file
    could not be read)."""

    def __init__(self, encoder: nn.Module, records: Sequence[ImageRecord], preprocessing: Preprocessing,
                 todo: Sequence[int], batch_size: int, num_workers: int = 0, dtype: str = "float16") -> None:
        super().__init__(todo, batch_size, num_workers)
        self.encoder, self.records, self.preprocessing = encoder, list(records), preprocessing
        self.stored_as = dtype  # not .dtype: a LightningModule's own

    def read(self, i: int) -> tuple[Tensor | None, str | None]:
        return read_image(self.records[i].path, self.preprocessing)

    def predict_block(self, positions: list[int], items: list) -> list[Result]:
        good = [x for x, e in items if e is None]
        rows = iter(encode(self.encoder, torch.stack(good).to(self.device), self.stored_as) if good else ())
        return [(i, None, e) if e is not None else (i, next(rows), None) for i, (_x, e) in zip(positions, items)]
