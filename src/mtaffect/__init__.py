"""mtaffect: multi-task facial affect analysis (12 AUs, 8 expressions, valence/arousal).

The top level stays light: heavy entry points are imported on first use.
"""

from __future__ import annotations

from typing import Any

from mtaffect.schema import AU_NAMES, EXPR_NAMES

__version__ = "0.1.0"

_LAZY = {
    "load_model": "mtaffect.models.loading",
    "Predictor": "mtaffect.predict.pipeline",
    "create_backbone": "mtaffect.features.registry",
    "create_model": "mtaffect.models.registry",
    "score": "mtaffect.metrics",
    "summarize": "mtaffect.predict.summary",
    "read_table": "mtaffect.predict.outputs",
}
__all__ = ["AU_NAMES", "EXPR_NAMES", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtaffect' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included (tab completion and ``help`` see them before first use)."""
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
