"""Per-AU decision thresholds and a per-class expression bias, tuned on validation.

AU thresholds: each AU's F1 depends only on its own threshold, so each is maximised alone.
- ``exact``: sort the AU's scores (descending), accumulate true and false positives, and evaluate
  F1 at every distinct score at once (predicting positive for scores >= that value); the returned
  threshold is the midpoint between the best score and the next lower one, so the decision on these
  rows is unchanged but unseen scores get a margin.
- ``grid``: F1 at a fixed grid of thresholds, counted with binary searches in the sorted scores.
Both give the threshold with the highest F1 (ties: the highest threshold); an AU without positive
labels keeps the default (its F1 is 0 whatever the threshold).

Expression bias: additive log-probability offsets per class (``argmax(log p + b)``), found by
coordinate ascent on macro-F1: for each class in turn, try every offset of a grid with the others
fixed, keep the best; repeat until a full round changes nothing. Only differences between offsets
matter; the Neutral offset stays 0 unless moving it helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtaffect.metrics import au_f1, expression_f1
from mtaffect.schema import DEFAULT_AU_THRESHOLD, MISSING_AU, MISSING_EXPR, NUM_AUS, NUM_EXPR

#: Default grid for ``method="grid"``.
DEFAULT_GRID: np.ndarray = np.round(np.arange(0.02, 0.981, 0.02), 4)
#: Default log-offset grid for the expression bias.
DEFAULT_BIAS_GRID: np.ndarray = np.round(np.arange(-2.0, 2.001, 0.1), 4)
THRESHOLD_METHODS = ("exact", "grid")


@dataclass(frozen=True)
class ThresholdSearch:
    """Outcome of a per-AU search: the thresholds and the F1 before (default) and after, per AU."""

    thresholds: np.ndarray  # (12,)
    f1_before: np.ndarray  # (12,) at the default threshold
    f1_after: np.ndarray  # (12,) at the tuned thresholds


def _f1(tp: np.ndarray, fp: np.ndarray, positives: int) -> np.ndarray:
    """F1 = 2 tp / (tp + fp + positives), 0 where the denominator is 0 (the metric's convention)."""
    tp = tp.astype(np.float64)
    denom = tp + fp + positives
    return np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def best_threshold_exact(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold maximising binary F1 over every distinct score, and that F1 (``labels`` 0/1).

    Returns ``(DEFAULT_AU_THRESHOLD, 0.0)`` when there is no positive label.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    positives = int(y.sum())
    if positives == 0:
        return DEFAULT_AU_THRESHOLD, 0.0
    order = np.argsort(-s)  # ties need no order: runs of equal scores are taken whole
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # the last row of each run of equal scores: predicting ">= that score" takes the whole run
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    f1 = _f1(tp[last], fp[last], positives)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    t = s_sorted[last[best]]
    if best + 1 < last.size:  # midpoint towards the next lower distinct score (same decisions here)
        lower = s_sorted[last[best + 1]]
        mid = 0.5 * (t + lower)
        if lower < mid <= t:
            t = mid
    return float(t), float(f1[best])


def video_bootstrap_weights(groups: np.ndarray, rounds: int, seed: int = 0) -> np.ndarray:
    """(rounds, n) row multiplicities of ``rounds`` resamples of whole groups (videos) with replacement."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups, dtype=object)))
    rng = np.random.default_rng(seed)
    k = len(uniques)
    counts = np.stack([np.bincount(rng.integers(0, k, k), minlength=k) for _ in range(rounds)])
    return counts[:, codes].astype(np.float64)


def best_threshold_bagged(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Threshold maximising the F1 *averaged over resamples* (``weights``: (B, n) row multiplicities).

    The candidates are the same as :func:`best_threshold_exact`'s; averaging the F1 curves of
    resampled videos flattens the spikes a few videos put in one curve, so the threshold chosen
    generalises better to other videos. Returns the threshold and its F1 on the unweighted rows.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return DEFAULT_AU_THRESHOLD, 0.0
    order = np.argsort(-s)  # ties need no order: runs of equal scores are taken whole
    s_sorted, y_sorted, w = s[order], y[order], np.asarray(weights, dtype=np.float64)[:, order]
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(w * y_sorted, axis=1)[:, last]
    fp = np.cumsum(w * ~y_sorted, axis=1)[:, last]
    positives = (w * y_sorted).sum(axis=1, keepdims=True)
    denom = tp + fp + positives
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean(axis=0)
    best = int(np.argmax(f1))
    t = s_sorted[last[best]]
    if best + 1 < last.size:
        lower = s_sorted[last[best + 1]]
        mid = 0.5 * (t + lower)
        if lower < mid <= t:
            t = mid
    pred = s >= t
    tp1 = int((pred & y).sum())
    return float(t), float(2.0 * tp1 / (pred.sum() + y.sum()))


def best_threshold_grid(
    scores: np.ndarray, labels: np.ndarray, grid: np.ndarray = DEFAULT_GRID
) -> tuple[float, float]:
    """Threshold of ``grid`` maximising binary F1 (ties: the highest), and that F1."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    positives = int(y.sum())
    if positives == 0:
        return DEFAULT_AU_THRESHOLD, 0.0
    g = np.sort(np.asarray(grid, dtype=np.float64))[::-1]
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    tp = pos.size - np.searchsorted(pos, g, side="left")  # scores >= t
    fp = neg.size - np.searchsorted(neg, g, side="left")
    f1 = _f1(tp, fp, positives)
    best = int(np.argmax(f1))
    return float(g[best]), float(f1[best])


def tune_au_thresholds(
    au_true: np.ndarray,
    au_prob: np.ndarray,
    *,
    method: str = "exact",
    grid: np.ndarray = DEFAULT_GRID,
    groups: np.ndarray | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> ThresholdSearch:
    """Per-AU thresholds maximising each AU's F1 on its labelled rows (``au_true`` uses -1 for missing).

    With ``groups`` (the video of each row) and ``bootstrap > 0`` the exact search maximises the F1
    averaged over that many resamples of whole videos (:func:`best_threshold_bagged`) instead.
    The F1 before and after are recomputed with the official metric's :func:`~mtaffect.metrics.au_f1`.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {list(THRESHOLD_METHODS)}, got {method!r}")
    t = np.asarray(au_true)
    p = np.asarray(au_prob, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != NUM_AUS or p.shape != t.shape:
        raise ValueError(f"AU labels {t.shape} and probabilities {p.shape} must both be (n, {NUM_AUS})")
    thresholds = np.full(NUM_AUS, DEFAULT_AU_THRESHOLD)
    bagged = bootstrap > 0 and groups is not None and method == "exact"
    weights = video_bootstrap_weights(np.asarray(groups), bootstrap, seed) if bagged else None
    t_cols, p_cols = np.ascontiguousarray(t.T), np.ascontiguousarray(p.T)  # one contiguous row per AU
    for j in range(NUM_AUS):
        valid = t_cols[j] != MISSING_AU
        scores, positive = p_cols[j][valid], t_cols[j][valid] == 1
        if weights is not None:
            thresholds[j] = best_threshold_bagged(scores, positive, weights[:, valid])[0]
        elif method == "exact":
            thresholds[j] = best_threshold_exact(scores, positive)[0]
        else:
            thresholds[j] = best_threshold_grid(scores, positive, grid)[0]
    _, before = au_f1(t, p, None)
    _, after = au_f1(t, p, thresholds)
    return ThresholdSearch(thresholds=thresholds, f1_before=before, f1_after=after)


def apply_expr_bias(expr_probs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Probabilities re-weighted by ``exp(bias)`` and re-normalised (= softmax(log p + bias))."""
    p = np.asarray(expr_probs, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    if b.shape != (NUM_EXPR,):
        raise ValueError(f"expression bias needs {NUM_EXPR} values, got shape {b.shape}")
    if not b.any():
        return p.copy()
    q = p * np.exp(b - b.max())
    total = q.sum(axis=1, keepdims=True)
    out = np.divide(q, total, out=np.full_like(q, 1.0 / NUM_EXPR), where=total > 0)
    return np.clip(out, 0.0, 1.0)


def _decisions(logp: np.ndarray, bias: np.ndarray, c: int, offsets: np.ndarray) -> np.ndarray:
    """Predicted classes (len(offsets), n) when class ``c``'s offset takes each value of ``offsets``.

    Reproduces argmax's tie rule (lowest index wins) of ``argmax(logp + bias)``.
    """
    scores = logp + bias
    others = scores.copy()
    others[:, c] = -np.inf
    best_other = others.argmax(axis=1)
    m = others[np.arange(len(scores)), best_other]
    mine = logp[:, c][None, :] + offsets[:, None]
    wins = (mine > m) | ((mine == m) & (c < best_other))
    return np.where(wins, c, best_other)


def tune_expr_bias(
    expr_true: np.ndarray,
    expr_probs: np.ndarray,
    *,
    grid: np.ndarray = DEFAULT_BIAS_GRID,
    max_rounds: int = 5,
) -> tuple[np.ndarray, float, float]:
    """Per-class log offsets maximising macro-F1 by coordinate ascent; returns (bias, F1 before, after)."""
    y = np.asarray(expr_true)
    valid = y != MISSING_EXPR
    y = y[valid]
    p = np.asarray(expr_probs, dtype=np.float64)[valid]
    if p.ndim != 2 or p.shape[1] != NUM_EXPR:
        raise ValueError(f"expression probabilities must be (n, {NUM_EXPR}), got {p.shape}")
    with np.errstate(divide="ignore"):
        logp = np.log(np.clip(p, 0.0, None))
    offsets = np.unique(np.r_[np.asarray(grid, dtype=np.float64), 0.0])
    bias = np.zeros(NUM_EXPR)
    before = expression_f1(y, p)[0]
    best = before
    for _ in range(max_rounds):
        changed = False
        for c in range(NUM_EXPR):
            preds = _decisions(logp, bias, c, offsets)
            scores = np.array([expression_f1(y, pr)[0] for pr in preds])
            i = int(np.argmax(scores))
            if scores[i] > best + 1e-12:
                best = float(scores[i])
                bias[c] = offsets[i]
                changed = True
        if not changed:
            break
    return bias, float(before), float(best)
