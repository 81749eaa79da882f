"""Post-processing that wins points: temporal smoothing, per-AU thresholds, expression bias, blending.

``PostConfig.load(path).apply(tables)`` runs blend -> smoothing -> expression bias; the tuned AU
thresholds travel in ``config.au_thresholds`` for the writers. ``mtaffect tune`` finds the config.
"""

from mtaffect.post.blend import blend, fold_ensemble, tune_blend_weights
from mtaffect.post.config import PostConfig, PostConfigError
from mtaffect.post.smoothing import Kernel, SmoothingError, smooth
from mtaffect.post.thresholds import apply_expr_bias, tune_au_thresholds, tune_expr_bias
from mtaffect.post.tune import SearchSpace, TuneReport, search, tune

__all__ = [
    "Kernel",
    "PostConfig",
    "PostConfigError",
    "SearchSpace",
    "SmoothingError",
    "TuneReport",
    "apply_expr_bias",
    "blend",
    "fold_ensemble",
    "search",
    "smooth",
    "tune",
    "tune_au_thresholds",
    "tune_blend_weights",
    "tune_expr_bias",
]
