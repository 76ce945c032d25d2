"""The sub-commands of ``captioner``, one module each; each has ``register(subparsers)``.

Commands that take ``--config`` are parsed by the one jsonargparse parser of
``captioner.commands.config`` rather than by argparse: ``CONFIG_COMMANDS`` maps their words to
``"module:function"``, called as ``function(args, prog)`` with the arguments after the words.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

MODULES = ("train", "caption", "attend", "evaluate", "export", "serve", "features", "data", "shapes",
           "encoders")

CONFIG_COMMANDS: dict[tuple[str, ...], str] = {
    ("fit",): "train:run",
    ("validate",): "train:run",
    ("test",): "train:run",
    ("evaluate",): "evaluate:run",
    ("features", "extract"): "features:run",
    ("caption",): "caption:run",
}


def register_all(subparsers) -> None:
    for name in MODULES:
        importlib.import_module(f"captioner.commands.{name}").register(subparsers)


def config_command(argv: Sequence[str]) -> tuple[tuple[str, ...], Callable[..., int]] | None:
    """``(words, function)`` when ``argv`` starts with a config-taking command, else None."""
    for words, target in CONFIG_COMMANDS.items():
        if tuple(argv[: len(words)]) == words:
            module, function = target.split(":")
            return words, getattr(importlib.import_module(f"captioner.commands.{module}"), function)
    return None
