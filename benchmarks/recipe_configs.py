"""The shipped recipe configs, shared by the training benchmarks: ``configs/<recipe, '-' as '_'>.yaml``."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: Published order: recipe 1 to recipe 4.
RECIPES = ("queries-gcn", "au-graph", "progressive", "emotinet")


def config_path(recipe: str) -> Path:
    """The YAML that trains ``recipe`` (a registry name such as ``au-graph``)."""
    return CONFIG_DIR / f"{recipe.replace('-', '_')}.yaml"
