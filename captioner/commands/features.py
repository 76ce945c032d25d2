"""``captioner features extract``: run a frozen encoder once over a data set and cache its features.

Training then reads the cache (``data.feature_cache: DIR``) instead of decoding and encoding every
image every epoch. The YAML config is the one ``captioner fit`` takes: its ``data`` section gives
the data set (CaptionDataModule arguments) and ``model.encoder`` the encoder (EncoderConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def read_config(path: Path) -> tuple[dict, dict]:
    """-> (data kwargs, encoder kwargs) from a ``captioner fit`` YAML config."""
    from captioner.cli import UsageError
    from captioner.evaluation import read_config_section

    try:
        return read_config_section([path], "data"), read_config_section([path], "model", "encoder")
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None


def build(data_kwargs: dict, encoder_kwargs: dict):
    """-> (CaptionDataModule, EncoderConfig), refusing an encoder that trains."""
    from captioner.cli import UsageError
    from captioner.evaluation import build_datamodule
    from captioner.models.encoder import ENCODERS, EncoderConfig, encoder_preprocessing

    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(encoder_kwargs) - fields)
    if unknown:
        raise UsageError(f"model.encoder: unknown setting(s) {', '.join(unknown)}")
    enc = EncoderConfig(**encoder_kwargs)
    if enc.name not in ENCODERS:
        raise UsageError(f"model.encoder.name: unknown encoder {enc.name!r}; choose one of {', '.join(ENCODERS.names())}")
    if enc.name == "shapes_cnn" or enc.trainable_blocks != 0:
        why = ("shapes_cnn always trains" if enc.name == "shapes_cnn"
               else f"model.encoder.trainable_blocks is {enc.trainable_blocks}")
        raise UsageError(
            f"features can only be cached for a frozen encoder ({why}): cached features would not "
            "follow the encoder as it trains. Use a torchvision encoder with trainable_blocks: 0")
    try:  # generates shapes when absent, as `captioner fit` does
        dm = build_datamodule(data_kwargs, encoder_preprocessing(enc))
    except ValueError as err:
        raise UsageError(f"data: {err}") from None
    return dm, enc


def cmd_extract(a: argparse.Namespace) -> int:
    from captioner.cli import UsageError
    from captioner.data.features import FeatureCacheError, extract_features
    from captioner.inference import resolve_device
    from captioner.models.encoder import create_encoder

    dm, enc = build(*read_config(a.config))
    try:
        device = resolve_device(a.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    present = list(dm.records)
    splits = a.splits or [s for s in SPLITS if s in present]
    missing = [s for s in splits if s not in present]
    if missing:
        raise UsageError(f"split(s) {', '.join(missing)} not in the data set (has: {', '.join(present)})")
    records = {s: dm.split_records(s) for s in splits}
    try:
        encoder = create_encoder(enc)
    except RuntimeError as err:  # pretrained weights unavailable
        raise UsageError(str(err)) from None
    try:
        index = extract_features(
            records, encoder, a.out, dm.preprocessing, dataclasses.asdict(enc),
            batch_size=a.batch_size, shard_size=a.shard_size, device=device,
            num_workers=dm.num_workers if a.num_workers is None else a.num_workers,
            overwrite=a.overwrite,
        )
    except FeatureCacheError as err:
        raise UsageError(str(err)) from None
    summary = {k: index[k] for k in ("counts", "grid", "dim", "bytes_per_image")}
    summary["bytes"] = index["bytes_per_image"] * index["counts"]["images"]
    summary["out"] = str(a.out)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="cache region features of a frozen encoder")
    sub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND", required=True)
    e = sub.add_parser(
        "extract",
        help="encode every image of a data set once (float16, memory-mapped shards)",
        description="Run the frozen encoder of CFG (model.encoder) over the images of its data set "
        "(data) and write float16 region features to DIR. Resumable: run it again after an "
        "interruption. Then train with --data.feature_cache DIR.",
    )
    e.add_argument("--config", required=True, type=Path, help="a `captioner fit` YAML config")
    e.add_argument("--out", required=True, type=Path, help="the cache folder")
    e.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                   help="which splits (default: all of train, val, test present)")
    e.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    e.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    e.add_argument("--num-workers", type=int, default=None, help="image loading workers (default: data.num_workers)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--overwrite", action="store_true", help="replace a different cache in DIR")
    e.set_defaults(func=cmd_extract)
