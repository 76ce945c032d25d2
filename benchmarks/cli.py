"""The command line of the benchmarks: ``python scripts/benchmark.py BENCHMARK [options]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.caption import bench_caption
from benchmarks.common import machine_info
from benchmarks.data import bench_data
from benchmarks.dct_quality import caption_agreement, feature_difference
from benchmarks.decode import bench_decode
from benchmarks.decoder import PARTS, bench_decoder
from benchmarks.encoder import bench_encoder
from benchmarks.epoch import bench_epoch
from benchmarks.memory import bench_memory
from benchmarks.merge import bench_merge
from benchmarks.scst import bench_scst
from benchmarks.startup import bench_startup
from benchmarks.step import VARIANTS, bench_step
from captioner.inference import JPEG_DECODE
from captioner.models import ATTENTIONS
from captioner.models.quantize import QUANTIZE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py",
                                description="Speed and memory benchmarks with random weights (``scripts/benchmark.py``).")
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
    d.add_argument("--optimizer", default="adam", choices=("adam", "muon"), help="the training step's (model.optim.optimizer)")
    decoding_options(d)
    d.add_argument("--only", nargs="+", choices=PARTS, default=None, help="run only these parts")

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
    t = sub.add_parser("epoch", help="time per COCO epoch of `fit` on a synthetic split, from the cache or JPEGs")
    common(t)
    t.add_argument("--source", default="cache", choices=("cache", "jpeg"),
                   help="cache: features extract first, then fit from the cache; jpeg: fit from the files")
    t.add_argument("--images", type=int, default=2048, help="training images of the synthetic split")
    t.add_argument("--distinct", type=int, default=256, help="JPEG files written (linked under every name)")
    t.add_argument("--warmup", type=int, default=10, help="optimiser steps before the clock starts")
    t.add_argument("--steps", type=int, default=50, help="optimiser steps timed")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--num-workers", type=int, default=8, help="data loader processes")
    t.add_argument("--encoder", default="resnet101")
    t.add_argument("--image-size", type=int, default=256)
    t.add_argument("--source-size", default="640x480", help="WxH of the generated JPEG files")
    t.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    i = sub.add_parser("decode", help="CPU image decoding: PIL against TorchCodec, whole JPEGs against DCT-scaled")
    common(i)
    i.add_argument("--files", type=int, default=8, help="JPEG files per size")
    i.add_argument("--shapes", type=int, default=64, help="shapes PNGs (64 px)")
    i.add_argument("--jpeg-sizes", nargs="+", default=["640x480", "1600x1200", "4000x3000"], metavar="WxH")
    i.add_argument("--image-size", type=int, default=256, help="the resize after decoding (the encoder's input)")
    i.add_argument("--repeats", type=int, default=5, help="rounds, the ways of decoding taking turns in each")
    q = sub.add_parser("dct-quality", help="ResNet features and shapes captions, JPEGs decoded whole vs DCT-scaled")
    common(q)
    q.add_argument("--encoder", default="resnet50", help="torchvision encoder for the feature difference (random weights)")
    q.add_argument("--image-size", type=int, default=256)
    q.add_argument("--photos", type=int, default=8, help="generated photos for the feature difference")
    q.add_argument("--photo-size", default="4000x3000", metavar="WxH")
    q.add_argument("--checkpoint", default=None, help="a shapes checkpoint: also compare its greedy captions")
    q.add_argument("--shapes-dir", default="data/shapes", help="the shapes data set whose test images are captioned")
    q.add_argument("--images", type=int, default=400, help="test images captioned")
    s = sub.add_parser("startup", help="time to the first caption of `captioner caption` and the Python API, "
                       "each a fresh process (needs a checkpoint)")
    common(s)
    s.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt or model folder to caption with")
    s.add_argument("--image", type=Path, default=None, help="the image to caption (default: a generated 64x64 PNG)")
    s.add_argument("--baseline-root", type=Path, default=None, metavar="DIR",
                   help="a checkout of the code to compare with (its captioner/ is imported from DIR)")
    s.add_argument("--repeats", type=int, default=5)
    t = sub.add_parser("step", help="a whole training step (configs/shapes.yaml's model): speed settings taking turns")
    common(t)
    t.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                   help="fp32 is the yardstick of the ratios")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--grid", type=int, default=8)
    t.add_argument("--channels", type=int, default=64, help="shapes_cnn width")
    t.add_argument("--decoder-dim", type=int, default=256)
    t.add_argument("--attention", default="soft", choices=ATTENTIONS.names())
    t.add_argument("--repeats", type=int, default=5)
    b = sub.add_parser("data", help="training batches of shapes: read per batch against data.in_memory")
    common(b)
    b.add_argument("--data-dir", default="data/shapes", help="a shapes data set (captioner shapes --out DIR)")
    b.add_argument("--image-size", type=int, default=64)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--repeats", type=int, default=20)
    m = sub.add_parser("memory", help="resident memory while captioning many images in a stream")
    common(m)
    m.add_argument("--images", type=int, default=1000)
    m.add_argument("--batch-size", type=int, default=16)
    g = sub.add_parser("merge", help="peak memory of the merge of many processes' captions, per number of rows")
    common(g)
    g.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    g.add_argument("--world", type=int, default=8, help="processes that wrote the chunks")
    g.add_argument("--block", type=int, default=16, help="images per block (--batch-size)")
    g.add_argument("--chunk", type=int, default=256, help="images per chunk (--chunk-size)")
    return p


def _graph(choice: str) -> bool | None:
    return None if choice == "auto" else False


def run(a: argparse.Namespace) -> dict:
    if a.bench == "decoder":
        figures = bench_decoder(
            encoder_dim=a.encoder_dim, grid=a.grid, vocab=a.vocab, batch=a.batch, embed_dim=a.embed_dim,
            attention_dim=a.attention_dim, decoder_dim=a.decoder_dim, caption_length=a.caption_length,
            beam_size=a.beam_size, max_steps=a.max_steps, attention=a.attention, repeats=a.repeats,
            device=a.device, compile=a.compile, parts=a.only or PARTS, precision=a.precision,
            quantize=a.quantize, cuda_graph=_graph(a.cuda_graph), optimizer=a.optimizer,
        )
    elif a.bench == "caption":
        w, _, h = a.source_size.partition("x")
        figures = bench_caption(
            encoder=a.encoder, image_size=a.image_size, beam_size=a.beam_size, images=a.images,
            batch_size=a.batch_size, max_length=a.max_length, vocab=a.vocab, decoder_dim=a.decoder_dim,
            source_size=(int(w), int(h)), repeats=a.repeats, device=a.device, precision=a.precision,
            num_workers=a.num_workers, jpeg_decode=a.jpeg_decode, quantize=a.quantize,
            cuda_graph=_graph(a.cuda_graph),
        )
    elif a.bench == "scst":
        figures = bench_scst(batch=a.batch, samples=a.samples, max_length=a.max_length, vocab=a.vocab, grid=a.grid,
                             decoder_dim=a.decoder_dim, attention=a.attention, baseline=a.baseline,
                             repeats=a.repeats)
    elif a.bench == "encoder":
        figures = bench_encoder(encoder=a.encoder, image_size=a.image_size, grid=a.grid, channels=a.channels,
                                batch=a.batch, trainable_blocks=a.trainable_blocks, repeats=a.repeats,
                                device=a.device)
    elif a.bench == "epoch":
        w, _, h = a.source_size.partition("x")
        figures = bench_epoch(source=a.source, images=a.images, distinct=a.distinct, warmup=a.warmup, steps=a.steps,
                              batch_size=a.batch_size, num_workers=a.num_workers, device=a.device,
                              encoder=a.encoder, image_size=a.image_size, source_size=(int(w), int(h)))
    elif a.bench == "decode":
        sizes = [tuple(int(v) for v in s.split("x")) for s in a.jpeg_sizes]
        figures = bench_decode(files=a.files, shapes=a.shapes, repeats=a.repeats, image_size=a.image_size,
                               jpeg_sizes=sizes)
    elif a.bench == "dct-quality":
        size = tuple(int(v) for v in a.photo_size.split("x"))
        figures = {"features": feature_difference(encoder=a.encoder, image_size=a.image_size, photos=a.photos,
                                                  size=size)}
        if a.checkpoint:
            figures["captions"] = caption_agreement(a.checkpoint, a.shapes_dir, images=a.images, size=size)
    elif a.bench == "merge":
        figures = bench_merge(rows=a.rows, world=a.world, block=a.block, chunk=a.chunk)
    elif a.bench == "startup":
        figures = bench_startup(checkpoint=a.checkpoint, image=a.image, baseline_root=a.baseline_root,
                                repeats=a.repeats, threads=getattr(a, "threads", None))
    elif a.bench == "data":
        figures = bench_data(data_dir=a.data_dir, image_size=a.image_size, batch=a.batch, repeats=a.repeats)
    elif a.bench == "step":
        figures = bench_step(variants=tuple(a.variants), batch=a.batch, image_size=a.image_size, grid=a.grid,
                             channels=a.channels, decoder_dim=a.decoder_dim, attention=a.attention,
                             repeats=a.repeats)
    else:
        marks = [c for c in (100, 500, 1000) if c < a.images] + [a.images]
        figures = bench_memory(images=a.images, checkpoints=marks, batch_size=a.batch_size)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k not in ("json", "bench")}
    return {"benchmark": a.bench, "machine": machine_info(getattr(a, "device", "cpu")),
            "settings": settings, **figures}


def format_report(report: dict) -> str:
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
    print(json.dumps(report) if a.json else format_report(report))
    return 0
