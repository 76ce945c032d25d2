"""What ``fit`` writes into its run folder, made to survive a kill and a full disk: atomic
checkpoints, a periodic ``last.ckpt``, and loggers (CSV metrics, TensorBoard events) that say in
one line when the disk fills up, instead of ending the run in a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from captioner.files import DiskFullError, atomic_write, writing
from captioner.settings import NonNegativeInt, check_arguments

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`: a killed run never leaves a torn checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with ``atomic_torch_save`` for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if "://" in str(path):  # remote file systems: Lightning's own transactional write
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


class PeriodicCheckpoint(L.Callback):
    """Write ``last.ckpt`` (beside the best checkpoint) every ``every_n_steps`` optimiser steps,
    so a killed run loses at most that many steps (0: never in between), and when training ends
    at a step not yet saved: a run that stops before any validation (``max_steps`` shorter than
    an epoch, ``max_time``, ``fast_dev_run``) still leaves a checkpoint to caption with."""

    def __init__(self, every_n_steps: NonNegativeInt = 500, filename: str = "last.ckpt") -> None:
        check_arguments(PeriodicCheckpoint.__init__, "last_checkpoint", {"every_n_steps": every_n_steps})
        self.every_n_steps = every_n_steps
        self.filename = filename
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        trainer.save_checkpoint(folder / self.filename, weights_only=False)  # all ranks call; rank 0 writes
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps <= 0 or trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        cb = trainer.checkpoint_callback
        last_saved = getattr(cb, "_last_global_step_saved", -1) if cb is not None else -1
        if trainer.global_step > 0 and trainer.global_step not in (self._saved_step, last_saved):
            self._save(trainer)


@contextlib.contextmanager
def _finalizing(status: str) -> Iterator[None]:
    """A run that already failed (Lightning finalizes its loggers with "failed" before it re-raises
    the error): a log that cannot be saved for want of room must not replace that error."""
    try:
        yield
    except DiskFullError as err:
        if status != "failed":
            raise
        logger.debug("log not saved: %s", err)


class RunCSVLogger(CSVLogger):
    """``<root>/logs/version_N/metrics.csv``, read by ``evaluate --report``."""

    def save(self) -> None:
        with writing(Path(self.log_dir) / "metrics.csv"):
            super().save()

    def finalize(self, status: str) -> None:
        with _finalizing(status):
            super().finalize(status)


class RunTensorBoardLogger(TensorBoardLogger):
    """``<root>/tensorboard/version_N/``. Its events are written by a thread of TensorBoard's:
    a full disk stops that thread, and the next metric logged meets the error here."""

    @property
    def experiment(self):
        with writing(self.log_dir):  # made on first use: it writes the event file's header
            return super().experiment

    def log_metrics(self, metrics, step=None) -> None:
        with writing(self.log_dir):
            super().log_metrics(metrics, step)

    def log_hyperparams(self, params, metrics=None, step=None) -> None:
        with writing(self.log_dir):
            super().log_hyperparams(params, metrics, step)

    def save(self) -> None:
        with writing(self.log_dir):
            super().save()

    def finalize(self, status: str) -> None:
        with _finalizing(status), writing(self.log_dir):
            try:
                super().finalize(status)
            finally:
                if self._experiment is not None:
                    with contextlib.suppress(OSError):  # a writer that failed to flush still closes
                        self._experiment.close()
