"""The ``captioner`` command.

``fit``, ``validate`` and ``test`` go through LightningCLI and take ``--config``
YAML files; the other sub-commands are plain argparse programs that use the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("captioner")

LIGHTNING_COMMANDS = ("fit", "validate", "test")


# -- LightningCLI ------------------------------------------------------------------------------
def _preprocessing_from_encoder(encoder):
    from captioner.models.encoder import EncoderConfig, encoder_preprocessing

    if not isinstance(encoder, EncoderConfig):  # a jsonargparse Namespace at parse time
        fields = vars(getattr(encoder, "init_args", encoder))
        encoder = EncoderConfig(**{k: v for k, v in fields.items() if not k.startswith("_")})
    return encoder_preprocessing(encoder).to_dict()  # a dict, so the saved config can hold it


def _vocab_list(vocab):
    return vocab.to_list()


def run_lightning(args: Sequence[str]) -> None:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from captioner.callbacks import PreciseBatchNorm
    from captioner.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint
    from captioner.data.datamodule import CaptionDataModule
    from captioner.system import CaptioningSystem

    class CaptionerCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.encoder", "data.preprocessing",
                                  compute_fn=_preprocessing_from_encoder, apply_on="parse")
            parser.link_arguments("data.vocab", "model.vocab", compute_fn=_vocab_list, apply_on="instantiate")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val/CIDEr", "checkpoint.mode": "max", "checkpoint.save_last": True,
                "checkpoint.filename": "best", "checkpoint.save_top_k": 1,
                "checkpoint.enable_version_counter": False,
            })
            parser.add_lightning_class_args(PeriodicCheckpoint, "last_checkpoint")
            parser.add_lightning_class_args(EarlyStopping, "early_stopping")
            parser.add_lightning_class_args(PreciseBatchNorm, "precise_bn")
            parser.set_defaults({
                "early_stopping.monitor": "val/CIDEr", "early_stopping.mode": "max",
                "early_stopping.patience": 10, "early_stopping.check_finite": False,
            })

    CaptionerCLI(
        CaptioningSystem,
        CaptionDataModule,
        args=list(args),
        seed_everything_default=0,
        # Sharding is done by the data module's EpochSampler (resumable, no repeats across ranks).
        trainer_defaults={"use_distributed_sampler": False, "plugins": [AtomicCheckpointIO()]},
        save_config_kwargs={"overwrite": True},
    )


# -- argparse sub-commands ---------------------------------------------------------------------
class UsageError(Exception):
    """Bad arguments: exit code 2, one line, no traceback."""


def cmd_shapes(a: argparse.Namespace) -> int:
    from captioner.data.shapes import ShapesConfig, generate_shapes

    cfg = ShapesConfig(num_images=a.num_images, seed=a.seed, image_size=a.image_size, compositional=a.compositional)
    out = generate_shapes(a.out, cfg)
    print(f"wrote {cfg.num_images} images to {out}")
    return 0


def cmd_data_check(a: argparse.Namespace) -> int:
    from captioner.data.check import run_data_check

    if not a.karpathy_json and not a.coco_annotations:
        raise UsageError("give --karpathy-json FILE --image-root DIR, or --coco-annotations FILE --image-root DIR")
    if not a.image_root:
        raise UsageError("--image-root DIR is required")
    report = run_data_check(
        karpathy_json=a.karpathy_json, image_root=a.image_root, coco_annotations=a.coco_annotations,
        min_count=a.min_count, restval_to_train=not a.keep_restval,
    )
    print(json.dumps(report.to_json(), indent=None if a.json else 2) if a.json else report.format_text())
    return 1 if report.problems else 0


def cmd_encoders(a: argparse.Namespace) -> int:
    from captioner.models import ATTENTIONS, ENCODERS

    print("encoders:   " + ", ".join(ENCODERS.names()))
    print("attention:  " + ", ".join(ATTENTIONS.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captioner",
        description="Image captioning with spatial attention (Show, Attend and Tell). "
        "Training: captioner fit|validate|test --config configs/shapes.yaml (see --help of each).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name}: captioner {name} --config CFG.yaml [--help]", add_help=False)

    s = sub.add_parser("shapes", help="generate the synthetic `shapes` data set")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--num-images", type=int, default=4000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--compositional", action="store_true", help="hold out colour-shape pairs for the test split")
    s.set_defaults(func=cmd_shapes)

    d = sub.add_parser("data", help="data set tools")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    c = dsub.add_parser("check", help="count images/captions and find every broken file")
    c.add_argument("--karpathy-json", type=Path)
    c.add_argument("--coco-annotations", type=Path)
    c.add_argument("--image-root", type=Path)
    c.add_argument("--min-count", type=int, default=5)
    c.add_argument("--keep-restval", action="store_true", help="report restval as its own split")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    c.set_defaults(func=cmd_data_check)

    e = sub.add_parser("encoders", help="list registered encoders and attention types")
    e.set_defaults(func=cmd_encoders)

    from captioner.commands import register_all

    register_all(sub)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        _setup_logging(False)
        run_lightning(argv)
        return 0
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    _setup_logging(a.verbose)
    try:
        return int(a.func(a) or 0)
    except UsageError as err:
        print(f"captioner: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
