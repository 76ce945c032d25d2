"""argparse sub-commands of ``captioner`` beyond training; each module has ``register(subparsers)``."""

from __future__ import annotations

import importlib

# Each name is a module of this package with a ``register(subparsers)`` function.
MODULES = ("caption", "attend", "evaluate", "features", "serve")


def register_all(subparsers) -> None:
    for name in MODULES:
        importlib.import_module(f"captioner.commands.{name}").register(subparsers)
