"""Test helpers: what `captioner fit` runs did, callbacks injected into them, a live server for
socket tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import lightning as L


def record_fits(monkeypatch) -> list[L.Trainer]:
    """The Trainers of the ``fit`` runs started from now on, each appended once its ``fit``
    returns: what a ``captioner fit`` run did (its steps, state and metrics), where its exit
    status does not say."""
    trainers: list[L.Trainer] = []
    fit = L.Trainer.fit

    def recorded(self: L.Trainer, *args, **kwargs) -> None:
        fit(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(L.Trainer, "fit", recorded)
    return trainers


class KillAtStep(L.Callback):
    """SIGKILL the process (no clean-up, like an OOM kill) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtPredictBatch(L.Callback):
    """SIGKILL the process of ``rank`` (any: None) once it has predicted ``batches`` batches."""

    def __init__(self, batches: int, rank: int | None = None) -> None:
        self.batches, self.rank = batches, rank

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 >= self.batches and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def live_server(app):
    """``app`` under uvicorn on a free loopback port, in a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
