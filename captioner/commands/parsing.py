"""The jsonargparse parser of the commands that take ``--config``, without Lightning.

``caption`` parses its options here: ``--config`` files and flags, as ``fit`` parses its own.
Its ``trainer`` section (Lightning's ``Trainer`` arguments, for captioning on many processes) is
added only when the command line or a ``--config`` file names it, or when ``--help`` or
``--print_config`` shows it: a plain ``captioner caption`` never imports Lightning, which takes
longer to import than torch itself. ``captioner.commands.config`` builds the parser of the
commands that always need Lightning (``fit``, ``evaluate``, ``features extract``) on the same
error handling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from captioner.commands.common import UsageError
from captioner.settings import SettingError

CONFIG_HELP = "Path to a configuration file in json or yaml format."
# Options that show the trainer section without naming it.
_SHOW_ALL = ("-h", "--help", "--print_config")


class ConfigError(UsageError):
    """An argument or config setting the parser refuses (exit 2, one line)."""


def error_line(message: str, ex: BaseException | None) -> str:
    """jsonargparse's error as one line: our own check's message where one is behind it (a link's
    compute_fn, a dataclass's check), a Literal's choices as our checks say them."""
    cause = ex
    while cause is not None:
        if isinstance(cause, (SettingError, UsageError)):
            return " ".join(str(cause).split())
        cause = cause.__cause__
    text = " ".join(str(message).split())
    if ex is not None and isinstance(ex.__cause__, ValueError) and text.startswith("Call to compute_fn"):
        return " ".join(str(ex.__cause__).split())
    literal = re.match(r'Parser key "([^"]+)": .*?Literal\[(.*?)\].*?(?:Got|Given) value: (.*)$', text)
    if literal:
        key, choices, value = literal.groups()
        return str(SettingError(key, "one of " + choices, value))
    return f"{text} (--help lists the settings)"


class OptionsParser(ArgumentParser):
    """jsonargparse's errors as exceptions: the CLI prints one line instead of the full usage
    followed by the error."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        raise ConfigError(error_line(message, ex))


def config_trees(args: Sequence[str]) -> Iterator[tuple[Path, Any]]:
    """``(path, parsed YAML)`` of each ``--config`` file on a command line that can be read (one
    that cannot is the parser's to report)."""
    import yaml

    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args) or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else args[i + 1])
            try:
                yield path, yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue


def wants_trainer(args: Sequence[str]) -> bool:
    """Whether a command line sets or shows the ``trainer`` section: a ``--trainer...`` flag, a
    ``--config`` file with a ``trainer`` key, ``--help`` or ``--print_config``."""
    if any(a.startswith("--trainer") or a.split("=", 1)[0] in _SHOW_ALL for a in args):
        return True
    return any(isinstance(tree, dict) and "trainer" in tree for _, tree in config_trees(args))


def parse_options(prog: str, args: Sequence[str], add_options: Callable[[ArgumentParser], None],
                  add_trainer: Callable[[ArgumentParser], None], description: str | None = None) -> Namespace:
    """A command's own options (``add_options(parser)``), from ``--config`` files and flags; with
    the ``trainer`` section (``add_trainer(parser)``, which imports Lightning; classes in it
    instantiated) only where :func:`wants_trainer`: ``"trainer" in`` the result says which."""
    args = list(args)
    trainer = wants_trainer(args)
    parser = OptionsParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help=CONFIG_HELP)
    # A run's config sets it (and --print_config writes it), so it must parse; nothing is seeded.
    parser.add_argument("--seed_everything", type=bool | int, default=0,
                        help="the training seed of a fit config: read so that the config parses, "
                             "not used by this command")
    if trainer:
        add_trainer(parser)
    add_options(parser)
    config = parser.parse_args(args)
    if not trainer:
        return config
    # jsonargparse 4.49 renamed instantiate_classes to instantiate
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config)
