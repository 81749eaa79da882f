"""Backbone registry in the style of timm: ``create_backbone(name, **kw)``.

Plain names (``fer-minixception``, ``dinov2-small``) map to a factory; prefixed names
(``emotiefflib:<model>``, ``hf:<hub-id-or-folder>``) pass the part after the colon to the factory.
Backbone modules register themselves on import; :func:`create_backbone` imports them lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mtaffect.features.base import Backbone

_FACTORIES: dict[str, Callable[..., Backbone]] = {}
_PREFIXES: dict[str, Callable[..., Backbone]] = {}
_BUILTIN_MODULES = (
    "mtaffect.features.fer_minixception",
    "mtaffect.features.dinov2",
    "mtaffect.features.emotiefflib",
    "mtaffect.features.hf",
)
_loaded = False


def register_backbone(name: str, *, prefix: bool = False) -> Callable:
    """Decorator: register a factory under ``name`` (or under ``name:`` when ``prefix``)."""

    def deco(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        table = _PREFIXES if prefix else _FACTORIES
        if name in table:
            raise ValueError(f"backbone {name!r} is registered twice")
        table[name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
        _loaded = True


def list_backbones() -> list[str]:
    """Registered names; prefixed families are listed as ``prefix:<...>``."""
    _load_builtins()
    return sorted(_FACTORIES) + sorted(f"{p}:<...>" for p in _PREFIXES)


def create_backbone(name: str, **kwargs) -> Backbone:
    """Build a backbone by registry name, e.g. ``create_backbone("dinov2-small", weights="path")``."""
    _load_builtins()
    if name in _FACTORIES:
        return _FACTORIES[name](**kwargs)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _PREFIXES:
        if not rest:
            raise ValueError(f"backbone {name!r}: give a model after '{prefix}:'")
        return _PREFIXES[prefix](rest, **kwargs)
    raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
