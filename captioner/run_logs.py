"""The loggers of a ``fit`` run folder (CSV metrics, TensorBoard events) that name the file and
say so in one line when the disk fills up, instead of ending the run in a traceback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from captioner.data.atomic import DiskFullError, writing

logger = logging.getLogger(__name__)


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
