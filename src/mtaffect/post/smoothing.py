"""Temporal smoothing of a PredictionTable within each video (or face track), in frame units.

Why frame units: annotated rows are sparse (gaps of 1-8 frames), so "the previous row" may be one
frame or eight frames away. Every neighbour is weighted by the kernel evaluated at its actual frame
distance, and the weights are normalised over the rows that exist. Groups (videos, face tracks) are
never mixed.

``unit="rows"`` is the published rule of recipe 4 (Savchenko): the window is the +-``reach``
annotated rows of the same group, whatever their frame distance; box weighs them equally, Gaussian
by their frame distance (sigma ``width`` frames). On consecutive frames both units agree.

Algorithm (vectorised, O(rows x W)): rows are sorted by (group, frame) once; then for row offset
k = 1, 2, ... every pair (i, i+k) of the same group within the kernel's reach is handled at once.
Because frames are sorted, a pair out of reach at offset k stays out of reach at k+1, so the set of
active pairs only shrinks and the loop stops as soon as it is empty. Averages are accumulated as
weighted *differences* to the row's own value, so a constant sequence comes back bit-for-bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtaffect.data import units
from mtaffect.data.predictions import PredictionTable
from mtaffect.schema import AU_PROB_COLUMNS, EXPR_PROB_COLUMNS, VA_NAMES

#: The tasks a kernel may be given for, and the prediction columns each one smooths.
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "va": tuple(VA_NAMES),
    "expr": tuple(EXPR_PROB_COLUMNS),
    "au": tuple(AU_PROB_COLUMNS),
}
TASKS: tuple[str, ...] = tuple(TASK_COLUMNS)
KERNEL_KINDS: tuple[str, ...] = ("none", "gaussian", "box")
#: What a kernel's reach counts: frames (default) or annotated rows of the same group.
KERNEL_UNITS: tuple[str, ...] = ("frames", "rows")
#: A Gaussian kernel is cut at this many sigmas (weight there: exp(-4.5) ~ 1 %).
GAUSS_TRUNCATE = 3.0


class SmoothingError(ValueError):
    """A kernel or a table that cannot be smoothed as asked."""


@dataclass(frozen=True)
class Kernel:
    """A temporal kernel.

    ``kind``: ``"none"``, ``"gaussian"`` (``width`` = sigma in frames, cut at 3 sigma) or ``"box"``
    (``width`` = half-width: neighbours at most ``width`` away weigh 1). ``causal``: only the
    current and past frames are used (streaming). ``width == 0`` means no smoothing.
    ``unit``: ``"frames"`` (reach measured in frames) or ``"rows"`` (reach measured in annotated
    rows of the group: box = the +-``width`` rows; Gaussian = the +-3 ``width`` rows, still weighted
    by frame distance).
    """

    kind: str = "none"
    width: float = 0.0
    causal: bool = False
    unit: str = "frames"

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise SmoothingError(f"kernel kind must be one of {list(KERNEL_KINDS)}, got {self.kind!r}")
        try:
            width = float(self.width)
        except (TypeError, ValueError):
            raise SmoothingError(f"kernel width must be a number of frames, got {self.width!r}") from None
        if not math.isfinite(width) or width < 0:
            raise SmoothingError(f"kernel width must be a finite number of frames >= 0, got {self.width!r}")
        if not isinstance(self.causal, (bool, np.bool_)):
            raise SmoothingError(f"kernel causal must be true or false, got {self.causal!r}")
        if self.unit not in KERNEL_UNITS:
            raise SmoothingError(f"kernel unit must be one of {list(KERNEL_UNITS)}, got {self.unit!r}")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "causal", bool(self.causal))

    @property
    def is_identity(self) -> bool:
        """True when smoothing with this kernel changes nothing."""
        return self.kind == "none" or self.width == 0.0

    @property
    def reach(self) -> float:
        """Largest distance (in ``unit``) with a non-zero weight."""
        if self.is_identity:
            return 0.0
        return GAUSS_TRUNCATE * self.width if self.kind == "gaussian" else self.width

    @property
    def span(self) -> float:
        """Frames (or rows) the centred window covers: ``2 reach + 1``."""
        return 2 * self.reach + 1

    def weights(self, distance: np.ndarray) -> np.ndarray:
        """Weight of a neighbour ``distance`` frames away (``>= 0``); 1 at distance 0.

        Frame units: 0 beyond reach. Row units: the reach is counted in rows by the caller, so box
        weighs every neighbour in it 1 and Gaussian weighs it by its frame distance only.
        """
        d = np.abs(np.asarray(distance, dtype=np.float64))
        if self.is_identity:
            return (d == 0).astype(np.float64)
        inside = d <= self.reach if self.unit == "frames" else np.ones(d.shape, dtype=bool)
        if self.kind == "box":
            return inside.astype(np.float64)
        return np.where(inside, np.exp(-0.5 * (d / self.width) ** 2), 0.0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "width": float(self.width), "causal": bool(self.causal), "unit": self.unit}

    def __str__(self) -> str:
        if self.is_identity:
            return "none"
        what = "sigma" if self.kind == "gaussian" else "half-width"
        rows = ", reach in rows" if self.unit == "rows" else ""
        return f"{self.kind}({what}={self.width:g}{rows}{', causal' if self.causal else ''})"


@dataclass(frozen=True)
class SmoothingPlan:
    """Row order and group structure of one table, computed once and reused for many kernels."""

    order: np.ndarray  # (n,) positions of the rows sorted by (group, frame)
    frames: np.ndarray  # (n,) float64 frame numbers, in sorted order
    groups: np.ndarray  # (n,) int64 group codes, in sorted order

    def __len__(self) -> int:
        return len(self.order)


def split_image_names(images: Sequence[str] | np.ndarray | pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Video and frame of each ``<video>/<frame>.jpg`` name (see :mod:`mtaffect.data.units`)."""
    try:
        return units.split_image_names(images)
    except units.ImageNameError as exc:
        raise SmoothingError(f"{exc}; add 'video' and 'frame' columns to the prediction table") from None


def make_plan(
    table: PredictionTable, group_by: Sequence[str] = ("video",), frame_col: str = "frame"
) -> SmoothingPlan:
    """Sort order and groups of ``table``; ``video``/``frame`` are derived from ``image`` when absent."""
    frame = table.frame
    where = table.source or "<predictions>"
    group_by = list(group_by)
    derived: tuple[np.ndarray, np.ndarray] | None = None

    def from_image() -> tuple[np.ndarray, np.ndarray]:
        nonlocal derived
        if derived is None:
            derived = split_image_names(frame["image"])
        return derived

    columns: dict[str, np.ndarray] = {}
    for col in group_by:
        if col in frame.columns:
            columns[col] = frame[col].to_numpy()
        elif col == "video":
            columns[col] = from_image()[0]
        else:
            raise SmoothingError(
                f"{where}: no column {col!r} to group by; the table has {list(frame.columns)}"
            )
    if frame_col in frame.columns:
        frames = pd.to_numeric(frame[frame_col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if not np.isfinite(frames).all():
            i = int(np.flatnonzero(~np.isfinite(frames))[0])
            raise SmoothingError(
                f"{where}: row {i}: {frame_col!r} must be a frame number, got {frame[frame_col].iloc[i]!r}"
            )
    elif frame_col == "frame":
        frames = from_image()[1].astype(np.float64)
    else:
        raise SmoothingError(f"{where}: no frame column {frame_col!r}; the table has {list(frame.columns)}")

    n = len(frame)
    if not group_by or n == 0:
        codes = np.zeros(n, dtype=np.int64)
    elif len(group_by) == 1:
        codes = pd.factorize(pd.Series(columns[group_by[0]]), use_na_sentinel=False)[0].astype(np.int64)
    else:
        keys = pd.DataFrame({c: columns[c] for c in group_by})
        codes = keys.groupby(group_by, dropna=False, sort=False).ngroup().to_numpy(dtype=np.int64)
    order = np.lexsort((frames, codes))
    return SmoothingPlan(order=order, frames=frames[order], groups=codes[order])


def smooth_values(plan: SmoothingPlan, values: np.ndarray, kernel: Kernel) -> np.ndarray:
    """Smooth the (n, c) ``values`` (rows in the table's order) with ``kernel``; returns a new array."""
    x = np.asarray(values, dtype=np.float64)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[:, None]
    if x.shape[0] != len(plan):
        raise SmoothingError(f"values have {x.shape[0]} rows, the plan {len(plan)}")
    if kernel.is_identity or len(plan) < 2:
        return (x[:, 0] if squeeze else x).copy()
    xs = x[plan.order]
    n = len(xs)
    acc = np.zeros_like(xs)  # sum of w * (neighbour - self)
    den = np.ones(n)  # sum of weights, self included (weight 1 at distance 0)
    f, g = plan.frames, plan.groups
    reach = kernel.reach
    rows = kernel.unit == "rows"
    buf = np.empty_like(xs)
    for k in range(1, n):
        if rows and k > reach:  # row units: the window is the +-reach rows of the group
            break
        dist = f[k:] - f[:-k]  # >= 0 within a group (rows sorted by group, then frame)
        valid = g[k:] == g[:-k]
        if not rows:
            valid &= dist <= reach
        count = int(np.count_nonzero(valid))
        if count == 0:  # out of reach at offset k means out of reach at every larger offset
            break
        w = kernel.weights(dist)
        # both-way update for a centred kernel; causal: only the later row sees the earlier one,
        # except rows of the same frame, which are all "now" and see each other
        back = None if not kernel.causal else dist == 0
        if count > 0.25 * (n - k):  # dense: whole-array slices (contiguous, fast)
            w[~valid] = 0.0
            delta = buf[: n - k]
            np.subtract(xs[k:], xs[:-k], out=delta)
            delta *= w[:, None]
            acc[k:] -= delta
            den[k:] += w
            if back is None:
                acc[:-k] += delta
                den[:-k] += w
            elif back.any():
                acc[:-k][back] += delta[back]
                den[:-k][back] += w[back]
        else:  # few pairs left: index them
            i = np.flatnonzero(valid)
            j = i + k
            wi = w[i]
            delta = (xs[j] - xs[i]) * wi[:, None]
            acc[j] -= delta
            den[j] += wi
            if back is None:
                acc[i] += delta
                den[i] += wi
            elif back[i].any():
                now = back[i]
                acc[i[now]] += delta[now]
                den[i[now]] += wi[now]
    out = np.empty_like(xs)
    out[plan.order] = xs + acc / den[:, None]
    return out[:, 0] if squeeze else out


def check_kernels(kernels: Mapping[str, Kernel]) -> dict[str, Kernel]:
    """Kernels per task, validated: keys among ``va``, ``expr``, ``au``; values Kernel instances."""
    unknown = [t for t in kernels if t not in TASK_COLUMNS]
    if unknown:
        raise SmoothingError(f"unknown task(s) {unknown} for smoothing kernels; use some of {list(TASKS)}")
    out = {}
    for task, kernel in kernels.items():
        if not isinstance(kernel, Kernel):
            raise SmoothingError(f"kernel for {task!r} must be a Kernel, got {type(kernel).__name__}")
        out[task] = kernel
    return out


def smooth_task(plan: SmoothingPlan, table: PredictionTable, task: str, kernel: Kernel) -> np.ndarray:
    """The smoothed columns of one task ((n, 2) VA, (n, 8) or (n, 12) probabilities)."""
    cols = list(TASK_COLUMNS[task])
    out = smooth_values(plan, table.frame[cols].to_numpy(dtype=np.float64), kernel)
    return finish_task(task, out)


def finish_task(task: str, values: np.ndarray) -> np.ndarray:
    """Undo float rounding: expression rows sum to 1, probabilities stay within [0, 1]."""
    if task == "expr":
        values = values / values.sum(axis=1, keepdims=True)
    if task in ("expr", "au"):
        np.clip(values, 0.0, 1.0, out=values)
    return values


def smooth(
    table: PredictionTable,
    kernels: Mapping[str, Kernel],
    *,
    group_by: Sequence[str] = ("video",),
    frame_col: str = "frame",
) -> PredictionTable:
    """Smooth each task's columns with its kernel, within each group, in frame units.

    ``kernels`` maps ``"va"``, ``"expr"``, ``"au"`` to a :class:`Kernel` (a task left out is not
    smoothed). When the table has no ``video`` / ``frame`` column they are derived from ``image``.
    Returns a new table with the rows in the same order; expression probabilities stay normalised.
    """
    kernels = {t: k for t, k in check_kernels(kernels).items() if not k.is_identity}
    if not kernels or len(table) == 0:
        return table.with_columns({})
    plan = make_plan(table, group_by, frame_col)
    updates: dict[str, np.ndarray] = {}
    for task, kernel in kernels.items():
        values = smooth_task(plan, table, task, kernel)
        updates.update({c: values[:, j] for j, c in enumerate(TASK_COLUMNS[task])})
    return table.with_columns(updates)
