"""The web page and JSON API behind ``captioner serve``.

One model, loaded once. Uploads are read into memory with a byte limit (never onto disk: the uploaded
file name is not used for anything), decoded on a small thread pool, and handed to a single consumer
task that runs the model on one thread, batching images that arrived together with the same caption
options (a seeded sampling request runs alone, so that its seed gives the same captions). The
number of images waiting or running is bounded; beyond it the server answers 503 instead of queueing
without end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from torch import Tensor

from captioner.checkpoint import LoadedModel, load_checkpoint
from captioner.data import images as image_io
from captioner.inference import (
    API_FIELDS,
    Caption,
    CaptionOptions,
    CaptionPipeline,
    OptionError,
    option_fields,
    option_schema,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# Limits of the caption options of POST /api/caption (each bounds the work of one request):
# declared with the options, in CaptionOptions.
_LIMITS = {f.name: f.metadata["api_max"] for f in option_fields()}
MAX_BEAM_SIZE = _LIMITS["beam_size"]
MAX_N_BEST = _LIMITS["n_best"]
MAX_LENGTH = _LIMITS["max_length"]
MAX_SAMPLES = _LIMITS["num_samples"]
# Room for the multipart boundaries, part headers and the small form fields around the image.
MULTIPART_OVERHEAD = 64 * 1024

# Everything the page needs comes from this server; the policy makes the browser enforce that.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
     b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ApiError(Exception):
    """Answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _TooLarge(Exception):
    pass


@dataclass
class ServeStats:
    """Counters for monitoring and tests (``app.state.stats``)."""

    requests: int = 0  # caption requests that reached the model queue
    images: int = 0  # images captioned
    batches: int = 0  # model calls
    largest_batch: int = 0
    busy: int = 0  # requests refused with 503 because the queue was full
    failures: int = 0  # model calls that raised

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Job:
    image: Tensor  # (3, S, S), preprocessed
    options: CaptionOptions  # beam_size always set
    future: asyncio.Future

    @property
    def alone(self) -> bool:
        """Seeded sampling: in a batch of its own, where the seed's draws are all its own."""
        return self.options.sample and self.options.seed is not None


class QueueFull(Exception):
    pass


class Batcher:
    """One consumer task feeding one model thread; concurrent requests share batches.

    Requests with the same options that are waiting when the model becomes free (or that arrive
    within ``wait_s`` of an idle queue's first request) run as one batch of at most ``max_batch``.
    """

    def __init__(
        self, pipeline: CaptionPipeline, stats: ServeStats, max_batch: int = 8, max_pending: int = 64,
        wait_s: float = 0.005,
    ) -> None:
        self.pipeline = pipeline
        self.stats = stats
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.wait_s = wait_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-model")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._pending = 0  # submitted and not yet answered (queued, waiting or running)

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        # Started lazily on the serving loop (and again if a test client brings a new loop).
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._waiting = deque()
            self._task = loop.create_task(self._consume(), name="captioner-batcher")
        return loop

    async def submit(self, image: Tensor, options: CaptionOptions) -> list[Caption]:
        loop = self._ensure_running()
        if self._pending >= self.max_pending:
            self.stats.busy += 1
            raise QueueFull
        self._pending += 1
        self.stats.requests += 1
        job = _Job(image, options, loop.create_future())
        try:
            self._queue.put_nowait(job)
            return await job.future
        finally:  # also when the client went away: the job is skipped if it has not run yet
            self._pending -= 1

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not self._waiting:
                self._waiting.append(await queue.get())
                if self.wait_s > 0:
                    await asyncio.sleep(self.wait_s)  # let requests that arrive together join in
            while not queue.empty():
                self._waiting.append(queue.get_nowait())
            batch = self._take_batch()
            if not batch:
                continue
            self._running = batch
            try:
                captions = await loop.run_in_executor(
                    self._executor, self._run_model, [j.image for j in batch], batch[0].options
                )
            except Exception as err:  # e.g. out of memory: fail this batch, keep serving
                logger.exception("captioning a batch of %d failed", len(batch))
                self.stats.failures += 1
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(ApiError(500, f"the model failed: {type(err).__name__}"))
                continue
            finally:
                self._running = []
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for j, cap in zip(batch, captions):
                if not j.future.done():
                    j.future.set_result(cap)

    def _take_batch(self) -> list[_Job]:
        """Up to ``max_batch`` live jobs with the oldest job's options, oldest first (one when it
        is seeded sampling)."""
        live = [j for j in self._waiting if not j.future.done()]
        if not live:
            self._waiting.clear()
            return []
        first = live[0]
        size = 1 if first.alone else self.max_batch
        batch, rest = [], deque()
        for j in live:
            (batch if j.options == first.options and len(batch) < size else rest).append(j)
        self._waiting = rest
        return batch

    def _run_model(self, images: list[Tensor], options: CaptionOptions) -> list[list[Caption]]:
        import torch

        caps = self.pipeline(torch.stack(images), options=options)  # (B, 3, S, S)
        return [c if isinstance(c, list) else [c] for c in caps]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._task
        left = list(self._waiting) + list(self._running)
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for j in left:
            if not j.future.done():
                j.future.set_exception(ApiError(503, "the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)


def model_name(loaded: LoadedModel) -> str:
    enc = loaded.hparams.get("encoder", {}).get("name", "?")
    att = loaded.hparams.get("decoder", {}).get("attention", "?")
    return f"{enc} + {att} attention"


def caption_json(cap: Caption, beam_size: int, rank: int | None = None) -> dict:
    """One caption: its words, their attention maps and probabilities, its scores
    (:data:`API_FIELDS`), and the beam size asked for."""
    if rank is not None and rank != cap.rank:
        cap = replace(cap, rank=rank)
    return {**cap.to_dict(API_FIELDS), "beam_size": beam_size}


def captions_json(caps: list[Caption], options: CaptionOptions) -> dict:
    """The first caption (the best, or the first drawn) at the top level, as ever; the others,
    in order, in ``alternatives``, each in the same form."""
    beam = options.beam_size
    out = caption_json(caps[0], beam)
    out["sample"] = options.sample
    out["alternatives"] = [caption_json(c, beam) for c in caps[1:]]
    return out


def _error_status(err: image_io.ImageLoadError) -> int:
    reason = err.reason.lower()
    if reason.startswith("not an image"):
        return 415
    if reason.startswith("decompression bomb"):
        return 413
    return 400  # empty, truncated, corrupt


class _SecurityHeaders:
    """Plain ASGI middleware (it does not touch the request body stream)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        return await self.app(scope, receive, send_with_headers)


# One line per request: "CLIENT "METHOD PATH" STATUS MS ms". The client is the forwarded one
# when uvicorn was told to trust the proxy (serve --forwarded-allow-ips), else the peer's address.
access_logger = logging.getLogger("captioner.serve.access")


class _AccessLog:
    """Plain ASGI middleware: logs each HTTP request once its answer is sent (or has failed)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 0  # no answer started: the client went away or the app failed

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except BaseException:
            status = status or 500
            raise
        finally:
            client = scope.get("client")
            access_logger.info('%s "%s %s" %s %.1f ms', client[0] if client else "-", scope["method"],
                               scope["path"], status or "-", (time.perf_counter() - started) * 1000)


class _Service:
    """What the routes of one app share: the model, its pipeline and batcher, the decode pool and
    the limits. Each route is a method; :func:`create_app` wires them."""

    def __init__(self, loaded: LoadedModel, pipeline: CaptionPipeline, *, max_upload_mb: float, max_batch: int,
                 max_queue: int, decode_workers: int, batch_wait_ms: float, quantize: str) -> None:
        self.loaded, self.pipeline, self.quantize = loaded, pipeline, quantize
        self.default_beam = min(max(pipeline.beam_size, 1), MAX_BEAM_SIZE)
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.body_limit = self.max_bytes + MULTIPART_OVERHEAD
        self.stats = ServeStats()
        self.batcher = Batcher(pipeline, self.stats, max_batch=max_batch, max_pending=max_queue,
                               wait_s=batch_wait_ms / 1000)
        self.decoder_pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="captioner-decode")
        self.index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        logger.info("model %s (vocabulary %d) on %s", model_name(self.loaded), len(self.loaded.vocab),
                    self.pipeline.device)
        yield
        await self.batcher.close()
        self.decoder_pool.shutdown(wait=False, cancel_futures=True)

    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.index_html, headers={"cache-control": "no-cache"})

    async def healthz(self) -> dict:
        return {
            "status": "ok",
            "model": model_name(self.loaded),
            "vocab_size": len(self.loaded.vocab),
            "grid": self.loaded.hparams.get("encoder", {}).get("grid"),
            "image_size": self.loaded.preprocessing.image_size,
            "beam_size": self.default_beam,
            "max_beam_size": MAX_BEAM_SIZE,
            "max_n_best": MAX_N_BEST,
            "max_length": MAX_LENGTH,
            "max_num_samples": MAX_SAMPLES,
            "max_upload_mb": self.max_upload_mb,
            "quantize": self.quantize,
        }

    def too_large(self) -> ApiError:
        return ApiError(413, f"upload too large: the limit is {self.max_upload_mb:g} MB")

    async def read_form(self, request: Request):
        """The multipart body, in memory, refused as soon as it passes ``body_limit`` bytes."""
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415, "send the image as multipart/form-data in a field named 'image'")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.body_limit
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
            if too_big:  # refuse before reading a byte of it
                raise self.too_large()

        async def limited() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > self.body_limit:  # a lying or absent Content-Length
                    raise _TooLarge
                yield chunk

        parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=16)
        parser.spool_max_size = self.body_limit + 1  # keep the upload in memory, never a temp file
        try:
            return await parser.parse()
        except _TooLarge:
            raise self.too_large() from None
        except MultiPartException as err:
            raise ApiError(400, f"malformed multipart form: {err.message}") from None

    def parse_options(self, form) -> CaptionOptions:
        """The form's caption options (each as :class:`CaptionOptions` declares it), checked."""
        fields = {f.name: parse_field(form, f.name, f.metadata["kind"], f.metadata["minimum"], f.metadata["api_max"])
                  for f in option_fields()}
        given = {k: v for k, v in fields.items() if v is not None}
        given.setdefault("beam_size", self.default_beam)
        try:
            return self.pipeline.options(CaptionOptions(), **given)  # temperature > 0, 0 < top_p <= 1, ...
        except OptionError as err:
            raise ApiError(422, str(err)) from None

    def decode(self, data: bytes) -> Tensor:
        # The name is only used in messages; the client's file name is never used at all.
        pre = self.loaded.preprocessing
        return pre(image_io.load_image_bytes(data, "upload", pre.decode_size))  # (3, S, S)

    async def caption(self, request: Request) -> JSONResponse:
        form = await self.read_form(request)
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "the form needs a file field named 'image'")
            options = self.parse_options(form)
            data = await upload.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise self.too_large()
        finally:
            await form.close()
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(self.decoder_pool, self.decode, data)
        except image_io.ImageLoadError as err:
            raise ApiError(_error_status(err), err.reason) from None
        del data
        try:
            caps = await self.batcher.submit(image, options)
        except QueueFull:
            raise ApiError(503, "the server is busy: too many images waiting; try again shortly") from None
        return JSONResponse(captions_json(caps, options))


def parse_field(form, name: str, kind: type, low=None, high=None):
    """A form field as ``kind`` within [low, high] (None: absent), else 422 naming it."""
    raw = form.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ApiError(422, f"{name} must be a form field, not a file")
    text = raw.strip()
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ApiError(422, f"{name} must be true or false, got {raw[:20]!r}")
        return text.lower() in ("true", "1")
    span = f" from {low} to {high}" if low is not None and high is not None else ""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ApiError(422, f"{name} must be {what}{span}, got {raw[:20]!r}") from None
    if kind is float and value != value:  # NaN
        raise ApiError(422, f"{name} must be a number, got {raw[:20]!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(422, f"{name} must be{span or ' in range'}, got {value}")
    return value


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    msgs = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
    return JSONResponse({"error": msgs or "invalid request"}, status_code=422)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": "internal server error"}, status_code=500)


async def _favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


# The form of POST /api/caption: the image and the caption options, as CaptionOptions declares them.
_CAPTION_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"},
                   **{f.name: option_schema(f) for f in option_fields()}},
}}}}}


def create_app(
    checkpoint: str | os.PathLike | LoadedModel,
    *,
    max_upload_mb: float = 10.0,
    max_batch: int = 8,
    max_queue: int = 64,
    device: str = "cpu",
    default_beam_size: int | None = None,
    decode_workers: int = 2,
    batch_wait_ms: float = 5.0,
    quantize: str = "none",
) -> FastAPI:
    """The app for one model: a checkpoint path (loaded now, on ``device``) or a ``LoadedModel``.

    ``max_upload_mb`` bounds an upload; ``max_batch`` images per model call; ``max_queue`` images
    waiting or running before new requests get 503; ``decode_workers`` images decoded at once;
    ``quantize="int8"`` decodes with int8 weights (CPU).
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    if max_batch < 1 or max_queue < 1 or decode_workers < 1:
        raise ValueError("max_batch, max_queue and decode_workers must be >= 1")
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint(checkpoint, device)
    pipeline = CaptionPipeline(loaded, beam_size=default_beam_size, quantize=quantize)
    service = _Service(loaded, pipeline, max_upload_mb=max_upload_mb, max_batch=max_batch, max_queue=max_queue,
                       decode_workers=decode_workers, batch_wait_ms=batch_wait_ms, quantize=quantize)

    # No /docs: Swagger UI would load scripts from a CDN, and the page must work offline.
    app = FastAPI(title="captioner", lifespan=service.lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_AccessLog)  # outermost of ours: its time includes the headers' middleware
    app.state.stats = service.stats
    app.state.batcher = service.batcher
    app.state.loaded = loaded
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for kind, handler in ((ApiError, _api_error), (StarletteHTTPException, _http_error),
                          (RequestValidationError, _validation_error), (Exception, _internal_error)):
        app.add_exception_handler(kind, handler)
    app.add_api_route("/", service.index, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/favicon.ico", _favicon, methods=["GET"], include_in_schema=False)
    app.add_api_route("/healthz", service.healthz, methods=["GET"])
    app.add_api_route("/api/caption", service.caption, methods=["POST"], openapi_extra=_CAPTION_FORM)
    return app
