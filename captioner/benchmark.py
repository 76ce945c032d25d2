"""Speed and memory benchmarks with random weights (``scripts/benchmark.py``).

Each measurement is a function returning a JSON-ready dict:

* :func:`bench_decoder` - decoder training throughput (teacher forcing + cross-entropy + doubly
  stochastic loss + backward + Adam step), batched beam search and greedy decoding, on random
  region features.
* :func:`bench_caption` - the encoder alone against the whole ``captioner caption`` path (read,
  preprocess, encode, beam search) on generated JPEG files.
* :func:`bench_memory` - resident memory while captioning many small images in a stream.
* :func:`bench_encoder` - an encoder's training step with ``stem: rgb`` against ``stem: split``.

Figures are medians over ``repeats`` timed runs after one warm-up run. Nothing here needs data or
pretrained weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from captioner.data.vocab import END_ID, SPECIALS, START_ID, Vocabulary
from captioner.decoding import beam_search, greedy, sample
from captioner.inference import JPEG_DECODE, autocast
from captioner.models import (
    ATTENTIONS,
    AttentionDecoder,
    Captioner,
    DecoderConfig,
    EncoderConfig,
    create_encoder,
)
from captioner.models.quantize import QUANTIZE, quantize_decoder
from captioner.system import LossConfig, caption_loss

logger = logging.getLogger(__name__)


# -- helpers -----------------------------------------------------------------------------------
def machine_info(device: str | torch.device = "cpu") -> dict:
    """What the figures were measured on."""
    dev = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


def current_rss_mb() -> float:
    """Resident set size now (MB); the peak where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    return statistics.median(_time_alternating((fn,), repeats, device)[0])


def _time_alternating(fns: Sequence[Callable[[], object]], repeats: int, device: torch.device) -> list[list[float]]:
    """Wall seconds of each of ``fns`` per round, the functions taking turns within each of
    ``repeats`` rounds, after one warm-up run of each."""
    for fn in fns:
        fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return times


def random_vocab(size: int) -> Vocabulary:
    return Vocabulary([*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))])


def random_captions(batch: int, length: int, vocab: int, generator: torch.Generator) -> tuple:
    """``<start> w.. <end>`` captions of exactly ``length`` tokens: (B, L) ids and (B,) lengths."""
    caps = torch.randint(len(SPECIALS), vocab, (batch, length), generator=generator)
    caps[:, 0] = START_ID
    caps[:, -1] = END_ID
    return caps, torch.full((batch,), length, dtype=torch.long)


# -- decoder -----------------------------------------------------------------------------------
def bench_decoder(
    encoder_dim: int = 2048,
    grid: int = 14,
    vocab: int = 10000,
    batch: int = 32,
    embed_dim: int = 512,
    attention_dim: int = 512,
    decoder_dim: int = 512,
    caption_length: int = 22,
    beam_size: int = 5,
    max_steps: int = 20,
    attention: str = "soft",
    repeats: int = 3,
    device: str = "cpu",
    compile: bool = False,
    parts: Sequence[str] = ("train", "beam", "greedy"),
    precision: str = "fp32",
    quantize: str = "none",
    cuda_graph: bool | None = None,
) -> dict:
    """Decoder training step, beam search and greedy decoding at the given shapes;
    ``precision="bf16"`` runs them under bf16 autocast (as ``--trainer.precision bf16-mixed`` does);
    ``quantize="int8"`` decodes with int8 weights (training is unchanged); ``cuda_graph=False``
    keeps beam search on a GPU from replaying its step as a CUDA graph."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = DecoderConfig(attention=attention, embed_dim=embed_dim, attention_dim=attention_dim,
                        decoder_dim=decoder_dim)
    decoder = AttentionDecoder(cfg, vocab, encoder_dim).to(dev)
    features = torch.randn(batch, grid * grid, encoder_dim, generator=g).to(dev)  # (B, N, D)
    captions, lengths = (t.to(dev) for t in random_captions(batch, caption_length, vocab, g))
    forward = torch.compile(decoder) if compile else decoder
    result: dict = {}

    if "train" in parts:
        opt = torch.optim.Adam(decoder.parameters(), lr=4e-4)
        decoder.train()

        def train_step() -> None:
            with autocast(dev, precision):
                # the loss of CaptioningSystem with its defaults (lambda = 1)
                loss = caption_loss(forward(features, captions, lengths), captions, LossConfig()).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        secs = _time(train_step, repeats, dev)
        result.update(train_s_per_step=secs, train_captions_per_s=batch / secs)
        del opt

    decoder.eval()
    if compile:  # decoding calls decoder.step once per word
        decoder.step = torch.compile(decoder.step)
    decoding = quantize_decoder(decoder, quantize)
    if "beam" in parts:
        with torch.inference_mode(), autocast(dev, precision):
            secs = _time(lambda: beam_search(decoding, features, beam_size, max_steps, early_stop=False,
                                             cuda_graph=cuda_graph),
                         repeats, dev)
        result.update(beam_ms_per_image=1000 * secs / batch, beam_images_per_s=batch / secs)
    if "greedy" in parts:
        with torch.inference_mode(), autocast(dev, precision):
            secs = _time(lambda: greedy(decoding, features, max_steps, early_stop=False, cuda_graph=cuda_graph),
                         repeats, dev)
        result.update(greedy_ms_per_image=1000 * secs / batch, greedy_images_per_s=batch / secs)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# -- scst: the reward against a whole self-critical step ---------------------------------------
def bench_scst(
    batch: int = 64,
    samples: int = 5,
    max_length: int = 16,
    vocab: int = 10000,
    grid: int = 14,
    decoder_dim: int = 512,
    references: int = 5,
    reference_length: int = 11,
    attention: str = "soft",
    baseline: str = "mean",
    repeats: int = 3,
) -> dict:
    """One SCST training step (sampling ``batch`` x ``samples`` captions, their CIDEr-D reward,
    the teacher-forced re-scoring, backward and Adam's step) with random weights on random
    features (ResNet-101's 2048 channels), against the reward alone and against one
    cross-entropy step on the same batch (CPU). The references are
    random words of the vocabulary; ``reward_cold_s`` includes caching their vectors, which
    training does once per image."""
    import random

    from captioner.metrics.cider import CiderD
    from captioner.system import CaptioningSystem, ScstConfig

    torch.manual_seed(0)
    words = random_vocab(vocab)
    system = CaptioningSystem(
        EncoderConfig(name="resnet101", grid=grid),
        DecoderConfig(attention=attention, embed_dim=decoder_dim, attention_dim=decoder_dim, decoder_dim=decoder_dim),
        vocab=words.to_list(),
        scst=ScstConfig(enabled=True, n_samples=samples, baseline=baseline, max_length=max_length),
    )
    system.train()
    rng = random.Random(0)
    pool = words.to_list()[len(SPECIALS):]
    refs = {i: [" ".join(rng.choices(pool[:1000], k=reference_length)) for _ in range(references)]
            for i in range(batch)}
    system._cider = CiderD(refs)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, grid * grid, 2048, generator=g)
    captions, lengths = random_captions(batch, reference_length + 2, vocab, g)
    data = {"features": features, "captions": captions, "lengths": lengths, "image_ids": torch.arange(batch)}
    opt = torch.optim.Adam(system.model.decoder.parameters(), lr=5e-5)

    def step(loss_fn=system.scst_loss) -> None:
        loss = loss_fn(data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        tokens = sample(system.model.decoder, features.repeat_interleave(samples, 0), max_length).tokens
    ids = [i for i in range(batch) for _ in range(samples)]
    start = time.perf_counter()
    system.rewards(tokens, ids)
    cold = time.perf_counter() - start
    step_s = _time(step, repeats, torch.device("cpu"))
    # the cross-entropy step it replaces: one teacher-forced pass over the batch's references
    ce_step_s = _time(lambda: step(system.compute_loss), repeats, torch.device("cpu"))
    reward_s = _time(lambda: system.rewards(tokens, ids), repeats, torch.device("cpu"))
    return {"scst_step_s": step_s, "ce_step_s": ce_step_s, "scst_over_ce": step_s / ce_step_s,
            "reward_s": reward_s, "reward_cold_s": cold,
            "reward_share_of_step": reward_s / step_s, "captions_per_step": batch * samples,
            "mean_sample_words": float((tokens > END_ID).sum(1).float().mean()), "peak_rss_mb": peak_rss_mb()}


# -- caption: encoder alone vs the whole path --------------------------------------------------
def random_model(
    encoder: str = "resnet101",
    image_size: int = 256,
    vocab: int = 10000,
    decoder_dim: int = 512,
    grid: int | None = None,
    channels: int = 128,
    device: str = "cpu",
):
    """A ``LoadedModel`` with random weights, as ``load_checkpoint`` would return it."""
    from captioner.inference import LoadedModel

    torch.manual_seed(0)
    enc = EncoderConfig(name=encoder, image_size=image_size, grid=grid or 14, channels=channels)
    dec = DecoderConfig(embed_dim=decoder_dim, attention_dim=decoder_dim, decoder_dim=decoder_dim)
    words = random_vocab(vocab)
    model = Captioner(enc, dec, len(words)).eval().to(device)
    hparams = {"decoding": {"beam_size": 1, "max_length": 20}}
    return LoadedModel(model, words, model.preprocessing, hparams, Path("<random weights>"))


def write_images(folder: Path, count: int, size: tuple[int, int] = (640, 480), fmt: str = "JPEG",
                 seed: int = 0) -> list[Path]:
    """``count`` photo-like images (smooth colour fields plus noise), COCO-sized by default."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(pixels).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def bench_caption(
    encoder: str = "resnet101",
    image_size: int = 256,
    beam_size: int = 5,
    images: int = 32,
    batch_size: int = 16,
    max_length: int = 20,
    vocab: int = 10000,
    decoder_dim: int = 512,
    source_size: tuple[int, int] = (640, 480),
    repeats: int = 3,
    device: str = "cpu",
    precision: str = "fp32",
    num_workers: int | None = None,
    jpeg_decode: str = "auto",
    quantize: str = "none",
    cuda_graph: bool | None = None,
) -> dict:
    """Per image: the encoder's forward pass alone vs ``CaptionPipeline.stream`` (read +
    preprocess + encode + beam search), on ``images`` generated JPEG files."""
    from captioner.inference import CaptionPipeline

    dev = torch.device(device)
    loaded = random_model(encoder, image_size, vocab, decoder_dim, device=device)
    pipeline = CaptionPipeline(loaded, beam_size=beam_size, max_length=max_length, precision=precision,
                               quantize=quantize, cuda_graph=cuda_graph)
    threads = pipeline.reader_threads(num_workers)  # as `captioner caption` chooses them
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        paths = write_images(Path(tmp), images, source_size)
        model = loaded.model
        batches = [torch.randn(min(batch_size, images - i), 3, image_size, image_size)
                   for i in range(0, images, batch_size)]

        @torch.inference_mode()
        def encode_only() -> None:
            with autocast(dev, precision):
                for x in batches:
                    model.encode(x.to(dev))

        def whole_path() -> None:
            for result in pipeline.stream(paths, batch_size=batch_size, num_workers=threads, jpeg_decode=jpeg_decode):
                assert isinstance(result, list), result

        # Alternated, so that a machine that slows down or speeds up during the run moves both
        # timings alike: the ratio is the median of the per-round ratios.
        enc, cap = _time_alternating((encode_only, whole_path), repeats, dev)
    enc_s, cap_s = statistics.median(enc), statistics.median(cap)
    return {
        "encoder_ms_per_image": 1000 * enc_s / images,
        "caption_ms_per_image": 1000 * cap_s / images,
        "ratio": statistics.median(c / e for e, c in zip(enc, cap, strict=True)),
        "reader_threads": threads,
        "jpeg_on_device": pipeline.jpeg_on_device(jpeg_decode),
        "peak_rss_mb": peak_rss_mb(),
    }


# -- memory: streaming -------------------------------------------------------------------------
def bench_memory(images: int = 1000, checkpoints: Sequence[int] = (100, 500, 1000), batch_size: int = 16,
                 image_size: int = 32) -> dict:
    """Resident memory while ``CaptionPipeline.stream`` takes ``images`` small images through a tiny
    random model; sampled after the given numbers of images. Flat figures mean streaming."""
    from captioner.inference import CaptionPipeline

    loaded = random_model("shapes_cnn", image_size, vocab=50, decoder_dim=32, grid=4, channels=16)
    pipeline = CaptionPipeline(loaded, beam_size=3, max_length=12)
    marks = sorted({min(c, images) for c in checkpoints})
    rss, peak = {}, {}
    with tempfile.TemporaryDirectory(prefix="captioner-mem-") as tmp:
        paths = write_images(Path(tmp), images, (image_size, image_size), fmt="PNG")
        stream = pipeline.stream(iter(paths), batch_size=batch_size)
        for done, result in enumerate(stream, start=1):
            assert isinstance(result, list), result
            if done in marks:
                rss[str(done)] = round(current_rss_mb(), 1)
                peak[str(done)] = round(peak_rss_mb(), 1)
    first, last = str(marks[0]), str(marks[-1])
    return {"images": images, "rss_mb": rss, "peak_rss_mb": peak,
            "peak_growth_mb": round(peak[last] - peak[first], 1)}


# -- encoder: the split stem's cost ------------------------------------------------------------
def bench_encoder(encoder: str = "shapes_cnn", image_size: int = 64, grid: int = 8, channels: int = 64,
                  batch: int = 64, trainable_blocks: int = -1, repeats: int = 5, device: str = "cpu") -> dict:
    """An encoder's training step (forward and backward; only the forward when nothing in it
    trains) with ``stem: rgb`` against ``stem: split``, the two taking turns: ms per batch and
    the median of the rounds' ratios."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(dev)  # (B, 3, S, S)
    steps = []
    for stem in ("rgb", "split"):
        torch.manual_seed(0)
        enc = create_encoder(EncoderConfig(name=encoder, image_size=image_size, grid=grid, channels=channels,
                                           trainable_blocks=trainable_blocks, stem=stem)).to(dev).train()

        def step(enc=enc) -> None:
            regions, _ = enc(images)  # (B, N, D)
            if regions.requires_grad:
                regions.square().mean().backward()

        steps.append(step)
    rgb, split = _time_alternating(steps, repeats, dev)
    return {"rgb_ms_per_batch": 1000 * statistics.median(rgb), "split_ms_per_batch": 1000 * statistics.median(split),
            "split_over_rgb": statistics.median(s / r for r, s in zip(rgb, split, strict=True))}


# -- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                       help="torch intra-op threads (default: torch's)")
        q.add_argument("--json", action="store_true", help="one JSON object on stdout")

    def decoding_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--quantize", default="none", choices=QUANTIZE, help="int8: decode with int8 weights (CPU)")
        q.add_argument("--cuda-graph", default="auto", choices=("auto", "off"),
                       help="beam search on a GPU: replay its step as a CUDA graph (auto) or not")

    d = sub.add_parser("decoder", help="decoder training step, beam search and greedy decoding")
    common(d)
    d.add_argument("--encoder-dim", type=int, default=2048)
    d.add_argument("--grid", type=int, default=14)
    d.add_argument("--vocab", type=int, default=10000)
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--embed-dim", type=int, default=512)
    d.add_argument("--attention-dim", type=int, default=512)
    d.add_argument("--decoder-dim", type=int, default=512)
    d.add_argument("--caption-length", type=int, default=22, help="tokens per caption, <start>/<end> included")
    d.add_argument("--beam-size", type=int, default=5)
    d.add_argument("--max-steps", type=int, default=20, help="decoding steps (always all of them)")
    d.add_argument("--attention", default="soft", choices=ATTENTIONS.names())
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    d.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    d.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast")
    decoding_options(d)
    d.add_argument("--only", nargs="+", choices=("train", "beam", "greedy"), default=None,
                   help="run only these parts")

    c = sub.add_parser("caption", help="encoder alone vs the whole `captioner caption` path")
    common(c)
    c.add_argument("--encoder", default="resnet101")
    c.add_argument("--image-size", type=int, default=256)
    c.add_argument("--beam-size", type=int, default=5)
    c.add_argument("--max-length", type=int, default=20)
    c.add_argument("--images", type=int, default=32)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--vocab", type=int, default=10000)
    c.add_argument("--decoder-dim", type=int, default=512)
    c.add_argument("--source-size", default="640x480", help="WxH of the generated JPEG files")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    c.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    c.add_argument("--num-workers", type=int, default=None,
                   help="image-reading threads (default: as `captioner caption`, 0 on CPU, 4 on GPU)")
    decoding_options(c)
    c.add_argument("--jpeg-decode", default="auto", choices=JPEG_DECODE,
                   help="as `captioner caption --jpeg-decode` (auto: on the device when it is a GPU)")

    r = sub.add_parser("scst", help="the CIDEr-D reward against a whole self-critical training step (CPU)")
    common(r)
    r.add_argument("--batch", type=int, default=64, help="images per step")
    r.add_argument("--samples", type=int, default=5, help="sampled captions per image")
    r.add_argument("--max-length", type=int, default=16, help="most words per sample")
    r.add_argument("--vocab", type=int, default=10000)
    r.add_argument("--grid", type=int, default=14)
    r.add_argument("--decoder-dim", type=int, default=512)
    r.add_argument("--attention", default="soft", choices=ATTENTIONS.names())
    r.add_argument("--baseline", default="mean", choices=("mean", "greedy"))
    r.add_argument("--repeats", type=int, default=3)
    e = sub.add_parser("encoder", help="an encoder's training step with stem: rgb against stem: split")
    common(e)
    e.add_argument("--encoder", default="shapes_cnn")
    e.add_argument("--image-size", type=int, default=64)
    e.add_argument("--grid", type=int, default=8)
    e.add_argument("--channels", type=int, default=64, help="shapes_cnn width")
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--trainable-blocks", type=int, default=-1, help="as model.encoder.trainable_blocks")
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    m = sub.add_parser("memory", help="resident memory while captioning many images in a stream")
    common(m)
    m.add_argument("--images", type=int, default=1000)
    m.add_argument("--batch-size", type=int, default=16)
    return p


def _graph(choice: str) -> bool | None:
    return None if choice == "auto" else False


def run(a: argparse.Namespace) -> dict:
    if a.bench == "decoder":
        figures = bench_decoder(
            a.encoder_dim, a.grid, a.vocab, a.batch, a.embed_dim, a.attention_dim, a.decoder_dim,
            a.caption_length, a.beam_size, a.max_steps, a.attention, a.repeats, a.device, a.compile,
            a.only or ("train", "beam", "greedy"), a.precision, a.quantize, _graph(a.cuda_graph),
        )
    elif a.bench == "caption":
        w, _, h = a.source_size.partition("x")
        figures = bench_caption(a.encoder, a.image_size, a.beam_size, a.images, a.batch_size, a.max_length,
                                a.vocab, a.decoder_dim, (int(w), int(h)), a.repeats, a.device, a.precision, a.num_workers,
                                a.jpeg_decode, a.quantize, _graph(a.cuda_graph))
    elif a.bench == "scst":
        figures = bench_scst(a.batch, a.samples, a.max_length, a.vocab, a.grid, a.decoder_dim,
                             attention=a.attention, baseline=a.baseline, repeats=a.repeats)
    elif a.bench == "encoder":
        figures = bench_encoder(a.encoder, a.image_size, a.grid, a.channels, a.batch, a.trainable_blocks,
                                a.repeats, a.device)
    else:
        marks = [c for c in (100, 500, 1000) if c < a.images] + [a.images]
        figures = bench_memory(a.images, marks, a.batch_size)
    settings = {k: v for k, v in vars(a).items() if k not in ("json", "bench")}
    return {"benchmark": a.bench, "machine": machine_info(getattr(a, "device", "cpu")),
            "settings": settings, **figures}


def _format(report: dict) -> str:
    m = report["machine"]
    lines = [f"{report['benchmark']}: torch {m['torch']}, {m['threads']} threads, {m['device']}"
             f" ({m.get('gpu') or m['cpu']})"]
    for key, value in report.items():
        if key in ("benchmark", "machine", "settings"):
            continue
        lines.append(f"  {key:24s} {round(value, 2) if isinstance(value, float) else value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        print("benchmark.py: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    report = run(a)
    print(json.dumps(report) if a.json else _format(report))
    return 0
