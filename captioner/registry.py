"""A small name -> factory registry, the same idea as timm's `register_model`.

Besides exact names it dispatches name families by prefix (``timm/<model>``,
``open_clip/<model>:<tag>``): one factory serves every name of its family and reads the rest of
the name itself, so the decision "which code builds this name" stays here, in one place.

It lives at the package root, below every layer, so that ``captioner.data`` can register its
sources without importing ``captioner.models`` (the arrows run data -> models -> decoding -> system).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._families: dict[str, tuple[Callable[..., T], str]] = {}  # prefix -> (factory, how to name)

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def register_family(self, prefix: str, usage: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Every name ``<prefix>/...`` goes to the decorated factory; ``usage`` says how to name one
        (listed by ``captioner encoders``)."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if prefix in self._families:
                raise ValueError(f"{self.kind} family {prefix!r} is registered twice")
            self._families[prefix] = (fn, usage)
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name in self._items:
            return self._items[name]
        prefix, sep, rest = name.partition("/")
        if sep and rest and prefix in self._families:
            return self._families[prefix][0]
        families = "".join(f", {p}/..." for p in sorted(self._families))
        raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}{families}")

    def families(self) -> dict[str, str]:
        """Prefix -> how to name a member of that family."""
        return {p: usage for p, (_, usage) in sorted(self._families.items())}

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        prefix, sep, rest = name.partition("/")
        return name in self._items or bool(sep and rest and prefix in self._families)
