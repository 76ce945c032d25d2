"""``captioner features extract``: run a frozen encoder once over a data set and cache its features.

Training then reads the cache (``data.feature_cache: DIR``) instead of decoding and encoding every
image every epoch; ``--dtype int8`` stores it in half the disk. Runs through ``Trainer.predict``
(``captioner.predict``): ``--trainer.devices N --trainer.strategy ddp``, torchrun or SLURM share the images out, each once; a run that is
stopped is resumed by running it again. The config is parsed exactly as ``captioner fit`` parses it: its ``data`` section gives the
data set and ``model.encoder`` the encoder; ``--data.*`` / ``--model.encoder.*`` override them.
"""

from __future__ import annotations

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
    from captioner.data.features import DEFAULT_CHUNK_SIZE

    p.add_argument("--out", type=Path, required=True, help="the cache folder")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=None,
                   help="which splits (default: all of train, val, test present)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard file")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                   help="each process keeps its features every N images while it runs (what a killed "
                   "run loses)")
    add_dtype_argument(p)
    add_device_argument(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different cache in --out (the same one is resumed)")


# --dtype's names -> the cache's record (captioner.data.features.CODECS)
DTYPES = {"fp16": "float16", "int8": "int8"}


def add_dtype_argument(p) -> None:
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                   help="how the features are stored: fp16, or int8 (symmetric, a float32 scale per image "
                   "and channel; half the disk). fit reads either")


def frozen_encoder(section):
    """``model.encoder`` of a parsed config -> EncoderConfig, refusing an encoder that trains."""
    from captioner.commands.config import encoder_config
    from captioner.models.encoder import why_encoder_trains

    enc = encoder_config(section)
    try:
        why = why_encoder_trains(enc)
    except ValueError as err:
        raise UsageError(f"model.encoder.name: {err}") from None
    if why:
        raise UsageError(
            f"features can only be cached for a frozen encoder ({why}): cached features would not "
            "follow the encoder as it trains. Use a torchvision encoder with trainable_blocks: 0")
    return enc


def run(args: Sequence[str], prog: str = "captioner features extract") -> int:
    import torch

    from captioner.commands.config import ConfigCLI
    from captioner.data.features import (
        CachePlan,
        FeatureCacheError,
        FeatureChunks,
        probe,
        unique_records,
        unreadable,
    )
    from captioner.inference import resolve_device
    from captioner.models.encoder import create_encoder, encoder_fingerprint, encoder_preprocessing
    from captioner.predict import ChunkWriter, FeaturePredictor, predict, speed

    check_old_flags(args, OLD_FLAGS)
    cli = ConfigCLI(prog, list(args), add_options, description=__doc__)
    a, dm = cli.config, cli.datamodule
    enc = frozen_encoder(a.model.encoder)
    dm.preprocessing = encoder_preprocessing(enc)
    dm.feature_cache = None
    try:
        resolve_device(a.device)  # --device cuda without one: one line, before any work
        dm.source.prepare()  # generates shapes when absent, as `captioner fit` does
        present = list(dm.records)
    except (OSError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from None
    splits = a.splits or [s for s in SPLITS if s in present]
    missing = [s for s in splits if s not in present]
    if missing:
        raise UsageError(f"split(s) {', '.join(missing)} not in the data set (has: {', '.join(present)})")
    trainer = cli.prediction_trainer(a.device)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # an encoder without pretrained weights: the same on every process
            encoder = create_encoder(enc).eval()
    except RuntimeError as err:  # pretrained weights unavailable
        raise UsageError(str(err)) from None
    by_split = {s: dm.split_records(s) for s in splits}
    try:
        records = unique_records(by_split)
        # the grid and feature size come from the encoder itself (on the CPU: one image)
        grid, n, d = probe(encoder, records, dm.preprocessing, torch.device("cpu"))
        # what decides the features, weights included: a cache already in --out must match it
        plan = CachePlan(a.out, by_split, records, grid, n, d, dm.preprocessing, encoder_fingerprint(enc, encoder),
                         a.shard_size, DTYPES[a.dtype])
        fresh = bool(plan.differs())  # and --overwrite: check refuses it otherwise
        chunks = FeatureChunks(plan)
        todo = plan.todo(plan.check(a.overwrite), None if fresh else chunks)
    except FeatureCacheError as err:
        raise UsageError(str(err)) from None
    if len(todo) < len(records):
        logger.info("resuming %s: %d of %d images already extracted", a.out, len(records) - len(todo), len(records))

    def report(i: int, error: str) -> None:
        logger.warning("%s: %s", records[i].path, error)

    show = len(todo) >= 20 and sys.stderr.isatty()
    writer = ChunkWriter(chunks, a.chunk_size, len(todo), fresh=fresh, progress=show, errors=report)
    trainer.callbacks.insert(0, writer)  # before the user's: a chunk is written before they see the batch
    module = FeaturePredictor(encoder, records, dm.preprocessing, todo, a.batch_size, dm.num_workers,
                              DTYPES[a.dtype])
    try:
        index = predict(trainer, module, writer)
    except FeatureCacheError as err:
        raise UsageError(str(err)) from None
    if index is None:  # not the first process: it merges and reports
        return 0
    if took := speed(writer, len(todo), trainer.num_devices * trainer.num_nodes):
        logger.info("encoded %s", took)
    if chunks.failed:
        logger.error(unreadable(chunks.failed, records))
        return 1
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
        "(float16 or --dtype int8, memory-mapped shards; resumable): --config CFG --out DIR",
    )
