"""Recipe registry: ``create_model(name, **config)``, ``register_model``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable

from mtaffect.models.base import MTLModel
from mtaffect.registry import Registry

MODELS: Registry[MTLModel] = Registry(
    "model",
    (
        "mtaffect.models.recipe1_queries_gcn",
        "mtaffect.models.recipe2_au_graph",
        "mtaffect.models.recipe3_progressive",
        "mtaffect.models.recipe4_emotinet",
    ),
)


def register_model(name: str) -> Callable:
    """Decorator: register a recipe class or factory under ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, **config) -> MTLModel:
    """Build a recipe by name, e.g. ``create_model("emotinet", feature_dim=128, num_logits=7)``."""
    return MODELS.create(name, **config)
