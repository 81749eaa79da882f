"""Backbone registry: ``create_backbone(name, **kw)``, ``register_backbone``, ``list_backbones``.

Plain names (``fer-minixception``, ``dinov2-small``) map to a factory; prefixed names
(``emotiefflib:<model>``, ``hf:<hub-id-or-folder>``) pass the part after the colon to the factory.
"""

from __future__ import annotations

from collections.abc import Callable

from mtaffect.features.base import Backbone
from mtaffect.registry import Registry

BACKBONES: Registry[Backbone] = Registry(
    "backbone",
    (
        "mtaffect.features.fer_minixception",
        "mtaffect.features.dinov2",
        "mtaffect.features.emotiefflib",
        "mtaffect.features.hf",
    ),
)


def register_backbone(name: str, *, prefix: bool = False) -> Callable:
    """Decorator: register a backbone factory under ``name`` (a family ``name:<...>`` when ``prefix``)."""
    return BACKBONES.register(name, prefix=prefix)


def list_backbones() -> list[str]:
    return BACKBONES.names()


def create_backbone(name: str, **kwargs) -> Backbone:
    """Build a backbone by registry name, e.g. ``create_backbone("dinov2-small", weights="path")``."""
    return BACKBONES.create(name, **kwargs)
