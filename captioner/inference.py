"""Captioning images with a loaded model (used by the CLI and the server); loading is captioner.checkpoint's."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

import captioner.checkpoint as _checkpoint
from captioner.data.tokenizers import get_tokenizer
from captioner.data.vocab import END_ID
from captioner.decoding import DecodingConfig, Generated, beam_search, generate, sample
from captioner.models.quantize import quantize_decoder

logger = logging.getLogger(__name__)

# Moved to captioner.checkpoint; kept here, deprecated, for one release.
_MOVED = ("CheckpointError", "LoadedModel", "export_model_folder", "load_checkpoint", "read_checkpoint")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"captioner.inference.{name} is deprecated: use captioner.checkpoint.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(_checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The fields of a caption row (JSON lines, CSV, TSV; an error row has image and error only), in
# order, and the columns of CSV/TSV; the API's JSON has its own selection of the same fields.
ROW_FIELDS = ("image", "rank", "caption", "score", "mean_logprob", "word_probs")
COLUMNS = (*ROW_FIELDS, "error")
API_FIELDS = ("caption", "words", "attention", "grid", "score", "mean_logprob", "word_probs", "rank")
DIGITS = 6  # decimals of the scores, probabilities and maps in the outputs


@dataclass
class Caption:
    """One caption of an image: the only result type of captioning (the CLI's rows, the API's
    JSON, ``attend``'s maps and ``evaluate``'s predictions are all made from it).

    ``score``: the summed log-probability of its tokens (the words, then ``<end>`` when it was
    emitted), divided by ``words ** length_penalty`` where beam search was asked for a length
    penalty. ``token_logprobs``: those tokens' log-probabilities, each given the words before it.
    ``rank``: its place among the image's captions, 1-based (best first; samples: as drawn).
    ``image``: what it describes (a file's path, a data set's image id), None when not known."""

    words: list[str]
    score: float
    alphas: Tensor | None  # (T, h, w): one map per word; None where not kept
    grid: tuple[int, int]
    token_logprobs: list[float] = field(default_factory=list)
    tokenizer: str = "simple"  # how ``text`` joins the words (no spaces between Chinese characters)
    rank: int = 1
    image: str | os.PathLike | int | None = None

    @property
    def text(self) -> str:
        return get_tokenizer(self.tokenizer).join(self.words)

    @property
    def word_probs(self) -> list[float]:
        """The probability of each word (one per word of ``words``)."""
        return [math.exp(x) for x in self.token_logprobs[: len(self.words)]]

    @property
    def mean_logprob(self) -> float:
        """The mean log-probability per token (the words and ``<end>``): a confidence that does
        not fall with the caption's length as the summed log-probability does."""
        lp = self.token_logprobs
        return sum(lp) / len(lp) if lp else float("nan")

    def to_dict(self, fields: Sequence[str] = ROW_FIELDS, digits: int | None = DIGITS) -> dict:
        """The caption as JSON: ``fields`` in their order (:data:`ROW_FIELDS`: a row of
        ``captioner caption``; :data:`API_FIELDS`: the API's), numbers rounded to ``digits``
        decimals (None: as they are). ``attention``: (T, h, w) nested lists."""
        def num(x: float) -> float:
            return round(float(x), digits) if digits is not None else x

        def value(name: str):
            if name == "image":
                return self.image if isinstance(self.image, int) else str(self.image)
            if name == "attention":
                return [[[num(v) for v in row] for row in m] for m in self.alphas.tolist()]
            if name == "grid":
                return list(self.grid)
            if name == "word_probs":
                return [num(p) for p in self.word_probs]
            if name in ("score", "mean_logprob"):
                return num(getattr(self, name))
            if name == "caption":
                return self.text
            if name == "words":
                return list(self.words)
            return getattr(self, name)  # rank

        return {name: value(name) for name in fields}

    def to_row(self) -> list:
        """The caption as a CSV/TSV record of :data:`COLUMNS`."""
        return row_cells(self.to_dict())


@dataclass
class ImageError:
    """An image that could not be captioned (it could not be read): the stream's other result."""

    image: str | os.PathLike | int
    reason: str

    def to_dict(self) -> dict:
        return {"image": str(self.image), "error": self.reason}

    def to_row(self) -> list:
        return row_cells(self.to_dict())


def row_cells(row: dict) -> list:
    """A row of :meth:`Caption.to_dict` or :meth:`ImageError.to_dict` (or the same read back
    from JSON) -> its CSV/TSV cells, one per column of :data:`COLUMNS` (word_probs joined by spaces)."""
    probs = row.get("word_probs")
    return [(" ".join(map(str, probs)) if probs is not None else "") if c == "word_probs" else row.get(c, "")
            for c in COLUMNS]


class OptionError(ValueError):
    """A caption option out of range or not allowed with the others; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _option(default, kind: type, help: str | None = None, *, metavar: str | None = None,
            minimum: float | None = None, maximum: float | None = None, exclusive_minimum: float | None = None,
            api_max: int | None = None, sampling: bool = False):
    """A field of :class:`CaptionOptions` with what the CLI flags, the web form and the OpenAPI
    schema are made from: ``kind`` (int, float, bool), ``help`` (the flag's; None: no flag of
    its own), ``metavar``, the limits (``api_max``: the server's bound on a request's work),
    ``sampling``: an option of sampling only."""
    return field(default=default, metadata={
        "kind": kind, "help": help, "metavar": metavar, "minimum": minimum, "maximum": maximum,
        "exclusive_minimum": exclusive_minimum, "api_max": api_max, "sampling": sampling})


@dataclass(frozen=True)
class CaptionOptions:
    """How to caption each image: the best caption of a beam search (the default), its ``n_best``
    best (distinct, best first), or ``num_samples`` drawn ones (``sample=True``: each word drawn
    from the model's distribution at ``temperature``, within its ``top_k`` words and the ``top_p``
    nucleus; ``seed`` makes the draws repeat, from a generator of their own, never the global
    random state). ``beam_size``/``max_length`` None: the pipeline's.

    Declared once: ``captioner caption``'s flags, the server's form and its OpenAPI schema are
    made from these fields (:func:`option_fields`)."""

    beam_size: int | None = _option(None, int, minimum=1, api_max=10)
    max_length: int | None = _option(None, int, minimum=1, api_max=50)
    n_best: int = _option(
        1, int, "the N best distinct captions of the beam search, best first (N <= beam size)",
        metavar="N", minimum=1, api_max=10)
    sample: bool = _option(False, bool, "draw captions from the model instead of searching for the most likely")
    num_samples: int = _option(1, int, "--sample: captions drawn per image (default 1)", metavar="N",
                               minimum=1, api_max=10, sampling=True)
    temperature: float = _option(1.0, float, "--sample: > 1 flattens the distribution, < 1 sharpens it (default 1)",
                                 metavar="T", exclusive_minimum=0, sampling=True)
    top_k: int = _option(0, int, "--sample: draw among the K most likely words only (default 0: all)",
                         metavar="K", minimum=0, sampling=True)
    top_p: float = _option(1.0, float, "--sample: draw among the most likely words that together reach P (0 < P <= 1)",
                           metavar="P", exclusive_minimum=0, maximum=1, sampling=True)
    seed: int | None = _option(None, int, "--sample: the same seed, inputs and --batch-size give the same captions",
                               minimum=0, api_max=2**63 - 1, sampling=True)

    @property
    def count(self) -> int:
        """Captions per image."""
        return self.num_samples if self.sample else self.n_best

    def check(self, default_beam_size: int) -> None:
        """OptionError naming the first option that is out of range or needs another."""
        beam = self.beam_size if self.beam_size is not None else default_beam_size
        for name in ("beam_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(name, f"{name} must be >= 1, got {value}")
        if self.n_best < 1:
            raise OptionError("n_best", f"n_best must be >= 1, got {self.n_best}")
        if self.num_samples < 1:
            raise OptionError("num_samples", f"num_samples must be >= 1, got {self.num_samples}")
        if not self.temperature > 0:
            raise OptionError("temperature", f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OptionError("top_k", f"top_k must be >= 0, got {self.top_k}")
        if self.sample:
            if self.n_best != 1:
                raise OptionError("n_best", "n_best is for beam search; with sample, ask for num_samples")
        else:
            sampling = {"num_samples": self.num_samples != 1, "temperature": self.temperature != 1.0,
                        "top_k": self.top_k != 0, "top_p": self.top_p != 1.0, "seed": self.seed is not None}
            for name, given in sampling.items():
                if given:
                    raise OptionError(name, f"{name} is an option of sampling: it needs sample")
            if self.n_best > beam:
                raise OptionError("n_best", f"n_best ({self.n_best}) must be <= the beam size ({beam})")


def option_fields() -> tuple:
    """The fields of :class:`CaptionOptions` (``dataclasses.Field``, their ``metadata`` as
    :func:`_option` made it), in order."""
    return fields(CaptionOptions)


def option_schema(f) -> dict:
    """The OpenAPI (JSON schema) of one option as a form field: its type and limits."""
    m = f.metadata
    schema = {"type": {int: "integer", float: "number", bool: "boolean"}[m["kind"]]}
    for key, value in (("minimum", m["minimum"]), ("exclusiveMinimum", m["exclusive_minimum"]),
                       ("maximum", m["api_max"] if m["api_max"] is not None else m["maximum"])):
        if value is not None and abs(value) <= 2**53:  # beyond, a JSON number is not exact (the seed's 2**63 - 1)
            schema[key] = value
    return schema


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


PRECISIONS = ("fp32", "bf16")
JPEG_DECODE = ("auto", "cpu", "device")


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """bfloat16 autocast on ``device`` when ``precision`` is ``"bf16"``, else a no-op context."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class CaptionPipeline:
    """Images -> captions with per-word attention maps, in batches."""

    def __init__(
        self,
        loaded: _checkpoint.LoadedModel,
        beam_size: int | None = None,
        max_length: int | None = None,
        length_penalty: float | None = None,
        suppress_unk: bool | None = None,
        precision: str = "fp32",
        quantize: str = "none",
        cuda_graph: bool | None = None,
    ) -> None:
        """``precision="bf16"``: run encoder and decoder under bfloat16 autocast (for GPUs with
        bf16 units; on CPUs without them it is slower). Scores stay float32.
        ``quantize="int8"``: decode with int8 weights (CPU only; ``models.quantize``); the
        encoder stays as it is. ``cuda_graph=False``: beam search on a GPU launches its kernels one
        by one instead of replaying a CUDA graph of its step."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if quantize != "none" and precision != "fp32":
            raise ValueError(f"quantize={quantize!r} decodes in int8 on the CPU; it needs precision='fp32'")
        self.precision = precision
        self.quantize = quantize
        self.loaded = loaded
        self.decoder = quantize_decoder(loaded.model.decoder, quantize)
        self.decoding = DecodingConfig.from_dict(
            loaded.decoding, beam_size=beam_size, max_length=max_length,
            length_penalty=length_penalty, suppress_unk=suppress_unk, cuda_graph=cuda_graph)
        if self.decoding.max_length is None:  # trained with the tokenizer's limit: count its tokens
            self.decoding = replace(self.decoding, max_length=get_tokenizer(loaded.tokenizer).max_length)
        if self.beam_size < 1:
            raise ValueError(f"beam size must be >= 1, got {self.beam_size}")

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str = "cpu",
                        **options) -> CaptionPipeline:
        """A pipeline for a model folder, a Hub id (``hf://owner/name`` or ``owner/name``) or a
        ``.ckpt``; ``device``: ``cpu``, ``cuda`` or ``auto``; ``options``: the constructor's
        (``beam_size``, ``max_length``, ``precision``, ...)."""
        return cls(_checkpoint.load_checkpoint(path_or_repo_id, resolve_device(device)), **options)

    def __call__(self, images, beam_size: int | None = None, batch_size: int = 16,
                 options: CaptionOptions | None = None, **kw):
        """Caption one image or many: a path, a PIL image or a tensor -> one :class:`Caption`;
        a list of them (or a (B, 3, H, W) tensor) -> a list. uint8 tensors are images (3, H, W)
        as TorchCodec's ``decode_image`` gives them; float tensors are taken as already
        preprocessed (3, S, S). ``options`` (and ``kw``, fields of :class:`CaptionOptions`, e.g.
        ``n_best=3`` or ``sample=True, seed=0``): with more than one caption per image, each image
        gives the list of its captions. A file that cannot be read raises ``ImageLoadError``
        (:meth:`stream` reports such files and goes on instead)."""
        one = isinstance(images, str | os.PathLike | Image.Image) or (
            isinstance(images, Tensor) and images.dim() == 3)
        items = [images] if one else list(images)
        if beam_size is not None:
            kw["beam_size"] = beam_size
        options = self.options(options, **kw)
        generator = self.generator(options)
        out: list[list[Caption]] = []
        for i in range(0, len(items), batch_size):
            batch = torch.stack([self._pixels(x) for x in items[i:i + batch_size]])
            out += self._caption_tensors(batch, options, generator)
        got = [caps if options.count > 1 else caps[0] for caps in out]
        return got[0] if one else got

    def _pixels(self, image) -> Tensor:
        """One image of :meth:`__call__` -> a preprocessed (3, S, S) tensor on the model's device."""
        pre = self.loaded.preprocessing
        if isinstance(image, str | os.PathLike):
            return pre.load(image).to(self.device)
        if isinstance(image, Image.Image):
            return pre(image.convert("RGB")).to(self.device)
        if not isinstance(image, Tensor):
            raise TypeError(f"expected a path, a PIL image or a tensor, got {type(image).__name__}")
        if image.dtype == torch.uint8:
            return pre.from_uint8([image])[0].to(self.device)
        s = pre.image_size
        if tuple(image.shape) != (3, s, s):
            raise ValueError(f"a float tensor is taken as a preprocessed image (3, {s}, {s}); got "
                             f"{tuple(image.shape)} (give uint8 pixels to have it resized)")
        return image.to(self.device)

    def stream(self, paths: Iterable[str | os.PathLike], options: CaptionOptions | None = None, *,
               batch_size: int = 16, num_workers: int | None = None, jpeg_decode: str = "auto",
               **kw) -> Iterator[list[Caption] | ImageError]:
        """Caption many image files: per path, in input order, the list of its captions (one
        unless ``options`` ask for more; each knows its ``image`` and ``rank``) or an
        :class:`ImageError` for a file that could not be read. Memory stays flat.

        The paths are cut into blocks of ``batch_size`` (a block is one batch, less its unreadable
        files); seeded sampling draws each block from a seed of its own (:func:`block_seed`), so a
        block's captions are the same whichever process or run captions it.
        ``num_workers`` > 0 reads and preprocesses images in that many threads (PIL decoding and
        resizing release the GIL), at most two batches ahead of the model; ``None``:
        :meth:`reader_threads` chooses. ``jpeg_decode``: see :meth:`jpeg_on_device`; on the
        device path the threads only read files, and each batch's JPEGs are decoded in one call
        there (other formats, and JPEGs it cannot take, still go through PIL)."""
        options = self.options(options, **kw)
        on_device = self.jpeg_on_device(jpeg_decode)

        def read(p) -> tuple[Path, Tensor | bytes | None, str | None]:
            return (p, *self.read(p, on_device))

        threads = self.reader_threads(num_workers)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="captioner-read") if threads > 0 else None
        try:
            block: list = []
            number = 0
            for item in _read_ahead(pool, read, paths, 2 * batch_size) if pool else map(read, paths):
                block.append(item)
                if len(block) == batch_size:
                    yield from self.caption_block(block, options, number)
                    block, number = [], number + 1
            if block:
                yield from self.caption_block(block, options, number)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @property
    def beam_size(self) -> int:
        return self.decoding.beam_size

    @property
    def max_length(self) -> int:
        return self.decoding.max_length

    @property
    def length_penalty(self) -> float:
        return self.decoding.length_penalty

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    def reader_threads(self, requested: int | None = None) -> int:
        """Image-reading threads of :meth:`stream` (:func:`reader_threads` on the model's device)."""
        return reader_threads(self.device, requested)

    def options(self, options: CaptionOptions | None = None, **kw) -> CaptionOptions:
        """``options`` (default: the pipeline's decoding) with ``kw`` replacing its fields, checked
        (OptionError naming the field)."""
        opts = replace(options or CaptionOptions(), **kw)
        opts.check(self.beam_size)
        return opts

    def generator(self, options: CaptionOptions) -> torch.Generator | None:
        """The random source of a seeded sampling run, on the model's device; None otherwise."""
        if not options.sample or options.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(options.seed)

    def jpeg_on_device(self, jpeg_decode: str = "auto") -> bool:
        """Whether :meth:`stream` decodes JPEGs with TorchCodec on the model's device:
        ``"device"`` yes (TorchCodec must be installed), ``"cpu"`` no (PIL on the reader
        threads), ``"auto"``: yes on a GPU where TorchCodec is installed."""
        from captioner.data.jpeg import torchcodec_missing

        if jpeg_decode not in JPEG_DECODE:
            raise ValueError(f"jpeg_decode must be one of {JPEG_DECODE}, got {jpeg_decode!r}")
        if jpeg_decode == "cpu" or (jpeg_decode == "auto" and self.device.type != "cuda"):
            return False
        missing = torchcodec_missing()
        if missing and jpeg_decode == "device":
            raise ValueError(f"--jpeg-decode device: {missing}")
        return missing is None

    def read(self, path: str | os.PathLike, on_device: bool = False) -> tuple[Tensor | bytes | None, str | None]:
        """One file of a block: (the preprocessed image (3, S, S), None), with ``on_device`` a
        JPEG's bytes instead (decoded with the block on the model's device), or (None, why it
        could not be read). Safe to call from reader threads or processes."""
        from captioner.data.images import read_image
        from captioner.data.jpeg import read_jpeg

        if on_device:
            data = read_jpeg(path)
            if data is not None:
                return data, None
        return read_image(path, self.loaded.preprocessing)

    def caption_block(self, items: Sequence[tuple[Path, Tensor | bytes | None, str | None]],
                      options: CaptionOptions, number: int) -> list[list[Caption] | ImageError]:
        """One block of :meth:`stream`, as :meth:`read` gave its files, (path, data, error) ->
        per file its captions or its :class:`ImageError`, in order; ``number``: the block's place
        among the input's blocks (the seed of seeded sampling comes from it)."""
        from captioner.data.images import read_image
        from captioner.data.jpeg import decode_jpegs

        if options.sample and options.seed is not None:
            options = replace(options, seed=block_seed(options.seed, number))
        pre = self.loaded.preprocessing
        items = list(items)
        raw = [k for k, (_p, x, _e) in enumerate(items) if isinstance(x, bytes)]
        if raw:  # JPEG bytes -> decoded and preprocessed on the device; PIL for what fails there
            decoded = decode_jpegs([items[k][1] for k in raw], self.device)
            ok = [(k, im) for k, im in zip(raw, decoded) if im is not None]
            if ok:
                batch = pre.from_uint8([im for _, im in ok])  # (b, 3, S, S) on the device
                for j, (k, _im) in enumerate(ok):
                    items[k] = (items[k][0], batch[j], None)
            for k, im in zip(raw, decoded):
                if im is None:  # the header looked fine, the data did not: PIL names the problem
                    items[k] = (items[k][0], *read_image(items[k][0], pre))
        good = [x for _p, x, e in items if e is None]
        if len({x.device for x in good}) > 1:  # device-decoded JPEGs beside PIL-read images
            good = [x.to(self.device) for x in good]
        caps = iter(self._caption_tensors(torch.stack(good), options, self.generator(options)) if good else ())
        out: list[list[Caption] | ImageError] = []
        for p, _x, e in items:
            if e is not None:
                out.append(ImageError(p, e))
                continue
            mine = next(caps)
            for c in mine:
                c.image = p
            out.append(mine)
        return out

    def _decode(self, features: Tensor, options: CaptionOptions,
                generator: torch.Generator | None) -> tuple[Generated, list[list[int]]]:
        """features (B, N, D) -> the generated rows and, per image, which rows are its captions."""
        b = features.size(0)
        k = options.beam_size or self.beam_size
        cfg = replace(self.decoding, max_length=options.max_length or self.max_length)
        if options.sample:
            s = options.num_samples
            gen = sample(self.decoder, features.repeat_interleave(s, 0), cfg.max_length, options.temperature,
                         options.top_k, cfg.suppress_unk, generator=generator, top_p=options.top_p)
            return gen, [list(range(i * s, (i + 1) * s)) for i in range(b)]
        if options.n_best == 1:
            return generate(self.decoder, features, cfg, k), [[i] for i in range(b)]
        out = beam_search(self.decoder, features, k, cfg.max_length, cfg.length_penalty, cfg.suppress_unk,
                          cuda_graph=cfg.cuda_graph)
        rows = []
        for i, hyps in enumerate(out.nbest):  # distinct captions of beams that lived, best first
            seen, mine = set(), []
            for j, (toks, score) in enumerate(hyps):
                if math.isfinite(score) and tuple(toks) not in seen and len(mine) < options.n_best:
                    seen.add(tuple(toks))
                    mine.append(i * k + j)
            rows.append(mine)
        return out.beams, rows

    @torch.inference_mode()
    def _caption_tensors(self, images: Tensor, options: CaptionOptions,
                         generator: torch.Generator | None) -> list[list[Caption]]:
        """images (B, 3, S, S), already preprocessed -> per image its captions: one by default,
        the ``n_best`` best (best first) or ``num_samples`` samples (in the order drawn)."""
        model = self.loaded.model
        dev = self.device
        with autocast(dev, self.precision):
            features, (h, w) = model.encode(images.to(dev, non_blocking=True))
            gen, rows = self._decode(features, options, generator)
        # One device-to-host copy per tensor, not one per image.
        lengths, tokens, scores = gen.lengths.tolist(), gen.tokens.tolist(), gen.scores.float().tolist()
        logps = gen.token_logprobs.float().tolist()
        alphas = gen.alphas.float().cpu()  # (rows, T, N)
        out = []
        for mine in rows:
            caps = []
            for r in mine:
                n = lengths[r]
                words = self.loaded.vocab.decode(tokens[r][:n], strip=False)
                ended = n < len(tokens[r]) and tokens[r][n] == END_ID
                caps.append(Caption(words, scores[r], alphas[r, :n].reshape(n, h, w), (h, w),
                                    logps[r][: n + ended], self.loaded.tokenizer, rank=len(caps) + 1))
            out.append(caps)
        return out

    # Deprecated (issue 30): the methods before `__call__` and `stream`; one release more.
    def captions_for_tensors(self, images: Tensor, options: CaptionOptions | None = None,
                             generator: torch.Generator | None = None) -> list[list[Caption]]:
        _deprecated("captions_for_tensors", "pipeline(images, options=...)")
        options = self.options(options)
        return self._caption_tensors(images, options, generator if generator is not None else self.generator(options))

    def caption_tensors(self, images: Tensor, beam_size: int | None = None) -> list[Caption]:
        _deprecated("caption_tensors", "pipeline(images, beam_size=...)")
        return [c[0] for c in self._caption_tensors(images, self.options(beam_size=beam_size), None)]

    def captions(self, images: Iterable[Image.Image], options: CaptionOptions | None = None,
                 **kw) -> list[list[Caption]]:
        _deprecated("captions", "pipeline(images, options=...)")
        batch = torch.stack([self.loaded.preprocessing(im) for im in images])
        options = self.options(options, **kw)
        return self._caption_tensors(batch, options, self.generator(options))

    def caption_images(self, images: Iterable[Image.Image], beam_size: int | None = None) -> list[Caption]:
        _deprecated("caption_images", "pipeline(images, beam_size=...)")
        batch = torch.stack([self.loaded.preprocessing(im) for im in images])
        return [c[0] for c in self._caption_tensors(batch, self.options(beam_size=beam_size), None)]

    def generate(self, features: Tensor, beam_size: int | None = None) -> Generated:
        _deprecated("generate", "captioner.decoding.generate(pipeline.decoder, features, pipeline.decoding)")
        return generate(self.decoder, features, self.decoding, beam_size)

    def read_file(self, path: Path, on_device: bool = False) -> tuple[Tensor | bytes | None, str | None]:
        _deprecated("read_file", "pipeline.read(path)")
        return self.read(path, on_device)

    def captions_for_files(self, items, options: CaptionOptions, generator: torch.Generator | None = None
                           ) -> list[tuple[Path, list[Caption] | None, str | None]]:
        _deprecated("captions_for_files", "pipeline.stream(paths)")
        return [_as_triple(r) for r in self.caption_block(items, options, 0)]

    def captions_for_paths(self, paths: Iterable[Path], options: CaptionOptions | None = None, batch_size: int = 16,
                           num_workers: int | None = None, jpeg_decode: str = "auto",
                           ) -> Iterator[tuple[Path, list[Caption] | None, str | None]]:
        _deprecated("captions_for_paths", "pipeline.stream(paths, options)")
        for r in self.stream(paths, options, batch_size=batch_size, num_workers=num_workers,
                             jpeg_decode=jpeg_decode):
            yield _as_triple(r)

    def caption_paths(self, paths: Iterable[Path], batch_size: int = 16, beam_size: int | None = None,
                      num_workers: int | None = None, jpeg_decode: str = "auto",
                      ) -> Iterator[tuple[Path, Caption | None, str | None]]:
        _deprecated("caption_paths", "pipeline.stream(paths, beam_size=...)")
        for r in self.stream(paths, CaptionOptions(beam_size=beam_size), batch_size=batch_size,
                             num_workers=num_workers, jpeg_decode=jpeg_decode):
            path, caps, error = _as_triple(r)
            yield path, (caps[0] if caps is not None else None), error


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"CaptionPipeline.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _as_triple(result: list[Caption] | ImageError) -> tuple[Path, list[Caption] | None, str | None]:
    """A result of :meth:`CaptionPipeline.stream` as the deprecated methods gave it."""
    if isinstance(result, ImageError):
        return result.image, None, result.reason
    return result[0].image, result, None


def reader_threads(device: torch.device, requested: int | None = None) -> int:
    """Image readers (threads, or a DataLoader's processes) while a model captions on ``device``:
    as asked, else 4 on a GPU and 0 on the CPU (measured on 2 cores: readers competing with the
    model's own threads gain nothing)."""
    if requested is not None:
        return max(0, requested)
    return 4 if device.type == "cuda" else 0


def throughput(images: int, seconds: float | None, processes: int) -> str:
    """``images`` in ``seconds`` on ``processes`` as a log line says it; empty when nothing ran."""
    if seconds is None or not images:
        return ""
    return f"{images} images in {seconds:.1f} s on {processes} process(es): {images / max(seconds, 1e-9):.1f} images/s"


def block_seed(seed: int, block: int) -> int:
    """The seed of one block's sampling: from ``seed`` and the block's number, so that a block's
    captions do not depend on which process draws them, nor on what was drawn before."""
    import numpy as np

    return int(np.random.SeedSequence([seed, block]).generate_state(1)[0])


def _read_ahead(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``map(fn, items)`` in input order, with at most ``ahead`` calls running or done early."""
    window: deque[Future] = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()
