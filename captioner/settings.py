"""What a setting accepts, declared once in its type, and checked the same way everywhere.

A config field says what it accepts in its annotation: ``Literal[...]`` for a fixed set of
choices (jsonargparse rejects anything else while parsing, and ``--help`` lists them), a range
alias such as ``PositiveFloat`` (``Annotated[float, Range(gt=0)]``), or
``Annotated[str, REGISTRY]`` for a name looked up in a registry. Each config dataclass calls
``check_fields`` in ``__post_init__``, so a Python caller gets the same check as the command line;
``captioner fit`` builds every config section right after parsing (``check_arguments``), before
any data is read or model built. Every failure is a ``SettingError``:
"model.optim.lr must be > 0, got -1.0".

It lives at the package root, below every layer, like ``captioner.registry``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from captioner.registry import Registry


class SettingError(ValueError):
    """A setting outside what it accepts; ``key`` is its dotted name in a config."""

    def __init__(self, key: str, accepts: str, value: Any) -> None:
        self.key, self.accepts, self.value = key, accepts, value
        super().__init__(f"{key} must be {accepts}, got {value!r}")


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``gt``/``ge`` below, ``lt``/``le`` above (None: unbounded)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __contains__(self, value: float) -> bool:
        return not ((self.gt is not None and value <= self.gt) or (self.ge is not None and value < self.ge)
                    or (self.lt is not None and value >= self.lt) or (self.le is not None and value > self.le))

    def __str__(self) -> str:
        low = (f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None)
        high = (f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {low[1:]}"
        return f"{'<' if high[-1] == ')' else '<='} {high[:-1]}"


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
UnitInterval = Annotated[float, Range(ge=0, le=1)]  # a probability, a ratio
Fraction = Annotated[float, Range(ge=0, lt=1)]  # a dropout rate: 1 would drop everything


def _options(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); any other hint -> (hint, False)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(hint))
    return hint, False


def _registered(registry: Registry) -> str:
    """The names a registry knows now, its families as ``prefix/...``."""
    return "one of " + ", ".join([*registry.names(), *(f"{p}/..." for p in registry.families())])


def check_value(key: str, hint: Any, value: Any) -> None:
    """Raise ``SettingError`` when ``value`` is not one that ``hint`` accepts (a Literal's
    choices, an Annotated ``Range`` or ``Registry``); other hints are jsonargparse's business."""
    hint, optional = _options(hint)
    if value is None and optional:
        return
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise SettingError(key, "one of " + ", ".join(map(repr, choices)) + (", or null" if optional else ""),
                               value)
    elif get_origin(hint) is tuple and isinstance(value, tuple | list):
        items = get_args(hint)
        variadic = items[-1] is Ellipsis  # tuple[X, ...]
        if not variadic and len(items) != len(value):
            raise SettingError(key, f"{len(items)} values", value)
        for i, v in enumerate(value):
            check_value(f"{key}[{i}]", items[0] if variadic else items[i], v)
    elif get_origin(hint) is Annotated:
        for meta in hint.__metadata__:
            if isinstance(meta, Range) and isinstance(value, int | float) and value not in meta:
                raise SettingError(key, str(meta), value)
            if isinstance(meta, Registry) and isinstance(value, str) and value not in meta:
                raise SettingError(key, _registered(meta), value)


def check_fields(config: Any, section: str) -> None:
    """Every field of the dataclass ``config`` against its annotation; ``section`` is where the
    config sits in a run's config (``model.optim``), for the messages."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in dataclasses.fields(config):
        check_value(f"{section}.{f.name}", hints[f.name], getattr(config, f.name))


def check_arguments(fn: Callable, section: str, values: Mapping[str, Any]) -> None:
    """The arguments ``values`` of ``fn`` (a class's ``__init__``) against its annotations: a
    dataclass argument given as a mapping is built (its own ``__post_init__`` checks it), the
    others are checked with ``check_value``. ``section``: where they sit in a config (``data``)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    for name, value in values.items():
        hint = _options(hints.get(name))[0]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(hint)}
            hint(**{k: v for k, v in value.items() if k in names})
        elif name in hints:
            check_value(f"{section}.{name}", hints[name], value)


def is_choice(hint: Any) -> bool:
    """A ``Literal`` (or an optional one): jsonargparse lists its choices itself."""
    return get_origin(_options(hint)[0]) is Literal


def accepts(hint: Any, names: bool = False) -> str:
    """What a setting of type ``hint`` accepts, as docs/training.md and ``--help`` say it ("" when
    its type says it all). ``names``: a registry's names now, not "a registered name"."""
    hint, optional = _options(hint)
    text = ""
    if get_origin(hint) is Literal:
        text = ", ".join(f"`{c}`" for c in get_args(hint))
    elif get_origin(hint) is tuple and get_args(hint)[-1] is not Ellipsis:
        parts = [accepts(a) or getattr(a, "__name__", str(a)) for a in get_args(hint)]
        text = f"{len(parts)} values, " + (parts[0] if len(set(parts)) == 1 else "; ".join(parts))
        text += " each" if len(set(parts)) == 1 else ""
    elif get_origin(hint) is Annotated:
        for meta in hint.__metadata__:
            if isinstance(meta, Range):
                text = str(meta)
            elif isinstance(meta, Registry):
                text = _registered(meta) if names else "a registered name"
    return f"{text}, or `null`" if text and optional else text
