"""The official ABAW Multi-Task Learning metric: the one definition used everywhere.

Training validation, evaluation, tuning and benchmarks all score with this module, so a number
printed anywhere in the project means the same thing::

    P = (CCC_V + CCC_A) / 2 + F1_EXPR + F1_AU          (maximum 3)

- CCC (concordance correlation coefficient) with population moments (ddof 0), in float64, on the
  rows whose valence (resp. arousal) label is present (``!= schema.MISSING_VA``). A zero
  denominator (both series constant and equal, or no rows) gives 0, never NaN; a constant
  prediction gives exactly 0.
- F1_EXPR is the unweighted mean of the per-class F1 over all 8 classes, on rows whose expression is
  present. A class absent from both truth and prediction counts as 0 (sklearn's plain ``macro``
  skips it; this equals ``f1_score(labels=range(8), average="macro", zero_division=0)``).
- F1_AU is the mean over the 12 AUs of the binary F1 (positive = 1, zero_division 0), each AU on
  its own present rows, with per-AU thresholds (``prob >= threshold`` is a positive).

Everything is computed from sufficient statistics (moments for CCC, confusion counts for F1), so
:func:`official_metric` and the streaming :class:`MTLMetric` share one code path and agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mtaffect.schema import (
    AU_NAMES,
    DEFAULT_AU_THRESHOLD,
    EXPR_NAMES,
    MISSING_AU,
    MISSING_EXPR,
    MISSING_VA,
    NUM_AUS,
    NUM_EXPR,
)

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "TERM_COLUMNS",
    "MTLMetric",
    "MetricResult",
    "P_of",
    "au_f1",
    "ccc",
    "expression_f1",
    "official_metric",
    "require_scored",
    "score",
    "terms_of",
    "terms_row",
]

# Columns of the per-task moment state: count, mean of prediction, mean of truth,
# sum of squared deviations of each, sum of cross deviations (Chan et al.'s parallel form).
_N, _MX, _MY, _M2X, _M2Y, _CXY = range(6)
# Columns of the per-AU count state.
_TP, _FP, _FN, _TN = range(4)


# ---------------------------------------------------------------------------------------------------
# Input conversion and validation
# ---------------------------------------------------------------------------------------------------
def _to_numpy(a: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array, list, pandas object or torch tensor (any device / dtype)."""
    if a is None:
        raise ValueError(f"{name} is required")
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, without importing torch
        t = a.detach().cpu()
        if t.is_floating_point():
            t = t.double()  # bfloat16/half have no numpy dtype; float64 is what we compute in anyway
        return t.numpy()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise ValueError(f"{name} must be numeric, got an object array (mixed or missing values?)")
    return arr


def _first_bad(mask: np.ndarray) -> str:
    """Human position of the first True in ``mask``: 'row 12' or 'row 12, column 3'."""
    idx = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return f"row {idx[0]}" if len(idx) == 1 else f"row {idx[0]}, column {idx[1]}"


def _check_shape(arr: np.ndarray, name: str, shape: tuple[int, ...], what: str) -> None:
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}; expected {shape} ({what})")


def _check_finite(arr: np.ndarray, name: str, where: np.ndarray | None = None) -> None:
    """Refuse NaN/inf (on ``where`` only): one would silently turn a whole score into NaN."""
    if arr.dtype.kind not in "fc":
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(arr.sum()):  # NaN/inf propagate through a sum: one read pass, no mask
            return
    bad = ~np.isfinite(arr)  # the sum may also have just overflowed: look element by element
    if where is not None:
        bad &= where
    if bad.any():
        scope = " on labelled rows" if where is not None else ""
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/inf value(s){scope} (first at {_first_bad(bad)}); "
            "fill or drop them before scoring"
        )


def _as_codes(
    arr: np.ndarray, name: str, low: int, high: int, meaning: str, dtype: type = np.int64
) -> np.ndarray:
    """Integer codes in ``[low, high]`` as ``dtype``; floats are accepted when integral (``3.0``).

    The range is checked before the cast, so a wide value can never wrap into a valid small code.
    """
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "f":
        _check_finite(arr, name)
        bad = arr != np.floor(arr)
        if bad.any():
            raise ValueError(
                f"{name} must hold integer codes ({meaning}); non-integer {arr[bad][0].item()!r} "
                f"at {_first_bad(bad)}"
            )
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer codes ({meaning}), got dtype {arr.dtype}")
    if arr.size and (arr.min() < low or arr.max() > high):
        bad = (arr < low) | (arr > high)
        raise ValueError(f"{name} has value {arr[bad][0].item()!r} at {_first_bad(bad)}; allowed: {meaning}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _thresholds(au_thresholds: Any) -> np.ndarray:
    """Per-AU thresholds as a (12,) float64 array: None -> default, scalar -> broadcast."""
    if au_thresholds is None:
        return np.full(NUM_AUS, DEFAULT_AU_THRESHOLD, dtype=np.float64)
    if isinstance(au_thresholds, Mapping):  # {"AU1": 0.4, ...}: names must be exact, all present
        unknown = set(au_thresholds) - set(AU_NAMES)
        missing = [n for n in AU_NAMES if n not in au_thresholds]
        if unknown or missing:
            raise ValueError(
                f"au_thresholds keys must be exactly {list(AU_NAMES)}; "
                f"unknown {sorted(unknown)}, missing {missing}"
            )
        au_thresholds = [au_thresholds[n] for n in AU_NAMES]
    thr = _to_numpy(au_thresholds, "au_thresholds").astype(np.float64)
    if thr.ndim == 0:
        thr = np.full(NUM_AUS, float(thr))
    _check_shape(thr, "au_thresholds", (NUM_AUS,), f"one threshold per AU, in the order {AU_NAMES}")
    _check_finite(thr, "au_thresholds")
    return thr


def _va_true(a: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Valence/arousal labels as float64 plus the mask of present rows (-5 and -5.0 both missing)."""
    arr = _to_numpy(a, name).astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} has shape {arr.shape}; expected (n,) labels in [-1, 1], {MISSING_VA:g} missing"
        )
    _check_finite(arr, name)
    return arr, arr != MISSING_VA


def _expr_pred_labels(
    pred: np.ndarray, name: str, n: int, valid: np.ndarray, num_classes: int = NUM_EXPR
) -> np.ndarray:
    """Predicted classes from (n, K) scores (argmax, ties -> lowest index) or (n,) labels.

    Only rows in ``valid`` are checked (others may hold anything, e.g. -1); they come back as 0.
    """
    if pred.shape == (n, num_classes):
        _check_finite(pred, name, valid[:, None])
        return pred.argmax(axis=1)
    if pred.shape == (n,):
        out = np.zeros(n, dtype=np.int64)
        out[valid] = _as_codes(pred[valid], name, 0, num_classes - 1, f"class indices 0..{num_classes - 1}")
        return out
    raise ValueError(
        f"{name} has shape {pred.shape}; expected ({n}, {num_classes}) class probabilities "
        f"or ({n},) integer labels, with n = {n} label rows"
    )


# ---------------------------------------------------------------------------------------------------
# Sufficient statistics -> scores (the one place each formula lives)
# ---------------------------------------------------------------------------------------------------
def _moments(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, mean x, mean y, M2x, M2y, Cxy) of paired float64 samples.

    Shifting by the first value before centring keeps a constant series exactly constant (its M2
    and co-moment are exactly 0), and two-pass centring avoids cancellation in ``E[x^2]-E[x]^2``.
    """
    n = x.shape[0]
    if n == 0:
        return np.zeros(6)
    dx = x - x[0]
    dy = y - y[0]
    mdx = dx.mean()
    mdy = dy.mean()
    dx -= mdx
    dy -= mdy
    return np.array([n, x[0] + mdx, y[0] + mdy, dx @ dx, dy @ dy, dx @ dy])


def _merge_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s parallel combination of two moment rows (or stacks of rows, last axis = 6)."""
    na, nb = a[..., _N], b[..., _N]
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        wb = np.where(n > 0, nb / n, 0.0)
        cross = np.where(n > 0, na * nb / n, 0.0)
    dx = b[..., _MX] - a[..., _MX]
    dy = b[..., _MY] - a[..., _MY]
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    out[..., _N] = n
    out[..., _MX] = a[..., _MX] + dx * wb
    out[..., _MY] = a[..., _MY] + dy * wb
    out[..., _M2X] = a[..., _M2X] + b[..., _M2X] + dx * dx * cross
    out[..., _M2Y] = a[..., _M2Y] + b[..., _M2Y] + dy * dy * cross
    out[..., _CXY] = a[..., _CXY] + b[..., _CXY] + dx * dy * cross
    return out


def _ccc_from_moments(m: np.ndarray) -> float:
    """CCC = 2 Cxy / (M2x + M2y + n (mean x - mean y)^2); 0 when the denominator is 0."""
    n = m[_N]
    denom = m[_M2X] + m[_M2Y] + n * (m[_MX] - m[_MY]) ** 2
    if n == 0 or not denom > 0:
        return 0.0
    return float(2.0 * m[_CXY] / denom)


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn) per entry, 0 where nothing was true or predicted."""
    tp = tp.astype(np.float64)
    denom = 2.0 * tp + fp + fn
    out = np.zeros_like(tp)
    np.divide(2.0 * tp, denom, out=out, where=denom > 0)
    return out


def _expr_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
    tp = np.diag(conf)
    per_class = _f1_from_counts(tp, conf.sum(axis=0) - tp, conf.sum(axis=1) - tp)
    return float(per_class.mean()), per_class


def _au_from_counts(counts: np.ndarray) -> tuple[float, np.ndarray]:
    per_au = _f1_from_counts(counts[:, _TP], counts[:, _FP], counts[:, _FN])
    return float(per_au.mean()), per_au


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) confusion counts (rows = truth) over rows with y_true != -1, in one bincount."""
    valid = y_true != MISSING_EXPR
    flat = y_true[valid] * num_classes + y_pred[valid]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _column_sums(mask: np.ndarray, fold: int = 256) -> np.ndarray:
    """Per-column True counts of a (n, c) boolean array, as int64.

    A plain ``sum(axis=0)`` runs an inner loop of only c=12 elements per row; viewing blocks of
    ``fold`` rows as one long row makes the inner loop ``fold * c`` long (about 4x faster).
    """
    n, c = mask.shape
    v = mask.view(np.uint8)
    m = n - n % fold
    head = v[:m].reshape(-1, fold * c).sum(axis=0, dtype=np.int64).reshape(fold, c).sum(axis=0)
    return head + v[m:].sum(axis=0, dtype=np.int64)


def _exact_thresholds(thr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Thresholds in the probabilities' own float dtype with ``p >= t`` unchanged for every p.

    Comparing float32 probabilities to float64 thresholds makes numpy upcast the whole array;
    instead take the smallest value of the narrow dtype that is >= the threshold (for such p,
    ``p >= thr`` holds exactly when ``p >= that value``). Other dtypes compare in float64.
    """
    if dtype.kind != "f" or dtype.itemsize >= 8:
        return thr
    with np.errstate(over="ignore"):  # a threshold beyond the dtype's range becomes +-inf: still exact
        t = thr.astype(dtype)
    low = t.astype(np.float64) < thr
    t[low] = np.nextafter(t[low], dtype.type(np.inf))
    return t


def _au_counts(y_true: np.ndarray, y_prob: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """(12, 4) tp/fp/fn/tn per AU over its present rows, from boolean column sums."""
    valid = y_true != MISSING_AU
    pos = y_true == 1
    pred = y_prob >= _exact_thresholds(thr, y_prob.dtype)
    tp = _column_sums(pos & pred)
    fp = _column_sums(pred & valid) - tp
    fn = _column_sums(pos) - tp
    return np.stack([tp, fp, fn, _column_sums(valid) - tp - fp - fn], axis=1)


# ---------------------------------------------------------------------------------------------------
# Public per-task functions
# ---------------------------------------------------------------------------------------------------
def ccc(x: Any, y: Any) -> float:
    """Concordance correlation coefficient of two equal-length series (population moments, float64).

    Symmetric in ``x`` and ``y``. Returns 0.0 (not NaN) for empty input or a zero denominator; a
    constant series gives exactly 0. No missing-value masking here: pass only present rows.
    """
    xa = _to_numpy(x, "x").astype(np.float64).ravel()
    ya = _to_numpy(y, "y").astype(np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"ccc: x has {xa.size} values but y has {ya.size}; they must be paired")
    _check_finite(xa, "x")
    _check_finite(ya, "y")
    return _ccc_from_moments(_moments(xa, ya))


def expression_f1(y_true: Any, y_pred: Any, num_classes: int = NUM_EXPR) -> tuple[float, np.ndarray]:
    """Macro F1 over ALL ``num_classes`` classes and the per-class F1, on rows with ``y_true != -1``.

    ``y_pred`` is (n,) integer labels or (n, num_classes) scores (argmax, ties -> lowest index).
    A class absent from both truth and prediction has F1 0 and still counts in the mean.
    """
    t = _as_codes(
        _to_numpy(y_true, "y_true"),
        "y_true",
        MISSING_EXPR,
        num_classes - 1,
        f"{MISSING_EXPR} (missing) or 0..{num_classes - 1}",
    )
    if t.ndim != 1:
        raise ValueError(f"y_true has shape {t.shape}; expected (n,) class labels")
    valid = t != MISSING_EXPR
    pv = _expr_pred_labels(_to_numpy(y_pred, "y_pred"), "y_pred", t.shape[0], valid, num_classes)
    return _expr_from_confusion(_confusion(t, pv, num_classes))


def au_f1(y_true: Any, y_prob: Any, thresholds: Any = None) -> tuple[float, np.ndarray]:
    """Mean over the 12 AUs of the binary F1 and the per-AU F1.

    ``y_true`` is (n, 12) with 1/0 and -1 for missing; ``y_prob`` (n, 12) probabilities (or 0/1),
    positive when ``>= threshold``. ``thresholds``: None (default), a scalar, 12 values or a
    ``{AU name: threshold}`` mapping.
    """
    t = _as_codes(
        _to_numpy(y_true, "y_true"), "y_true", MISSING_AU, 1, f"{MISSING_AU} (missing), 0 or 1", np.int8
    )
    if t.ndim != 2 or t.shape[1] != NUM_AUS:
        raise ValueError(
            f"y_true has shape {t.shape}; expected (n, {NUM_AUS}) AU labels in the order {AU_NAMES}"
        )
    p = _to_numpy(y_prob, "y_prob")
    _check_shape(p, "y_prob", t.shape, f"one probability per AU label, (n, {NUM_AUS})")
    _check_finite(p, "y_prob", t != MISSING_AU)
    return _au_from_counts(_au_counts(t, p, _thresholds(thresholds)))


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MetricResult:
    """One scored prediction set: the total ``P`` and every term it is made of."""

    P: float
    ccc_v: float
    ccc_a: float
    expr_f1: float
    expr_per_class: np.ndarray  # (8,) F1 per class, schema.EXPR_NAMES order
    au_f1: float
    au_per_au: np.ndarray  # (12,) F1 per AU, schema.AU_NAMES order
    counts: dict  # {"rows", "valence", "arousal", "expression", "au": {AU name: n}}: rows scored per term
    au_thresholds: np.ndarray | None = field(default=None)  # (12,) thresholds the AU F1 was computed with

    @property
    def va_mean(self) -> float:
        """The VA term of P: the mean of the two CCCs."""
        return (self.ccc_v + self.ccc_a) / 2.0

    @property
    def terms(self) -> dict[str, float]:
        """P's three terms by task key (``au``, ``expr``, ``va``)."""
        return {"au": float(self.au_f1), "expr": float(self.expr_f1), "va": float(self.va_mean)}

    def P_of(self, tasks: Any) -> float:
        """The sum of the terms of ``tasks`` only (P itself when all three are given)."""
        return P_of(self.terms, tasks)

    def to_dict(self) -> dict:
        """Plain-Python (json.dumps-able) nested breakdown, keyed by the schema names."""
        return {
            "P": float(self.P),
            "va": {"ccc_v": float(self.ccc_v), "ccc_a": float(self.ccc_a), "mean": float(self.va_mean)},
            "expr": {
                "f1": float(self.expr_f1),
                "per_class": {n: float(v) for n, v in zip(EXPR_NAMES, self.expr_per_class, strict=True)},
            },
            "au": {
                "f1": float(self.au_f1),
                "per_au": {n: float(v) for n, v in zip(AU_NAMES, self.au_per_au, strict=True)},
            },
            "counts": {
                "rows": int(self.counts["rows"]),
                "valence": int(self.counts["valence"]),
                "arousal": int(self.counts["arousal"]),
                "expression": int(self.counts["expression"]),
                "au": {n: int(self.counts["au"][n]) for n in AU_NAMES},
            },
        }

    def table(self) -> Table:
        """A readable breakdown (term, score, rows scored) for the CLI; print it with rich."""
        from rich.table import Table

        c = self.counts
        table = Table(title=f"ABAW MTL metric  P = {self.P:.4f}  (max 3)", title_justify="left")
        table.add_column("term")
        table.add_column("score", justify="right")
        table.add_column("rows", justify="right")
        table.add_column("threshold", justify="right")
        table.add_row("[bold]P[/bold] = VA + EXPR + AU", f"[bold]{self.P:.4f}[/bold]", f"{c['rows']:,}", "")
        table.add_section()
        table.add_row("VA: mean CCC", f"{self.va_mean:.4f}", "", "")
        table.add_row("  CCC valence", f"{self.ccc_v:.4f}", f"{c['valence']:,}", "")
        table.add_row("  CCC arousal", f"{self.ccc_a:.4f}", f"{c['arousal']:,}", "")
        table.add_section()
        table.add_row("EXPR: macro F1 (8 classes)", f"{self.expr_f1:.4f}", f"{c['expression']:,}", "")
        for name, v in zip(EXPR_NAMES, self.expr_per_class, strict=True):
            table.add_row(f"  {name}", f"{v:.4f}", "", "")
        table.add_section()
        table.add_row("AU: mean F1 (12 AUs)", f"{self.au_f1:.4f}", "", "")
        thr = self.au_thresholds
        for i, (name, v) in enumerate(zip(AU_NAMES, self.au_per_au, strict=True)):
            table.add_row(
                f"  {name}", f"{v:.4f}", f"{c['au'][name]:,}", "" if thr is None else f"{thr[i]:.3g}"
            )
        return table


def terms_of(metrics: Mapping[str, Any]) -> dict[str, float]:
    """P's terms by task key from a :meth:`MetricResult.to_dict` dict (as saved in metrics.json)."""
    return {
        "au": float(metrics["au"]["f1"]),
        "expr": float(metrics["expr"]["f1"]),
        "va": float(metrics["va"]["mean"]),
    }


def P_of(terms: Mapping[str, float], tasks: Any) -> float:
    """Sum of the terms of ``tasks`` (task keys ``au``, ``expr``, ``va``): P restricted to those tasks."""
    return float(sum(terms[t] for t in tasks))


#: What result tables (cross-validation, search, pipeline steps) call P's terms, by task key.
TERM_COLUMNS: dict[str, str] = {"va": "ccc_va", "expr": "f1_expr", "au": "f1_au"}


def terms_row(metrics: Mapping[str, Any], tasks: Any) -> dict[str, float]:
    """``{P, ccc_va, f1_expr, f1_au}`` of a :meth:`MetricResult.to_dict` dict, P over ``tasks``: a row of
    the result tables; all NaN for empty metrics (nothing scored)."""
    if not metrics:
        return {"P": float("nan"), **{c: float("nan") for c in TERM_COLUMNS.values()}}
    t = terms_of(metrics)
    return {"P": P_of(t, tasks), **{c: t[k] for k, c in TERM_COLUMNS.items()}}


def _result(rows: int, va: np.ndarray, conf: np.ndarray, au: np.ndarray, thr: np.ndarray) -> MetricResult:
    """Assemble a MetricResult from the sufficient statistics (shared by one-shot and streaming)."""
    ccc_v = _ccc_from_moments(va[0])
    ccc_a = _ccc_from_moments(va[1])
    e_f1, e_per = _expr_from_confusion(conf)
    a_f1, a_per = _au_from_counts(au)
    counts = {
        "rows": int(rows),
        "valence": int(va[0, _N]),
        "arousal": int(va[1, _N]),
        "expression": int(conf.sum()),
        "au": {n: int(v) for n, v in zip(AU_NAMES, au.sum(axis=1), strict=True)},
    }
    return MetricResult(
        P=(ccc_v + ccc_a) / 2.0 + e_f1 + a_f1,
        ccc_v=ccc_v,
        ccc_a=ccc_a,
        expr_f1=e_f1,
        expr_per_class=e_per,
        au_f1=a_f1,
        au_per_au=a_per,
        counts=counts,
        au_thresholds=thr.copy(),
    )


# ---------------------------------------------------------------------------------------------------
# Whole-set scoring
# ---------------------------------------------------------------------------------------------------
def _statistics(
    thr: np.ndarray,
    *,
    valence_true: Any,
    arousal_true: Any,
    expr_true: Any,
    au_true: Any,
    valence_pred: Any,
    arousal_pred: Any,
    expr_pred: Any,
    au_pred: Any,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Validate one set of arrays and reduce it to (rows, VA moments (2, 6), confusion, AU counts)."""
    vt, v_ok = _va_true(valence_true, "valence_true")
    n = vt.shape[0]
    at, a_ok = _va_true(arousal_true, "arousal_true")
    _check_shape(at, "arousal_true", (n,), f"one label per row, n = {n} from valence_true")
    et = _as_codes(
        _to_numpy(expr_true, "expr_true"),
        "expr_true",
        MISSING_EXPR,
        NUM_EXPR - 1,
        f"{MISSING_EXPR} (missing) or 0..{NUM_EXPR - 1}",
    )
    _check_shape(et, "expr_true", (n,), f"one class label per row, n = {n} from valence_true")
    ut = _as_codes(
        _to_numpy(au_true, "au_true"), "au_true", MISSING_AU, 1, f"{MISSING_AU} (missing), 0 or 1", np.int8
    )
    _check_shape(ut, "au_true", (n, NUM_AUS), f"{NUM_AUS} AU labels per row in the order {AU_NAMES}")

    moments = []
    for name, raw, truth, ok in (
        ("valence_pred", valence_pred, vt, v_ok),
        ("arousal_pred", arousal_pred, at, a_ok),
    ):
        pred = _to_numpy(raw, name)
        _check_shape(pred, name, (n,), f"one value per label row, n = {n}")
        pred = pred.astype(np.float64, copy=False)
        _check_finite(pred, name, ok)
        moments.append(_moments(pred[ok], truth[ok]))

    e_ok = et != MISSING_EXPR
    ep = _expr_pred_labels(_to_numpy(expr_pred, "expr_pred"), "expr_pred", n, e_ok)
    up = _to_numpy(au_pred, "au_pred")
    _check_shape(up, "au_pred", (n, NUM_AUS), f"{NUM_AUS} AU probabilities (or 0/1) per label row")
    _check_finite(up, "au_pred", ut != MISSING_AU)
    return n, np.stack(moments), _confusion(et, ep, NUM_EXPR), _au_counts(ut, up, thr)


def official_metric(
    *,
    valence_true: Any,
    arousal_true: Any,
    expr_true: Any,
    au_true: Any,
    valence_pred: Any,
    arousal_pred: Any,
    expr_pred: Any,
    au_pred: Any,
    au_thresholds: Any = None,
) -> MetricResult:
    """Score aligned arrays (row i of every argument is the same image) with the official metric.

    Labels use the schema's missing codes (VA -5 or -5.0, expression -1, AU -1); each term is
    computed on its own present rows. ``expr_pred`` is (n, 8) probabilities (or logits: only the
    argmax matters, ties -> lowest index) or (n,) integer labels; ``au_pred`` is (n, 12)
    probabilities or 0/1, positive when ``>= au_thresholds`` (see :func:`au_f1`). Arrays may be
    numpy, lists, pandas or torch tensors. Raises ValueError naming the argument on a bad shape,
    code or NaN.
    """
    thr = _thresholds(au_thresholds)
    stats = _statistics(
        thr,
        valence_true=valence_true,
        arousal_true=arousal_true,
        expr_true=expr_true,
        au_true=au_true,
        valence_pred=valence_pred,
        arousal_pred=arousal_pred,
        expr_pred=expr_pred,
        au_pred=au_pred,
    )
    return _result(*stats, thr)


def require_scored(gt: Any, what: str = "score") -> None:
    """Raise a ValueError naming ``gt``'s file unless one of its rows holds a label (zero scored rows give
    no result, never a P of 0); ``what`` the work that needed them (score, tune)."""
    labelled = (
        (np.asarray(gt.valence) != MISSING_VA)
        | (np.asarray(gt.arousal) != MISSING_VA)
        | (np.asarray(gt.expression) != MISSING_EXPR)
        | (np.asarray(gt.aus) != MISSING_AU).reshape(len(gt.images), NUM_AUS).any(axis=1)
    )
    if not labelled.any():
        where = getattr(gt, "source", None) or "the ground truth"
        holds = "no data rows" if len(gt.images) == 0 else f"{len(gt.images)} rows but not one label"
        raise ValueError(
            f"{where}: nothing to {what}: it holds {holds} (zero scored rows); check that it is the right "
            "annotation file and that its line ends and header are intact"
        )


def score(gt: Any, pred: Any, *, au_thresholds: Any = None) -> MetricResult:
    """Score a PredictionTable against a LabelTable, aligning the predictions to the label rows.

    ``gt`` needs ``.images``, ``.valence``, ``.arousal``, ``.expression``, ``.aus``; ``pred`` needs
    ``.align_to(images)`` returning a table in that order with ``.valence``, ``.arousal``,
    ``.expr_probs``, ``.au_probs`` (alignment errors, e.g. unpredicted images, are raised there).
    Ground truth with no labelled row (e.g. a header-only file) is a ValueError: zero scored rows give
    no score, never a P of 0.

    Args:
        gt: the labels, a :class:`~mtaffect.data.annotations.LabelTable` (or anything with its fields).
        pred: the predictions, a :class:`~mtaffect.data.predictions.PredictionTable` covering every
            labelled image (extra rows are ignored).
        au_thresholds: 12 per-AU decision thresholds on the probabilities; None: 0.5 each.

    Returns:
        The :class:`MetricResult`: ``P`` and its terms (CCC of valence and arousal, expression F1, AU F1),
        with the per-class and per-AU breakdown.

    Raises:
        ValueError: no scored row, or rows that cannot be scored (a labelled image without a prediction,
            a value of the wrong shape or not finite).
    """
    require_scored(gt)
    aligned = pred.align_to(gt.images)
    return official_metric(
        valence_true=gt.valence,
        arousal_true=gt.arousal,
        expr_true=gt.expression,
        au_true=gt.aus,
        valence_pred=aligned.valence,
        arousal_pred=aligned.arousal,
        expr_pred=aligned.expr_probs,
        au_pred=aligned.au_probs,
        au_thresholds=au_thresholds,
    )


# ---------------------------------------------------------------------------------------------------
# Streaming accumulator
# ---------------------------------------------------------------------------------------------------
class MTLMetric:
    """torchmetrics-style accumulator: :meth:`update` on batches, :meth:`compute` the exact metric.

    The state is sufficient statistics only, so memory is O(1) in rows and ``compute()`` equals
    :func:`official_metric` on the concatenated batches (to float rounding, ~1e-15):

    - VA: per task (n, mean pred, mean truth, M2 pred, M2 truth, co-moment), combined across
      batches with Chan et al.'s parallel update, which stays accurate where raw sums of squares
      cancel catastrophically;
    - EXPR: the 8x8 confusion counts (rows = truth); AU: 12 x (tp, fp, fn, tn).

    AU thresholds are fixed at construction because the counts depend on them.

    Across processes (DDP): the counts are plain sums (``all_reduce``), but the VA moments merge
    with Chan's formula, not by summation; so gather every rank's :meth:`state_dict` (e.g.
    ``torch.distributed.all_gather_object``) and fold them with :meth:`merge_states`.
    """

    def __init__(self, au_thresholds: Any = None) -> None:
        self.au_thresholds = _thresholds(au_thresholds)
        self.reset()

    def reset(self) -> None:
        """Forget every update (thresholds are kept)."""
        self.rows = 0
        self.va_moments = np.zeros((2, 6), dtype=np.float64)  # rows: valence, arousal
        self.expr_confusion = np.zeros((NUM_EXPR, NUM_EXPR), dtype=np.int64)
        self.au_counts = np.zeros((NUM_AUS, 4), dtype=np.int64)

    def update(
        self,
        *,
        valence_true: Any,
        arousal_true: Any,
        expr_true: Any,
        au_true: Any,
        valence_pred: Any,
        arousal_pred: Any,
        expr_pred: Any,
        au_pred: Any,
    ) -> None:
        """Add one batch (same keywords and rules as :func:`official_metric`; numpy or torch).

        Args:
            valence_true: (n,) labels; the missing code -5 leaves a row out of VA (NaN is an error).
            arousal_true: (n,) labels, likewise.
            expr_true: (n,) class indices; -1 leaves a row out of the expression term.
            au_true: (n, 12) 0/1 labels; -1 leaves that AU of the row out.
            valence_pred: (n,) predictions.
            arousal_pred: (n,) predictions.
            expr_pred: (n, 8) probabilities or scores, or (n,) class indices.
            au_pred: (n, 12) probabilities, compared with the thresholds given at construction.
        """
        rows, va, conf, au = _statistics(
            self.au_thresholds,
            valence_true=valence_true,
            arousal_true=arousal_true,
            expr_true=expr_true,
            au_true=au_true,
            valence_pred=valence_pred,
            arousal_pred=arousal_pred,
            expr_pred=expr_pred,
            au_pred=au_pred,
        )
        self.rows += rows
        self.va_moments = _merge_moments(self.va_moments, va)
        self.expr_confusion += conf
        self.au_counts += au

    def merge(self, other: MTLMetric) -> MTLMetric:
        """Fold ``other``'s state into this one (in place) and return ``self``."""
        if not np.array_equal(self.au_thresholds, other.au_thresholds):
            raise ValueError(
                "cannot merge MTLMetric states built with different AU thresholds "
                f"({self.au_thresholds.tolist()} vs {other.au_thresholds.tolist()})"
            )
        self.rows += other.rows
        self.va_moments = _merge_moments(self.va_moments, other.va_moments)
        self.expr_confusion += other.expr_confusion
        self.au_counts += other.au_counts
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The whole state as plain numpy arrays (copies), e.g. to gather across processes."""
        return {
            "rows": np.array([self.rows], dtype=np.int64),
            "va_moments": self.va_moments.copy(),
            "expr_confusion": self.expr_confusion.copy(),
            "au_counts": self.au_counts.copy(),
            "au_thresholds": self.au_thresholds.copy(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MTLMetric:
        """Rebuild a metric from :meth:`state_dict` output (numpy arrays or tensors)."""
        expected = {"rows", "va_moments", "expr_confusion", "au_counts", "au_thresholds"}
        if set(state) != expected:
            raise ValueError(f"MTLMetric state must have keys {sorted(expected)}, got {sorted(state)}")
        m = cls(_to_numpy(state["au_thresholds"], "au_thresholds"))
        m.rows = int(_to_numpy(state["rows"], "rows").reshape(-1)[0])
        shapes = {"va_moments": (2, 6), "expr_confusion": (NUM_EXPR, NUM_EXPR), "au_counts": (NUM_AUS, 4)}
        for key, shape in shapes.items():
            arr = _to_numpy(state[key], key)
            _check_shape(arr, f"state[{key!r}]", shape, "as written by MTLMetric.state_dict")
            dtype = np.float64 if key == "va_moments" else np.int64
            setattr(m, key, arr.astype(dtype, copy=True))
        return m

    @classmethod
    def merge_states(cls, states: list[Mapping[str, Any]]) -> MTLMetric:
        """One metric from several ranks' :meth:`state_dict` outputs (the DDP reduction)."""
        if not states:
            raise ValueError("merge_states needs at least one state")
        total = cls.from_state(states[0])
        for s in states[1:]:
            total.merge(cls.from_state(s))
        return total

    def compute(self) -> MetricResult:
        """The official metric of everything added since the last :meth:`reset`.

        Returns:
            The :class:`MetricResult`, the same as :func:`official_metric` on all the batches at once.
        """
        return _result(self.rows, self.va_moments, self.expr_confusion, self.au_counts, self.au_thresholds)
