"""Blending: weighted averages of several PredictionTables, with weights per task tuned on validation.

Tables are aligned by image to the first one. Each task (``va``, ``expr``, ``au``) has its own weight
vector (non-negative, normalised to sum to 1). A fold ensemble from ``mtaffect cv`` is the special
case of equal weights (:func:`fold_ensemble`).

Weight search per task maximises that task's term of the official metric (VA: mean CCC; EXPR: macro
F1; AU: mean F1 at given thresholds, or at the best per-AU thresholds of each candidate): an exhaustive
grid over the simplex (weights in multiples of ``step``) when it is small, else coordinate ascent
(move one model's weight along a grid, the others rescaled to keep the sum 1; repeat until no gain).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mtaffect.data.predictions import PredictionError, PredictionTable
from mtaffect.metrics import au_f1, ccc, expression_f1
from mtaffect.post.smoothing import TASK_COLUMNS, TASKS, finish_task
from mtaffect.post.thresholds import tune_au_thresholds
from mtaffect.schema import MISSING_VA

#: Above this many simplex points the search switches to coordinate ascent.
MAX_SIMPLEX_POINTS = 300


def check_weights(weights: Sequence[float] | np.ndarray, n_models: int, task: str = "") -> np.ndarray:
    """Weights as a (n_models,) array summing to 1; refuses negative, non-finite or all-zero weights."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    name = f"blend weights for {task!r}" if task else "blend weights"
    if w.shape != (n_models,):
        raise ValueError(f"{name}: {w.size} value(s) for {n_models} prediction table(s); give one per table")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{name} must be non-negative numbers with a positive sum, got {w.tolist()}")
    return w / w.sum()


def align_tables(tables: Sequence[PredictionTable]) -> list[PredictionTable]:
    """Every table aligned to the first one's images (errors name the table missing an image)."""
    tables = list(tables)
    if not tables:
        raise ValueError("blending needs at least one prediction table")
    first = tables[0]
    if first.frame["image"].duplicated().any():
        raise PredictionError(
            f"{first.source or 'the first prediction table'}: image names repeat; blending aligns tables by "
            "image, so keep one row per image (one face per frame)"
        )
    images = first.images
    # tables written by the same pipeline usually share the row order: comparing is cheaper than hashing
    return [first, *(t if _same_images(t, images) else t.align_to(images) for t in tables[1:])]


def _same_images(table: PredictionTable, images: np.ndarray) -> bool:
    return len(table) == len(images) and bool((table.images == images).all())


def blend(
    tables: Sequence[PredictionTable], weights: Mapping[str, Sequence[float]] | None = None
) -> PredictionTable:
    """Weighted average of ``tables`` per task (``weights``: task -> one weight per table; a task left
    out, or ``weights=None``, gets equal weights). Rows and extra columns follow the first table."""
    aligned = align_tables(tables)
    if len(aligned) == 1:
        return aligned[0]
    weights = dict(weights or {})
    unknown = [t for t in weights if t not in TASK_COLUMNS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in blend weights; use some of {list(TASKS)}")
    updates: dict[str, np.ndarray] = {}
    for task, cols in TASK_COLUMNS.items():
        w = check_weights(weights.get(task, np.ones(len(aligned))), len(aligned), task)
        values = w[0] * aligned[0].frame[list(cols)].to_numpy(dtype=np.float64)
        for wi, t in zip(w[1:], aligned[1:], strict=True):
            values += wi * t.frame[list(cols)].to_numpy(dtype=np.float64)
        values = finish_task(task, values)
        updates.update({c: values[:, j] for j, c in enumerate(cols)})
    return aligned[0].with_columns(updates)


def fold_ensemble(tables: Sequence[PredictionTable]) -> PredictionTable:
    """The mean of several models' predictions (e.g. the folds of ``mtaffect cv``)."""
    return blend(tables, None)


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """All weight vectors with components in multiples of ``step`` summing to 1, shape (points, n)."""
    parts = round(1.0 / step)
    if parts < 1 or abs(parts * step - 1.0) > 1e-9:
        raise ValueError(f"blend grid step must divide 1 (e.g. 0.05, 0.1, 0.25), got {step}")
    points = [
        np.diff(np.r_[0, np.array(c) - np.arange(n_models - 1), parts])
        for c in itertools.combinations(range(parts + n_models - 1), n_models - 1)
    ]
    return np.array(points, dtype=np.float64).reshape(-1, n_models) / parts


def _with_weight(w: np.ndarray, i: int, v: float) -> np.ndarray:
    """``w`` with model ``i``'s weight set to ``v`` and the others rescaled to keep the sum 1."""
    rest = np.delete(w, i)
    total = rest.sum()
    rest = rest * ((1.0 - v) / total) if total > 0 else np.full(rest.size, (1.0 - v) / rest.size)
    return np.insert(rest, i, v)


def _coordinate_ascent(
    objective: Callable[[np.ndarray], float], n_models: int, step: float, max_rounds: int = 10
) -> tuple[np.ndarray, float]:
    w = np.full(n_models, 1.0 / n_models)
    best = objective(w)
    values = np.arange(0.0, 1.0 + 1e-9, step)
    for _ in range(max_rounds):
        improved = False
        for i in range(n_models):
            for v in values:
                cand = _with_weight(w, i, float(v))
                score = objective(cand)
                if score > best + 1e-12:
                    best, w, improved = score, cand, True
        if not improved:
            break
    return w, best


def task_objective(
    task: str,
    truth: Mapping[str, np.ndarray],
    au_thresholds: np.ndarray | str | None = None,
) -> Callable[[np.ndarray], float]:
    """The metric's term for ``task`` as a function of that task's predicted columns on the label rows.

    ``truth`` holds ``valence``, ``arousal``, ``expression`` and ``aus`` (schema missing codes);
    ``au_thresholds="tuned"`` scores AUs at each candidate's own best (exact) thresholds.
    """
    if task == "va":
        v_ok = truth["valence"] != MISSING_VA
        a_ok = truth["arousal"] != MISSING_VA

        def va(values: np.ndarray) -> float:
            return 0.5 * (
                ccc(values[v_ok, 0], truth["valence"][v_ok]) + ccc(values[a_ok, 1], truth["arousal"][a_ok])
            )

        return va
    if task == "expr":
        return lambda values: expression_f1(truth["expression"], values)[0]
    if task == "au":
        if isinstance(au_thresholds, str):
            if au_thresholds != "tuned":
                raise ValueError(f"au_thresholds must be an array, None or 'tuned', got {au_thresholds!r}")
            return lambda values: float(tune_au_thresholds(truth["aus"], values).f1_after.mean())
        return lambda values: au_f1(truth["aus"], values, au_thresholds)[0]
    raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")


def tune_blend_weights(
    stacks: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    *,
    step: float = 0.1,
    au_thresholds: np.ndarray | str | None = "tuned",
) -> dict[str, tuple[np.ndarray, float]]:
    """Best weights per task: ``stacks[task]`` is (models, rows, columns) on the label rows.

    Returns ``{task: (weights summing to 1, objective)}``.
    """
    out = {}
    for task, stack in stacks.items():
        objective_of = task_objective(task, truth, au_thresholds)

        def objective(w: np.ndarray, stack: np.ndarray = stack, f=objective_of, task: str = task) -> float:
            return f(finish_task(task, np.tensordot(w, stack, axes=1)))

        n = stack.shape[0]
        if n == 1:
            out[task] = (np.ones(1), objective(np.ones(1)))
            continue
        grid = simplex_grid(n, step) if _simplex_size(n, step) <= MAX_SIMPLEX_POINTS else None
        if grid is None:
            w, best = _coordinate_ascent(objective, n, step)
        else:
            scores = np.array([objective(w) for w in grid])
            i = int(np.argmax(scores))
            w, best = grid[i], float(scores[i])
        out[task] = (w / w.sum(), float(best))
    return out


def _simplex_size(n_models: int, step: float) -> int:
    from math import comb

    parts = round(1.0 / step)
    return comb(parts + n_models - 1, n_models - 1)
