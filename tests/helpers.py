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
def live_server(app, **config):
    """``app`` under uvicorn on a free loopback port, in a background thread; ``config``: more
    ``uvicorn.Config`` settings."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
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


class FullDisk:
    """A disk that fills up, faked: while active, writes to files whose name matches ``pattern``
    (``fnmatch`` on the name; atomic writes go to ``.NAME.*.tmp``) fail with ENOSPC once
    ``room`` bytes are in them, from the ``skip``-th such file on (the ones before are written),
    and the free space reads ``free`` bytes. Python's own writes are caught where they open a file
    (``open``, ``io.open``, ``os.fdopen``) or write to a descriptor (``os.write``). ``free_up()``: the space is
    freed (everything restored)."""

    def __init__(self, pattern: str, room: int = 0, skip: int = 0, free: int = 100_000) -> None:
        self.pattern, self.room, self.skip, self.free = pattern, room, skip, free
        self.failed: list[str] = []  # the paths whose write failed
        self._patch = None

    def _matches(self, path) -> bool:
        import fnmatch

        if not fnmatch.fnmatch(os.path.basename(str(path)), self.pattern):
            return False
        self.skip -= 1
        return self.skip < 0

    def _full(self, path: str) -> OSError:
        import errno

        self.failed.append(path)
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> FullDisk:
        import builtins
        import io

        import pytest

        from captioner import files

        disk = self
        fdopen, real_open, write = os.fdopen, builtins.open, os.write
        counts: dict[int, int] = {}  # descriptor -> bytes written through os.write

        class FullFile:
            def __init__(self, f, path: str) -> None:
                self._f, self._path, self._written = f, path, 0

            def write(self, data):
                size = len(data) if isinstance(data, str) else memoryview(data).nbytes
                if self._written + size > disk.room:
                    raise disk._full(self._path)
                self._written += size
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __iter__(self):
                return iter(self._f)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def fake_fdopen(fd, *args, **kwargs):
            f = fdopen(fd, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{fd}")
            return FullFile(f, path) if "w" in f.mode and disk._matches(path) else f

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writes = any(c in mode for c in "wax+")
            named = isinstance(file, str | bytes | os.PathLike)
            return FullFile(f, os.fsdecode(file)) if writes and named and disk._matches(os.fsdecode(file)) else f

        def fake_write(fd, data):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if fnmatch_name(path) and counts.get(fd, 0) + len(data) > disk.room:
                raise disk._full(path)
            counts[fd] = counts.get(fd, 0) + len(data)
            return write(fd, data)

        def fnmatch_name(path: str) -> bool:
            import fnmatch

            return fnmatch.fnmatch(os.path.basename(path), disk.pattern)

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(os, "fdopen", fake_fdopen)
        self._patch.setattr(builtins, "open", fake_open)
        self._patch.setattr(io, "open", fake_open)  # TensorBoard's event writer opens with io.open
        self._patch.setattr(os, "write", fake_write)
        self._patch.setattr(files, "free_bytes", lambda path: disk.free, raising=False)
        return self

    def free_up(self) -> None:
        if self._patch is not None:
            self._patch.undo()
            self._patch = None

    def __exit__(self, *exc) -> None:
        self.free_up()
