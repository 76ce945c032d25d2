"""``captioner fit|validate|test``: training and validation through LightningCLI
(``captioner.commands.config``); ``captioner fit --help`` lists every setting."""

from __future__ import annotations

from collections.abc import Sequence

# name -> what `captioner --help` says of it
COMMANDS = {
    "fit": "train a model: captioner fit --config configs/shapes.yaml [--help]",
    "validate": "score a checkpoint on the validation split: --config CFG --ckpt_path CKPT",
    "test": "score a checkpoint on the test split: --config CFG --ckpt_path CKPT",
}


def run(args: Sequence[str], prog: str) -> int:
    """``captioner fit|validate|test ARGS`` (``prog`` ends with the sub-command)."""
    from captioner.commands.config import CaptionerCLI

    CaptionerCLI([prog.split()[-1], *args])
    return 0


def register(subparsers) -> None:
    for name, text in COMMANDS.items():
        subparsers.add_parser(name, help=text, add_help=False)
