"""Blending: aligned by image, per-task weights summing to 1, tuned weights favour the better model."""

from __future__ import annotations

import numpy as np
import pytest

from mtaffect.data.predictions import MissingPredictionsError, PredictionTable
from mtaffect.post.blend import blend, check_weights, fold_ensemble, simplex_grid, tune_blend_weights
from mtaffect.schema import NUM_AUS, NUM_EXPR


def model(images, seed: int) -> PredictionTable:
    rng = np.random.default_rng(seed)
    n = len(images)
    return PredictionTable.from_arrays(
        images,
        rng.uniform(-1, 1, n),
        rng.uniform(-1, 1, n),
        rng.dirichlet(np.ones(NUM_EXPR), n),
        rng.random((n, NUM_AUS)),
    )


IMAGES = [f"v/{i}.jpg" for i in range(1, 21)]


def test_blend_aligns_by_image_and_weights_per_task():
    a = model(IMAGES, 0)
    b = model(IMAGES[::-1], 1)  # same images, another order
    out = blend([a, b], {"va": [0.25, 0.75], "expr": [1, 0], "au": [0.5, 0.5]})
    b_aligned = b.align_to(a.images)
    assert (out.images == a.images).all()
    np.testing.assert_allclose(out.valence, 0.25 * a.valence + 0.75 * b_aligned.valence)
    np.testing.assert_allclose(out.expr_probs, a.expr_probs)
    np.testing.assert_allclose(out.au_probs, 0.5 * (a.au_probs + b_aligned.au_probs))
    np.testing.assert_allclose(out.expr_probs.sum(axis=1), 1.0)


def test_fold_ensemble_is_the_mean():
    tables = [model(IMAGES, s) for s in range(4)]
    out = fold_ensemble(tables)
    np.testing.assert_allclose(out.arousal, np.mean([t.arousal for t in tables], axis=0))
    np.testing.assert_allclose(out.au_probs, np.mean([t.au_probs for t in tables], axis=0))


def test_weights_are_normalised_and_checked():
    np.testing.assert_allclose(check_weights([2, 6], 2), [0.25, 0.75])
    with pytest.raises(ValueError, match="non-negative"):
        check_weights([-1, 2], 2)
    with pytest.raises(ValueError, match="one per table"):
        check_weights([1, 1, 1], 2)
    with pytest.raises(MissingPredictionsError):
        blend([model(IMAGES, 0), model(IMAGES[:5], 1)])


@pytest.mark.parametrize(("n", "step"), [(2, 0.1), (3, 0.1), (4, 0.25)])
def test_simplex_grid_points_sum_to_one(n: int, step: float):
    grid = simplex_grid(n, step)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert (grid >= 0).all()
    assert len({tuple(np.round(r, 9)) for r in grid}) == len(grid)
    from math import comb

    assert len(grid) == comb(round(1 / step) + n - 1, n - 1)


@pytest.mark.parametrize("models", [2, 3, 6])  # 6 models: too many simplex points -> coordinate ascent
def test_tuned_weights_sum_to_one_and_prefer_the_accurate_model(models: int):
    rng = np.random.default_rng(0)
    n = 600
    v, a = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    y = rng.integers(0, NUM_EXPR, n)
    aus = (rng.random((n, NUM_AUS)) < 0.3).astype(np.int64)
    truth = {"valence": v, "arousal": a, "expression": y, "aus": aus}
    noise = [0.1] + [1.5] * (models - 1)  # model 0 is much better
    va = np.stack([np.c_[v, a] + rng.normal(0, s, (n, 2)) for s in noise])
    logit = np.stack([3 * np.eye(NUM_EXPR)[y] + rng.normal(0, 3 * s, (n, NUM_EXPR)) for s in noise])
    expr = np.exp(logit) / np.exp(logit).sum(axis=2, keepdims=True)
    au = np.stack(
        [1 / (1 + np.exp(-(3 * (2 * aus - 1) + rng.normal(0, 3 * s, (n, NUM_AUS))))) for s in noise]
    )
    found = tune_blend_weights({"va": va, "expr": expr, "au": au}, truth, step=0.1)
    for task, (w, score) in found.items():
        assert w.shape == (models,)
        assert w.sum() == pytest.approx(1.0)
        assert (w >= 0).all()
        assert w[0] >= 0.5, (task, w)
        assert np.isfinite(score)
