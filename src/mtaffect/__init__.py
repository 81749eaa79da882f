"""mtaffect: multi-task facial affect analysis (12 AUs, 8 expressions, valence/arousal)."""

from mtaffect.schema import AU_NAMES, EXPR_NAMES

__version__ = "0.1.0"
__all__ = ["AU_NAMES", "EXPR_NAMES", "__version__"]
