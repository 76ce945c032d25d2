"""Captioning images with a loaded model (used by the CLI and the server); loading is captioner.checkpoint's."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

import captioner.checkpoint as _checkpoint
from captioner.data.tokenizers import get_tokenizer
from captioner.data.transforms import Preprocessing
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


@dataclass
class Caption:
    """One caption of an image. ``score``: the summed log-probability of its tokens (the words,
    then ``<end>`` when it was emitted), divided by ``words ** length_penalty`` where beam search
    was asked for a length penalty. ``token_logprobs``: those tokens' log-probabilities, each
    given the words before it."""

    words: list[str]
    score: float
    alphas: Tensor  # (T, h, w): one map per word
    grid: tuple[int, int]
    token_logprobs: list[float] = field(default_factory=list)
    tokenizer: str = "simple"  # how ``text`` joins the words (no spaces between Chinese characters)

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


class OptionError(ValueError):
    """A caption option out of range or not allowed with the others; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class CaptionOptions:
    """How to caption each image: the best caption of a beam search (the default), its ``n_best``
    best (distinct, best first), or ``num_samples`` drawn ones (``sample=True``: each word drawn
    from the model's distribution at ``temperature``, within its ``top_k`` words and the ``top_p``
    nucleus; ``seed`` makes the draws repeat, from a generator of their own, never the global
    random state). ``beam_size``/``max_length`` None: the pipeline's."""

    beam_size: int | None = None
    max_length: int | None = None
    n_best: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int | None = None

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

    def __call__(self, images, beam_size: int | None = None, batch_size: int = 16):
        """Caption one image or many: a path, a PIL image or a tensor -> one :class:`Caption`;
        a list of them (or a (B, 3, H, W) tensor) -> a list. uint8 tensors are images (3, H, W)
        as ``torchvision.io.decode_image`` gives them; float tensors are taken as already
        preprocessed (3, S, S), as :meth:`caption_tensors` takes them. A file that cannot be read
        raises ``ImageLoadError`` (``caption_paths`` reports such files and goes on instead)."""
        one = isinstance(images, str | os.PathLike | Image.Image) or (
            isinstance(images, Tensor) and images.dim() == 3)
        items = [images] if one else list(images)
        out: list[Caption] = []
        for i in range(0, len(items), batch_size):
            batch = torch.stack([self._pixels(x) for x in items[i:i + batch_size]])
            out += self.caption_tensors(batch, beam_size)
        return out[0] if one else out

    def _pixels(self, image) -> Tensor:
        """One image of :meth:`__call__` -> a preprocessed (3, S, S) tensor on the model's device."""
        from captioner.data.images import load_image

        pre = self.loaded.preprocessing
        if isinstance(image, str | os.PathLike):
            image = load_image(image)
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
        """Image-reading threads for ``caption_paths``: as asked, else 4 when the model runs on a
        GPU and 0 on the CPU (measured on 2 cores: reader threads competing with the model's own
        threads gain nothing)."""
        if requested is not None:
            return max(0, requested)
        return 4 if self.device.type == "cuda" else 0

    def generate(self, features: Tensor, beam_size: int | None = None) -> Generated:
        return generate(self.decoder, features, self.decoding, beam_size)

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
    def captions_for_tensors(self, images: Tensor, options: CaptionOptions | None = None,
                             generator: torch.Generator | None = None) -> list[list[Caption]]:
        """images (B, 3, S, S), already preprocessed -> per image its captions: one by default,
        the ``n_best`` best (best first) or ``num_samples`` samples (in the order drawn).
        ``generator``: the random source of sampling (default: a new one from ``options.seed``)."""
        options = options or CaptionOptions()
        options.check(self.beam_size)
        if generator is None:
            generator = self.generator(options)
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
                                    logps[r][: n + ended], self.loaded.tokenizer))
            out.append(caps)
        return out

    def caption_tensors(self, images: Tensor, beam_size: int | None = None) -> list[Caption]:
        """images (B, 3, S, S), already preprocessed -> the best caption of each."""
        return [caps[0] for caps in self.captions_for_tensors(images, CaptionOptions(beam_size=beam_size))]

    def captions(self, images: Iterable[Image.Image], options: CaptionOptions | None = None,
                 **kw) -> list[list[Caption]]:
        """PIL images -> per image a list of captions (see :meth:`captions_for_tensors`);
        ``kw``: fields of :class:`CaptionOptions`, e.g. ``n_best=3`` or ``sample=True, seed=0``."""
        pre = self.loaded.preprocessing
        batch = torch.stack([pre(im) for im in images])
        return self.captions_for_tensors(batch, self.options(options, **kw))

    def caption_images(self, images: Iterable[Image.Image], beam_size: int | None = None) -> list[Caption]:
        """PIL images -> the best caption of each."""
        return [caps[0] for caps in self.captions(images, beam_size=beam_size)]

    def jpeg_on_device(self, jpeg_decode: str = "auto") -> bool:
        """Whether ``caption_paths`` decodes JPEGs with torchvision on the model's device:
        ``"device"`` yes, ``"cpu"`` no (PIL on the reader threads), ``"auto"``: yes on a GPU."""
        if jpeg_decode not in JPEG_DECODE:
            raise ValueError(f"jpeg_decode must be one of {JPEG_DECODE}, got {jpeg_decode!r}")
        if jpeg_decode == "auto":
            return self.device.type == "cuda"
        return jpeg_decode == "device"

    def caption_paths(
        self, paths: Iterable[Path], batch_size: int = 16, beam_size: int | None = None,
        num_workers: int | None = None, jpeg_decode: str = "auto",
    ) -> Iterator[tuple[Path, Caption | None, str | None]]:
        """Streams (path, caption, None) or (path, None, error) in input order; memory stays flat.
        The best caption of each image; :meth:`captions_for_paths` for more than one."""
        for path, caps, error in self.captions_for_paths(paths, CaptionOptions(beam_size=beam_size), batch_size,
                                                         num_workers, jpeg_decode):
            yield path, (caps[0] if caps is not None else None), error

    def read_file(self, path: Path, on_device: bool = False) -> tuple[Tensor | bytes | None, str | None]:
        """One file for :meth:`captions_for_files`: (the preprocessed image (3, S, S), None), with
        ``on_device`` a JPEG's bytes instead (decoded with the batch on the model's device), or
        (None, why it could not be read)."""
        from captioner.data.jpeg import read_jpeg

        if on_device:
            data = read_jpeg(path)
            if data is not None:
                return data, None
        return _read_pil(path, self.loaded.preprocessing)

    def captions_for_files(
        self, items: list[tuple[Path, Tensor | bytes | None, str | None]], options: CaptionOptions,
        generator: torch.Generator | None = None,
    ) -> list[tuple[Path, list[Caption] | None, str | None]]:
        """What :meth:`read_file` gave for a batch of files, as (path, data, error) -> (path,
        captions, None) or (path, None, error), in order; the readable ones captioned together."""
        from captioner.data.jpeg import decode_jpegs

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
                    items[k] = (items[k][0], *_read_pil(items[k][0], pre))
        good = [x for _p, x, e in items if e is None]
        if len({x.device for x in good}) > 1:  # device-decoded JPEGs beside PIL-read images
            good = [x.to(self.device) for x in good]
        caps = iter(self.captions_for_tensors(torch.stack(good), options, generator)) if good else iter(())
        return [(p, None, e) if e is not None else (p, next(caps), None) for p, _x, e in items]

    def captions_for_paths(
        self, paths: Iterable[Path], options: CaptionOptions | None = None, batch_size: int = 16,
        num_workers: int | None = None, jpeg_decode: str = "auto",
    ) -> Iterator[tuple[Path, list[Caption] | None, str | None]]:
        """Streams (path, captions, None) or (path, None, error) in input order; memory stays flat.
        ``captions``: as :meth:`captions_for_tensors` gives them for ``options``; seeded sampling
        draws from one generator for the whole stream (the same paths and batch size, the same
        captions).

        ``num_workers`` > 0 reads and preprocesses images in that many threads (PIL decoding and
        resizing release the GIL), at most two batches ahead of the model, so reading overlaps
        the model's work: on a GPU the model is otherwise idle while JPEGs are decoded.
        ``None``: :meth:`reader_threads` chooses. ``jpeg_decode``: see :meth:`jpeg_on_device`;
        on the device path the threads only read files, and each batch's JPEGs are decoded in
        one call there (other formats, and JPEGs it cannot take, still go through PIL)."""
        on_device = self.jpeg_on_device(jpeg_decode)
        options = options or CaptionOptions()
        options.check(self.beam_size)
        generator = self.generator(options)

        def read(p: Path) -> tuple[Path, Tensor | bytes | None, str | None]:
            return (p, *self.read_file(p, on_device))

        threads = self.reader_threads(num_workers)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="captioner-read") if threads > 0 else None
        try:
            pending, good = [], 0
            for item in _read_ahead(pool, read, paths, 2 * batch_size) if pool else map(read, paths):
                pending.append(item)
                good += item[2] is None
                if good >= batch_size:
                    yield from self.captions_for_files(pending, options, generator)
                    pending, good = [], 0
            if pending:
                yield from self.captions_for_files(pending, options, generator)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def _read_pil(p: Path, pre: Preprocessing) -> tuple[Tensor | None, str | None]:
    """(preprocessed image, None) or (None, why it could not be read)."""
    from captioner.data.images import ImageLoadError, load_image

    try:
        return pre(load_image(p)), None
    except ImageLoadError as err:
        return None, err.reason
    except Exception as err:  # never let one file end the run
        return None, f"{type(err).__name__}: {err}"


def _read_ahead(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``map(fn, items)`` in input order, with at most ``ahead`` calls running or done early."""
    window: deque[Future] = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()
