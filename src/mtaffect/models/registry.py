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
    """Decorator: register a recipe class or factory under ``name``.

    Args:
        name: the recipe's name in configs (``model.recipe``) and checkpoints.

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        ValueError: ``name`` is registered already.
    """
    return MODELS.register(name)


def list_models() -> list[str]:
    """The registered recipe names (the built-in recipes are imported first).

    Returns:
        The names, sorted.
    """
    return MODELS.names()


def create_model(name: str, **config) -> MTLModel:
    """Build a recipe by name, e.g. ``create_model("emotinet", feature_dim=128, num_logits=7)``.

    Args:
        name: a registered recipe (:func:`list_models`).
        **config: the recipe's hyperparameters (a config's ``model`` section without ``recipe``).

    Returns:
        The model, with freshly initialised weights.

    Raises:
        KeyError: an unknown name (the message lists the registered ones).
    """
    return MODELS.create(name, **config)
