"""A small name -> factory registry in the style of timm, shared by backbones and models.

Plain names (``fer-minixception``) map to a factory; prefixed families (``hf:<hub-id>``) pass the
part after the colon to the factory. Modules register themselves on import; the registry imports its
built-in modules lazily on first use, so ``import mtaffect`` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin_modules: Sequence[str] = ()) -> None:
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._factories: dict[str, Callable[..., T]] = {}
        self._prefixes: dict[str, Callable[..., T]] = {}
        self._loaded = False

    def register(self, name: str, *, prefix: bool = False) -> Callable:
        """Decorator: register a factory under ``name`` (or the family ``name:<...>`` when ``prefix``)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            table = self._prefixes if prefix else self._factories
            if name in table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            table[name] = factory
            return factory

        return deco

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtin_modules:
                importlib.import_module(mod)

    def names(self) -> list[str]:
        """Registered names; prefixed families are listed as ``prefix:<...>``."""
        self._load_builtins()
        return sorted(self._factories) + sorted(f"{p}:<...>" for p in self._prefixes)

    def factory(self, name: str) -> Callable[..., T]:
        """The factory ``create(name)`` would call (prefixed families: the family's factory)."""
        self._load_builtins()
        if name in self._factories:
            return self._factories[name]
        prefix, sep, _ = name.partition(":")
        if sep and prefix in self._prefixes:
            return self._prefixes[prefix]
        raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")

    def create(self, name: str, **kwargs) -> T:
        factory = self.factory(name)  # raises KeyError for an unknown name
        if name in self._factories:
            return factory(**kwargs)
        prefix, _, rest = name.partition(":")  # a prefixed family: the factory takes the part after it
        if not rest:
            raise ValueError(f"{self.kind} {name!r}: give a name after '{prefix}:'")
        return factory(rest, **kwargs)
