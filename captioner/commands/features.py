"""``captioner features extract``: run a frozen encoder once over a data set and cache its features.

Training then reads the cache (``data.feature_cache: DIR``) instead of decoding and encoding every
image every epoch. The config is parsed exactly as ``captioner fit`` parses it: its ``data`` section gives the
data set and ``model.encoder`` the encoder; ``--data.*`` / ``--model.encoder.*`` override them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner.commands.common import UsageError, add_device_argument, check_old_flags, positive_int

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
OLD_FLAGS = {"--num-workers": "--data.num_workers"}


def add_options(p) -> None:
    """The options of ``features extract`` beside the config's sections."""
    p.add_argument("--out", type=Path, required=True, help="the cache folder")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                   help="which splits (default: all of train, val, test present)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard file")
    add_device_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")


def frozen_encoder(section):
    """``model.encoder`` of a parsed config -> EncoderConfig, refusing an encoder that trains."""
    from captioner.commands.config import encoder_config
    from captioner.models.encoder import encoder_trains

    enc = encoder_config(section)
    try:
        trains = encoder_trains(enc)
    except ValueError as err:
        raise UsageError(f"model.encoder.name: {err}") from None
    if trains:
        why = (f"model.encoder.trainable_blocks is {enc.trainable_blocks}" if enc.trainable_blocks
               else f"{enc.name} always trains")
        raise UsageError(
            f"features can only be cached for a frozen encoder ({why}): cached features would not "
            "follow the encoder as it trains. Use a torchvision encoder with trainable_blocks: 0")
    return enc


def run(args: Sequence[str], prog: str = "captioner features extract") -> int:
    from captioner.commands.config import ConfigCLI
    from captioner.data.features import FeatureCacheError, extract_features
    from captioner.inference import resolve_device
    from captioner.models.encoder import create_encoder, encoder_preprocessing

    check_old_flags(args, OLD_FLAGS)
    cli = ConfigCLI(prog, list(args), add_options, description=__doc__)
    a, dm = cli.config, cli.datamodule
    enc = frozen_encoder(a.model.encoder)
    dm.preprocessing = encoder_preprocessing(enc)
    dm.feature_cache = None
    try:
        device = resolve_device(a.device)
        dm.source.prepare()  # generates shapes when absent, as `captioner fit` does
        present = list(dm.records)
    except (OSError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from None
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
            num_workers=dm.num_workers, overwrite=a.overwrite,
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
    sub.add_parser(
        "extract", add_help=False,
        help="encode every image of a config's data set once with its frozen model.encoder "
        "(float16, memory-mapped shards; resumable): --config CFG --out DIR",
    )
