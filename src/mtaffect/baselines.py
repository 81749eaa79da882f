"""Trivial reference predictors: the floor every model must clear.

``constant`` is the challenge's usual floor (every AU on, the majority training expression, the mean
training valence/arousal); ``random`` draws uniform probabilities and VA. Both return a PredictionTable
for any list of images, so they go through the same metric and submission code as real models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.schema import NUM_AUS, NUM_EXPR

BASELINES = ("constant", "random")


def constant_baseline(train: LabelTable, images: Sequence[str]) -> PredictionTable:
    """All AUs on, majority expression, mean VA — statistics taken from ``train``'s valid rows."""
    n = len(images)
    expr = train.expression[train.expr_mask]
    if expr.size == 0:
        raise ValueError("the training labels have no expression row: cannot pick a majority class")
    majority = int(np.bincount(expr, minlength=NUM_EXPR).argmax())
    expr_probs = np.zeros((n, NUM_EXPR))
    expr_probs[:, majority] = 1.0
    v = float(train.valence[train.valence_mask].mean()) if train.valence_mask.any() else 0.0
    a = float(train.arousal[train.arousal_mask].mean()) if train.arousal_mask.any() else 0.0
    return PredictionTable.from_arrays(
        images, np.full(n, v), np.full(n, a), expr_probs, np.ones((n, NUM_AUS))
    )


def random_baseline(images: Sequence[str], seed: int = 0) -> PredictionTable:
    """Uniform random probabilities and VA in [-1, 1]: what chance scores."""
    rng = np.random.default_rng(seed)
    n = len(images)
    expr = rng.random((n, NUM_EXPR))
    expr /= expr.sum(1, keepdims=True)
    return PredictionTable.from_arrays(
        images, rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), expr, rng.random((n, NUM_AUS))
    )
