"""The shipped recipe configs, shared by the training benchmarks: ``configs/<recipe, '-' as '_'>.yaml``
(the feature-store variant where the published config trains from images)."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: Published order: recipe 1 to recipe 4.
RECIPES = ("queries-gcn", "au-graph", "progressive", "emotinet")


#: Recipes whose published config trains from images: their feature-store variant.
_STORE_VARIANT = {"queries-gcn": "queries_gcn_cached"}


def config_path(recipe: str) -> Path:
    """The YAML that trains ``recipe`` (a registry name such as ``au-graph``) on a feature store."""
    return CONFIG_DIR / f"{_STORE_VARIANT.get(recipe, recipe.replace('-', '_'))}.yaml"
