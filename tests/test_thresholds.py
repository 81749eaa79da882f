"""Per-AU thresholds and the expression bias: the searches find what brute force finds."""

from __future__ import annotations

import numpy as np
import pytest

from mtaffect.metrics import au_f1, expression_f1
from mtaffect.post.thresholds import (
    DEFAULT_GRID,
    apply_expr_bias,
    best_threshold_bagged,
    best_threshold_exact,
    best_threshold_grid,
    tune_au_thresholds,
    tune_expr_bias,
    video_bootstrap_weights,
)
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS, NUM_EXPR


def brute_f1(scores: np.ndarray, labels: np.ndarray, t: float) -> float:
    pred = scores >= t
    tp = np.sum(pred & labels)
    denom = pred.sum() + labels.sum()
    return 2 * tp / denom if denom else 0.0


def labelled(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    y = rng.random((n, NUM_AUS)) < rng.uniform(0.05, 0.5, NUM_AUS)
    logits = 1.5 * (2 * y - 1) + rng.normal(0, 1.5, (n, NUM_AUS)) - rng.uniform(0, 2, NUM_AUS)
    p = np.round(1 / (1 + np.exp(-logits)), 2)  # rounding creates many ties
    truth = y.astype(np.int64)
    truth[rng.random((n, NUM_AUS)) < 0.1] = -1
    return truth, p


@pytest.mark.parametrize("seed", range(5))
def test_exact_search_matches_brute_force(seed: int):
    truth, p = labelled(seed)
    for j in range(NUM_AUS):
        ok = truth[:, j] != -1
        s, y = p[ok, j], truth[ok, j] == 1
        t, f1 = best_threshold_exact(s, y)
        candidates = np.r_[np.unique(s), s.max() + 1]
        best = max(brute_f1(s, y, c) for c in candidates)
        assert f1 == pytest.approx(best, abs=1e-12)
        assert brute_f1(s, y, t) == pytest.approx(best, abs=1e-12)  # the returned threshold achieves it


def test_grid_search_matches_brute_force_over_the_grid():
    truth, p = labelled(7, 300)
    for j in range(NUM_AUS):
        ok = truth[:, j] != -1
        s, y = p[ok, j], truth[ok, j] == 1
        t, f1 = best_threshold_grid(s, y, DEFAULT_GRID)
        assert t in DEFAULT_GRID
        assert f1 == pytest.approx(max(brute_f1(s, y, g) for g in DEFAULT_GRID), abs=1e-12)


def test_tuned_thresholds_raise_the_metric_au_f1_and_exact_beats_grid():
    truth, p = labelled(11, 1000)
    exact = tune_au_thresholds(truth, p, method="exact")
    grid = tune_au_thresholds(truth, p, method="grid")
    default_mean, default_per = au_f1(truth, p)
    np.testing.assert_allclose(exact.f1_before, default_per)
    assert (exact.f1_after >= default_per - 1e-12).all()
    assert (exact.f1_after >= grid.f1_after - 1e-12).all()
    assert exact.f1_after.mean() > default_mean + 0.02
    np.testing.assert_allclose(au_f1(truth, p, exact.thresholds)[1], exact.f1_after)
    assert ((exact.thresholds >= 0) & (exact.thresholds <= 1)).all()


def test_no_positive_keeps_the_default_threshold():
    assert best_threshold_exact(np.array([0.2, 0.9]), np.array([False, False])) == (DEFAULT_AU_THRESHOLD, 0.0)
    truth = np.zeros((10, NUM_AUS), dtype=np.int64)
    truth[:, 0] = -1
    res = tune_au_thresholds(truth, np.full((10, NUM_AUS), 0.7))
    assert (res.thresholds == DEFAULT_AU_THRESHOLD).all()


def test_threshold_is_a_margin_midpoint():
    t, f1 = best_threshold_exact(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, True, False, False]))
    assert f1 == 1.0 and t == pytest.approx(0.55)


def test_expression_bias_improves_macro_f1_of_a_biased_model():
    rng = np.random.default_rng(0)
    n = 3000
    y = rng.integers(0, NUM_EXPR, n)
    logits = 1.2 * np.eye(NUM_EXPR)[y] + rng.normal(0, 1.0, (n, NUM_EXPR))
    logits[:, 0] += 1.0  # a model that over-predicts Neutral
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_missing = y.copy()
    y_missing[:100] = -1
    bias, before, after = tune_expr_bias(y_missing, p)
    assert before == pytest.approx(expression_f1(y_missing, p)[0])
    assert after > before + 0.03
    assert bias[0] < 0  # it learns to push Neutral down
    adjusted = apply_expr_bias(p, bias)
    np.testing.assert_allclose(adjusted.sum(axis=1), 1.0, atol=1e-12)
    assert expression_f1(y_missing, adjusted)[0] == pytest.approx(after)


def test_zero_bias_is_identity():
    p = np.random.default_rng(1).dirichlet(np.ones(NUM_EXPR), 5)
    np.testing.assert_array_equal(apply_expr_bias(p, np.zeros(NUM_EXPR)), p)
    with pytest.raises(ValueError, match="8 values"):
        apply_expr_bias(p, np.zeros(3))


def test_bagged_search_maximises_the_mean_f1_over_video_resamples():
    truth, p = labelled(3, 300)
    s, y = p[:, 0], truth[:, 0] == 1
    ok = truth[:, 0] != -1
    s, y = s[ok], y[ok]
    videos = np.repeat(np.arange(30), 10)[ok]
    w = video_bootstrap_weights(videos, 20, seed=1)
    assert w.shape == (20, s.size) and (w.sum(axis=1) > 0).all()
    # one resample that keeps every row once is the plain exact search
    assert best_threshold_bagged(s, y, np.ones((1, s.size))) == pytest.approx(best_threshold_exact(s, y))
    t, _ = best_threshold_bagged(s, y, w)

    def mean_f1(thr: float) -> float:
        pred = s >= thr
        return float(
            np.mean([2 * (wb * (pred & y)).sum() / ((wb * pred).sum() + (wb * y).sum()) for wb in w])
        )

    assert mean_f1(t) == pytest.approx(max(mean_f1(c) for c in np.unique(s)), abs=1e-12)
    res = tune_au_thresholds(truth, p, groups=np.repeat(np.arange(30), 10), bootstrap=20, seed=1)
    assert res.thresholds[0] == pytest.approx(t)
