"""Synthetic s-Aff-Wild2: labels with the real data's structure, rendered faces, the official layout.

Why: the real data is licensed, yet every later stage (feature extraction, the MTL recipes, smoothing,
threshold tuning, submission) must run end to end on a set that is learnable the way the real one is.
Labels follow the published aggregate statistics (``abaw_label_stats.json``): expression imbalance and
temporal persistence, AUs conditioned on the expression with their co-occurrence and persistence,
valence/arousal by expression with AR(1) dynamics, sparse frame sampling, missing labels in runs and
duplicate lines. Faces are rendered from continuous AU intensities (:mod:`.synth_faces`), so AUs,
expression and (partly) VA are visible in the pixels.

Determinism: one ``np.random.SeedSequence`` per video, derived from the seed and the video's index in
the plan, so ``workers > 1`` writes byte-identical files.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from statistics import NormalDist

import numpy as np

from mtaffect.data.synth_faces import FaceIdentity, render_jpeg, sample_scene
from mtaffect.io import OutputExistsError, atomic_open
from mtaffect.schema import (
    AU_NAMES,
    CROPPED_DIR,
    EXPR_NAMES,
    MISSING_AU,
    MISSING_EXPR,
    NUM_AUS,
    OFFICIAL_HEADER,
    TEST_ANNOTATIONS,
    TEST_LIST_NAMES,
    TRAIN_ANNOTATIONS,
    VAL_ANNOTATIONS,
)

GENERATOR_VERSION = "1.0"
INFO_FILE = "synth_info.json"
#: Hidden marker written first into a folder being generated: proof that a rerun may replace it.
SYNTH_MARKER = ".mtaffect-synth"
TEST_LIST = TEST_LIST_NAMES[0]  # ABAW7 style "MTL.txt"
SPLITS = ("train", "val", "test")

#: Mean length (annotated rows) of an expression segment. The real figure is ~150 rows (P(same as
#: previous) = 0.9934) on videos of thousands of frames; shorter segments keep every class present in
#: small synthetic sets while persistence stays > 0.97.
EXPR_SEGMENT_MEAN = 40
#: Mean length (rows) of a run of missing labels, per task.
MISSING_RUN_MEAN = {"expr": 25.0, "va": 12.0, "au": 12.0}
#: Fraction of AU-labelled training rows with some (not all) AUs missing, in short runs.
PARTIAL_AU_RATE = 0.03
#: Largest gap (frames) between consecutive annotated rows; the real histogram has a long tail.
MAX_FRAME_GAP = 8


# ---- published statistics --------------------------------------------------------------------------------
@functools.cache
def label_stats() -> dict:
    """The embedded aggregate label statistics of s-Aff-Wild2 (see its ``_source`` key)."""
    text = importlib.resources.files("mtaffect.data").joinpath("abaw_label_stats.json").read_text("utf-8")
    return json.loads(text)


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (tanh approximation, |error| < 2e-4): fine for intensities."""
    return 0.5 * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def _ncdf(x: np.ndarray | float) -> np.ndarray:
    """Exact standard normal CDF, elementwise (used for calibration only)."""
    return np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)), otypes=[float])(x)


def _bvn_cdf(h: np.ndarray | float, k: np.ndarray | float, r: np.ndarray | float, n: int = 40) -> np.ndarray:
    """P(X < h, Y < k) of a standard bivariate normal with correlation ``r`` (broadcasting arrays).

    Plackett's identity: d/dr of the CDF is the density at (h, k), integrated from 0 to r (midpoints).
    """
    h, k, r = np.broadcast_arrays(np.asarray(h, float), np.asarray(k, float), np.asarray(r, float))
    s = r[..., None] * ((np.arange(n) + 0.5) / n)
    hh, kk = h[..., None], k[..., None]
    dens = np.exp(-(hh**2 - 2 * s * hh * kk + kk**2) / (2 * (1 - s**2))) / np.sqrt(1 - s**2)
    return _ncdf(h) * _ncdf(k) + r * dens.mean(-1) / (2 * math.pi)


def _bvn_both_below(c: float, rho: float) -> float:
    return float(_bvn_cdf(c, c, rho, n=200))


def _rho_for_persistence(probit: np.ndarray, weights: np.ndarray, same: float) -> float:
    """AR(1) coefficient of a thresholded latent so that P(label equals previous row) == ``same``.

    The threshold depends on the expression (``probit`` per class, mixed by ``weights``); expression
    changes are rare, so each class contributes its own stationary flip rate.
    """
    nd = NormalDist()
    ps = [nd.cdf(float(c)) for c in probit]

    def persistence(rho: float) -> float:
        flips = (p - _bvn_both_below(float(c), rho) for p, c in zip(ps, probit, strict=True))
        return sum(w * (1 - 2 * f) for w, f in zip(weights, flips, strict=True))

    lo, hi = 0.0, 0.9995
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if persistence(mid) < same else (lo, mid)
    return (lo + hi) / 2


def _nearest_correlation(m: np.ndarray, floor: float = 0.02) -> np.ndarray:
    """Symmetric matrix -> a valid correlation matrix (eigenvalues clipped, unit diagonal)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    fixed = (v * np.maximum(w, floor)) @ v.T
    d = np.sqrt(np.diag(fixed))
    return fixed / d[:, None] / d[None, :]


@dataclass(frozen=True)
class LabelModel:
    """Everything the label process needs, derived once from the published statistics."""

    expr_p: np.ndarray  # (8,) expression proportions (training counts)
    au_probit: np.ndarray  # (8, 12) latent thresholds: AU = 1 when z < probit[expr]
    au_rho: np.ndarray  # (12,) AR(1) coefficient of each AU latent
    innov_chol: np.ndarray  # (12, 12) Cholesky factor of the AR innovations' covariance
    start_chol: np.ndarray  # (12, 12) Cholesky factor of the latent's stationary covariance
    va_mean: np.ndarray  # (8, 2)
    va_std: np.ndarray  # (8, 2)
    va_rho: tuple[float, float]
    gap_values: np.ndarray
    gap_p: np.ndarray
    au_target: np.ndarray  # (12,) training AU positive rates the thresholds are calibrated to
    missing: dict = field(default_factory=dict)  # per split and task: target missing rate


def _latent_for_phi(probit: np.ndarray, weights: np.ndarray, phi_target: np.ndarray) -> np.ndarray:
    """Latent correlation matrix whose thresholded AUs have the target phi correlation (bisection)."""
    p = weights @ _ncdf(probit)  # (12,) prevalence
    sd = np.sqrt(p * (1 - p))
    h = probit[:, :, None]  # (8, 12, 1)
    k = probit[:, None, :]  # (8, 1, 12)
    lo, hi = np.full((NUM_AUS, NUM_AUS), -0.95), np.full((NUM_AUS, NUM_AUS), 0.95)
    for _ in range(18):
        mid = (lo + hi) / 2
        p11 = np.tensordot(weights, _bvn_cdf(h, k, mid[None]), axes=1)
        phi = (p11 - np.outer(p, p)) / np.outer(sd, sd)
        low = phi < phi_target
        lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
    out = (lo + hi) / 2
    np.fill_diagonal(out, 1.0)
    return out


@functools.cache
def label_model() -> LabelModel:
    """Calibrate the label process to the embedded statistics (deterministic, ~0.2 s, cached)."""
    st = label_stats()
    nd = NormalDist()
    counts = np.asarray(st["train"]["expression_counts"], dtype=float)
    expr_p = counts / counts.sum()
    p_cond = np.array([st["p_au_given_expression"][e] for e in EXPR_NAMES], dtype=float)
    p_cond = np.clip(p_cond, 0.003, 0.997)
    target = np.asarray(st["train"]["au_positive_rate"], dtype=float)
    # per-AU probit shift so the expression mixture reproduces the training AU rates exactly
    base = np.vectorize(nd.inv_cdf)(p_cond)
    probit = np.empty_like(base)
    for k in range(NUM_AUS):
        lo, hi = -3.0, 3.0
        for _ in range(50):
            mid = (lo + hi) / 2
            rate = float(expr_p @ np.vectorize(nd.cdf)(base[:, k] + mid))
            lo, hi = (mid, hi) if rate < target[k] else (lo, mid)
        probit[:, k] = base[:, k] + (lo + hi) / 2
    # co-occurrence: solve, pair by pair, the latent correlation whose thresholded labels (mixed over
    # expressions, whose thresholds already explain part of it) reproduce the published phi correlation
    corr = _nearest_correlation(_latent_for_phi(probit, expr_p, np.asarray(st["au_phi_correlation"], float)))
    same = np.asarray(st["au_same_as_previous_row"], dtype=float)
    rho = np.array([_rho_for_persistence(probit[:, k], expr_p, same[k]) for k in range(NUM_AUS)])
    innov = _nearest_correlation(corr * (1 - np.outer(rho, rho)) / np.sqrt(np.outer(1 - rho**2, 1 - rho**2)))
    chol = np.linalg.cholesky(innov) * np.sqrt(1 - rho**2)[:, None]
    cov_e = chol @ chol.T
    start = np.linalg.cholesky(cov_e / (1 - np.outer(rho, rho)))  # stationary: C = D C D + cov_e
    gaps = {int(k): float(v) for k, v in st["frame_gap_hist"].items() if 1 <= int(k) <= MAX_FRAME_GAP}
    gap_values = np.array(sorted(gaps))
    gap_p = np.array([gaps[g] for g in gap_values])
    c = st["counts"]
    missing = {
        "train": {
            "expr": 1 - c["train_expr"] / c["train_rows"],
            "va": 1 - c["train_va"] / c["train_rows"],
            "au": 1 - c["train_au"] / c["train_rows"],
        },
        "val": {"expr": 1 - c["val_expr"] / c["val_rows"], "va": 0.0, "au": 0.0},
    }
    missing["test"] = dict(missing["val"])
    return LabelModel(
        expr_p=expr_p,
        au_probit=probit,
        au_rho=rho,
        innov_chol=chol,
        start_chol=start,
        va_mean=np.array([st["va_mean_by_expression"][e] for e in EXPR_NAMES], dtype=float),
        va_std=np.array([st["va_std_by_expression"][e] for e in EXPR_NAMES], dtype=float),
        va_rho=(float(st["valence_lag1_corr"]), float(st["arousal_lag1_corr"])),
        gap_values=gap_values,
        gap_p=gap_p / gap_p.sum(),
        au_target=target,
        missing=missing,
    )


# ---- per-video labels ------------------------------------------------------------------------------------
@dataclass
class VideoLabels:
    """Labels of one video, one entry per annotated row (missing values already applied)."""

    frames: np.ndarray  # (n,) int, strictly increasing
    valence: np.ndarray  # (n,) float, NaN when missing
    arousal: np.ndarray  # (n,) float, NaN when missing
    expression: np.ndarray  # (n,) int, -1 when missing
    aus: np.ndarray  # (n, 12) int 0/1, -1 when missing
    intensity: np.ndarray  # (n, 12) float in [0, 1]: what the renderer draws
    latent_expression: np.ndarray  # (n,) int, never missing (the state that drove the face)


def _ar1(rng: np.random.Generator, n: int, rho: float) -> np.ndarray:
    """Unit-variance AR(1) sequence."""
    e = rng.standard_normal(n)
    out = np.empty(n)
    out[0] = e[0]
    s = math.sqrt(1 - rho**2)
    for t in range(1, n):
        out[t] = rho * out[t - 1] + s * e[t]
    return out


def _runs_mask(rng: np.random.Generator, n: int, rate: float, mean_run: float) -> np.ndarray:
    """Boolean mask (True = missing) made of runs: a two-state Markov chain with stationary ``rate``."""
    if rate <= 0:
        return np.zeros(n, dtype=bool)
    if rate >= 1:
        return np.ones(n, dtype=bool)
    p_leave_missing = 1.0 / mean_run
    p_enter_missing = p_leave_missing * rate / (1 - rate)
    u = rng.random(n)
    out = np.empty(n, dtype=bool)
    state = bool(u[0] < rate)
    out[0] = state
    for t in range(1, n):
        state = (u[t] >= p_leave_missing) if state else (u[t] < p_enter_missing)
        out[t] = state
    return out


def sample_video_labels(
    rng: np.random.Generator,
    n: int,
    segments: list[tuple[int, int]],
    split: str,
    model: LabelModel | None = None,
) -> VideoLabels:
    """Draw ``n`` annotated rows of one video from the latent state process.

    ``segments`` is the expression plan: (class, length) pairs covering at least ``n`` rows.
    """
    m = model or label_model()
    if n < 1:
        raise ValueError(f"a video needs at least one annotated row, got {n}")
    expr = np.repeat([c for c, _ in segments], [length for _, length in segments])[:n]
    if expr.size < n:
        raise ValueError(f"expression segments cover {expr.size} rows, {n} needed")
    gaps = rng.choice(m.gap_values, size=n - 1, p=m.gap_p)
    frames = int(rng.integers(1, 25)) + np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)

    # valence/arousal: expression mean (eased across expression changes) + AR(1) noise
    noise = np.stack([_ar1(rng, n, m.va_rho[0]), _ar1(rng, n, m.va_rho[1])], 1)
    target = m.va_mean[expr]
    mean = np.empty_like(target)
    mean[0] = target[0]
    for t in range(1, n):
        mean[t] = mean[t - 1] + 0.25 * (target[t] - mean[t - 1])
    va = np.clip(mean + m.va_std[expr] * noise, -1.0, 1.0)
    va = np.round(va * 3000.0) / 3000.0  # averages of three annotators at 1/1000 resolution

    # AUs: thresholded AR(1) latent with correlated innovations; thresholds follow the expression
    innov = rng.standard_normal((n, NUM_AUS)) @ m.innov_chol.T
    z = np.empty((n, NUM_AUS))
    z[0] = m.start_chol @ rng.standard_normal(NUM_AUS)
    for t in range(1, n):
        z[t] = m.au_rho * z[t - 1] + innov[t]
    aus = (z < m.au_probit[expr]).astype(np.int64)

    # intensities: positives clearly visible (stronger when aroused), negatives low but not always 0;
    # sub-threshold lip-corner movements follow valence, so VA is partly visible too
    g = np.stack([_ar1(rng, n, 0.85) for _ in range(NUM_AUS)], 1)
    pos = 0.45 + 0.55 * _phi(0.75 * g + 0.6 * noise[:, 1:2])
    neg = 0.2 * _phi(g) ** 2
    i12, i15 = AU_NAMES.index("AU12"), AU_NAMES.index("AU15")
    neg[:, i12] = 0.24 * _phi(0.6 * g[:, i12] + 1.0 * noise[:, 0]) ** 2
    neg[:, i15] = 0.24 * _phi(0.6 * g[:, i15] - 1.0 * noise[:, 0]) ** 2
    intensity = np.where(aus == 1, pos, neg)

    # missing labels in runs; a training row always keeps at least one task
    rates = m.missing[split]
    miss_e = _runs_mask(rng, n, rates["expr"], MISSING_RUN_MEAN["expr"])
    both = rates["expr"] * rates["au"]
    miss_v = _runs_mask(rng, n, min(rates["va"] / max(1 - both, 1e-6), 1.0), MISSING_RUN_MEAN["va"])
    miss_a = _runs_mask(rng, n, rates["au"], MISSING_RUN_MEAN["au"])
    miss_v &= ~(miss_e & miss_a)
    valence = np.where(miss_v, np.nan, va[:, 0])
    arousal = np.where(miss_v, np.nan, va[:, 1])
    expression = np.where(miss_e, MISSING_EXPR, expr)
    au_out = np.where(miss_a[:, None], MISSING_AU, aus)
    if split == "train":  # a few rows with some AUs missing, in short runs with a fixed subset
        partial = _runs_mask(rng, n, PARTIAL_AU_RATE, 4.0) & ~miss_a
        t = 0
        while t < n:
            if partial[t]:
                end = t
                while end < n and partial[end]:
                    end += 1
                cols = rng.choice(NUM_AUS, size=int(rng.integers(1, 5)), replace=False)
                au_out[t:end, cols] = MISSING_AU
                t = end
            else:
                t += 1
    return VideoLabels(
        frames=frames,
        valence=valence,
        arousal=arousal,
        expression=expression.astype(np.int64),
        aus=au_out.astype(np.int64),
        intensity=intensity,
        latent_expression=expr.astype(np.int64),
    )


# ---- the plan: videos, splits, expression segments -------------------------------------------------------
@dataclass
class SynthConfig:
    """Size and seed of a synthetic set. ``frames`` is the mean number of annotated rows per video."""

    videos: int = 12
    frames: int = 150
    seed: int = 0
    val_fraction: float = 0.25
    test_fraction: float = 0.2
    image_size: int = 112

    def split_sizes(self) -> dict[str, int]:
        """Videos per split; raises a clear error when the configuration cannot be honoured."""
        if self.videos < 1 or self.frames < 1:
            raise ValueError(
                f"SynthConfig needs videos >= 1 and frames >= 1, got {self.videos}, {self.frames}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be a non-negative integer, got {self.seed!r}")
        if self.image_size < 32:
            raise ValueError(f"SynthConfig.image_size must be >= 32 pixels, got {self.image_size}")
        vf, tf = self.val_fraction, self.test_fraction
        if not (0 <= vf < 1 and 0 <= tf < 1 and vf + tf < 1):
            raise ValueError(
                f"SynthConfig fractions must be in [0, 1) with a sum < 1, got val={vf}, test={tf}"
            )
        n_val = max(round(self.videos * vf), 1 if vf > 0 else 0)
        n_test = max(round(self.videos * tf), 1 if tf > 0 else 0)
        n_train = self.videos - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"SynthConfig: {self.videos} videos cannot fill train, val ({vf}) and test ({tf}); "
                "use more videos or smaller fractions"
            )
        return {"train": n_train, "val": n_val, "test": n_test}


@dataclass
class SynthSummary:
    """What :func:`generate` wrote."""

    root: Path
    rows: dict  # split -> unique annotated rows (test: unique test images)
    images: int
    seconds: float
    duplicates: dict  # split -> duplicate lines added (train, val) / repeated names (test list)


@dataclass
class _VideoTask:
    index: int
    name: str
    split: str
    rows: int
    segments: list[tuple[int, int]]
    scene: dict
    seed: int
    image_size: int
    out: str
    model: LabelModel
    min_duplicates: int = 0  # the plan asks one video per split for >= 1, so every file has some


_RESOLUTIONS = ("640x360", "480x360", "484x360", "720x480", "640x480", "960x720", "1280x720", "1920x1080")
_FPS = (14, 15, 24, 25, 30, 60)


def _video_groups(rng: np.random.Generator, n: int) -> list[list[str]]:
    """Video ids like the real ones, grouped by source video (a ``_left``/``_right`` pair is one group)."""
    used: set[str] = set()
    groups: list[list[str]] = []
    count = 0
    span = max(1, n // 50)  # id ranges grow with the set, so unique ids are always easy to find
    while count < n:
        kind = int(rng.choice(4, p=[0.3, 0.35, 0.2, 0.15]))
        if kind == 0:
            base, group = str(int(rng.integers(1, 460 * span))), None
        elif kind in (1, 2):
            num = int(rng.integers(1, 140 * span))
            base = f"{num}-{int(rng.choice(_FPS))}-{rng.choice(_RESOLUTIONS)}"
            group = [f"{base}_left", f"{base}_right"] if kind == 2 else None
        else:
            base = f"video{int(rng.integers(1, 100 * span))}"
            group = (
                [f"{base}_left", f"{base}_right"]
                if rng.random() < 0.6
                else [f"{base}_{rng.choice(['left', 'right'])}"]
            )
        if base in used:
            continue
        used.add(base)
        group = group or [base]
        group = group[: n - count]
        groups.append(group)
        count += len(group)
    return groups


def _assign_splits(rng: np.random.Generator, groups: list[list[str]], sizes: dict[str, int]) -> list[str]:
    """Split per group (never a video, nor a left/right pair, in two splits), close to ``sizes``."""
    # pairs first (bin packing, largest first), random order within a size; ties go to train
    order = sorted(rng.permutation(len(groups)).tolist(), key=lambda i: -len(groups[i]))
    have = dict.fromkeys(SPLITS, 0)
    out = ["train"] * len(groups)
    for gi in order:
        size = len(groups[gi])
        deficits = {s: sizes[s] - have[s] for s in ("train", "val", "test")}
        fitting = [s for s in deficits if deficits[s] >= size]
        split = max(fitting or deficits, key=lambda s: deficits[s])
        out[gi] = split
        have[split] += size
    return out


def _fill_every_split(
    groups: list[list[str]], splits: list[str], sizes: dict[str, int]
) -> tuple[list[list[str]], list[str]]:
    """Give every split the plan asks for at least one video (tiny sets: a left/right pair can leave
    one empty, and an empty test list breaks ``extract``). Deterministic and a no-op when nothing is
    empty, so larger sets are unchanged."""
    groups, splits = [list(g) for g in groups], list(splits)
    used = {name for g in groups for name in g}
    for split in SPLITS:
        if sizes[split] == 0 or split in splits:
            continue
        counts = {s: splits.count(s) for s in SPLITS}
        donors = [i for i, s in enumerate(splits) if counts[s] > 1]
        if donors:  # move a group (the smallest, the last of equals) from a split that has several
            i = min(donors, key=lambda k: (len(groups[k]), -k))
            splits[i] = split
            continue
        pair = next(i for i, g in enumerate(groups) if len(g) > 1)  # fewer groups than splits: a pair
        groups[pair].pop()  # its second face becomes a video of its own, under a new id
        k = 1
        while f"video{k}" in used:
            k += 1
        used.add(f"video{k}")
        groups.append([f"video{k}"])
        splits.append(split)
    return groups, splits


class _ClassBag:
    """Expression classes drawn without replacement from a refilled bag: proportions hold even in small
    sets, and consecutive segments of a video get different classes when possible."""

    def __init__(self, rng: np.random.Generator, p: np.ndarray, size: int = 24) -> None:
        raw = p * size
        counts = np.maximum(np.floor(raw).astype(int), 1)
        for i in np.argsort(-(raw - np.floor(raw)))[: max(size - counts.sum(), 0)]:
            counts[i] += 1
        self.template = np.repeat(np.arange(p.size), counts)
        self.rng = rng
        self.bag: list[int] = []

    def draw(self, previous: int | None) -> int:
        if not self.bag:
            self.bag = self.rng.permutation(self.template).tolist()
        for i, c in enumerate(self.bag):
            if c != previous:
                return self.bag.pop(i)
        return self.bag.pop(0)


def _plan(config: SynthConfig, model: LabelModel, out: Path) -> list[_VideoTask]:
    sizes = config.split_sizes()
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    groups = _video_groups(rng, config.videos)
    splits = _assign_splits(rng, groups, sizes)
    groups, splits = _fill_every_split(groups, splits, sizes)
    bags = {s: _ClassBag(rng, model.expr_p) for s in SPLITS}
    tasks: list[_VideoTask] = []
    for group, split in zip(groups, splits, strict=True):
        scene = sample_scene(rng)  # both faces of a source video share background and light
        for name in group:
            rows = max(8, round(config.frames * rng.uniform(0.6, 1.4)))
            segments: list[tuple[int, int]] = []
            covered, prev = 0, None
            while covered < rows:
                length = max(6, round(rng.gamma(3.0, EXPR_SEGMENT_MEAN / 3.0)))  # less spread than geometric
                prev = bags[split].draw(prev)
                segments.append((prev, length))
                covered += length
            tasks.append(
                _VideoTask(
                    len(tasks),
                    name,
                    split,
                    rows,
                    segments,
                    scene,
                    config.seed,
                    config.image_size,
                    str(out),
                    model,
                )
            )
    for split in SPLITS:  # every file gets at least one duplicate / repeated name
        first = next((t for t in tasks if t.split == split), None)
        if first is not None:
            first.min_duplicates = 1
    return tasks


# ---- one video: labels, images, lines --------------------------------------------------------------------
def _fmt_va(x: float, missing: str) -> str:
    """VA as the official files write it (Python 2 ``str``: 12 significant digits, always a dot)."""
    if math.isnan(x):
        return missing
    s = f"{x:.12g}"
    return s if ("." in s or "e" in s) else s + ".0"


@dataclass
class _VideoResult:
    name: str
    split: str
    lines: list[str]  # one per annotated row (no duplicates)
    listed: list[str]  # lines as written: duplicates (train/val) or repeated test names inserted
    duplicates: int
    labels: VideoLabels


def _with_duplicates(
    rng: np.random.Generator, lines: list[str], rate: float, minimum: int = 0
) -> tuple[list[str], int]:
    """Insert exact duplicate lines: most right after the original, some later in the same video."""
    n = len(lines)
    k = max(int(rng.binomial(n, rate)), minimum)
    if k == 0:
        return list(lines), 0
    picks = np.sort(rng.choice(n, size=min(k, n), replace=False))
    out = list(lines)
    for i in picks[::-1]:
        pos = i + 1 if rng.random() < 0.6 else int(rng.integers(i + 1, n + 1))
        out.insert(pos, lines[i])
    return out, len(picks)


def _run_video(task: _VideoTask) -> _VideoResult:
    """Labels and images of one video (runs in a worker process when ``workers > 1``)."""
    label_ss, render_ss = np.random.SeedSequence(task.seed, spawn_key=(1, task.index)).spawn(2)
    rng = np.random.default_rng(label_ss)
    labels = sample_video_labels(rng, task.rows, task.segments, task.split, task.model)
    missing_va = "-5" if rng.random() < 0.5 else "-5.0"  # both spellings occur in the official files

    render_rng = np.random.default_rng(render_ss)
    identity = FaceIdentity.sample(render_rng, task.image_size, task.scene)
    folder = Path(task.out) / CROPPED_DIR / task.name
    folder.mkdir(parents=True, exist_ok=True)
    for frame, intensity in zip(labels.frames.tolist(), labels.intensity, strict=True):
        (folder / f"{frame:05d}.jpg").write_bytes(render_jpeg(intensity, identity, render_rng))

    lines = []
    for i, frame in enumerate(labels.frames.tolist()):
        aus = ",".join(str(v) for v in labels.aus[i].tolist())
        lines.append(
            f"{task.name}/{frame:05d}.jpg,{_fmt_va(labels.valence[i], missing_va)},"
            f"{_fmt_va(labels.arousal[i], missing_va)},{int(labels.expression[i])},{aus}"
        )
    if task.split == "test":
        names = [f"{task.name}/{frame:05d}.jpg," for frame in labels.frames.tolist()]
        listed, dups = _with_duplicates(rng, names, 0.005, task.min_duplicates)
    else:
        listed, dups = _with_duplicates(rng, lines, float(rng.uniform(0.005, 0.01)), task.min_duplicates)
    return _VideoResult(task.name, task.split, lines, listed, dups, labels)


# ---- the whole set ---------------------------------------------------------------------------------------
_OWN_NAMES = frozenset(
    {CROPPED_DIR, TRAIN_ANNOTATIONS, VAL_ANNOTATIONS, TEST_ANNOTATIONS, TEST_LIST, INFO_FILE}
)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; give generate() a folder (new or empty)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{out} is not empty; pass overwrite=True (CLI: --overwrite) to replace it"
            )
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in _OWN_NAMES and not p.name.startswith(".")
        )
        if foreign:
            raise OutputExistsError(
                f"{out} holds files that are not part of a synthetic set ({', '.join(foreign[:5])}); "
                "refusing to overwrite it, choose an empty folder"
            )
        if not _is_synthetic_set(out):  # e.g. the real s-Aff-Wild2 root: the same names, not ours
            raise OutputExistsError(
                f"{out} holds a dataset that `mtaffect synth` did not write (no {SYNTH_MARKER} nor a "
                f"{INFO_FILE} of ours); refusing to overwrite it, choose an empty folder"
            )
        # remove the previous set first: a crash mid-way must not leave its info beside new images;
        # the hidden marker stays, so a rerun may still finish an interrupted removal
        for name in sorted(_OWN_NAMES):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTH_MARKER).write_text("written by mtaffect synth\n", encoding="utf-8")


def _is_synthetic_set(folder: Path) -> bool:
    """Whether ``folder`` was written by :func:`generate` (its marker, or an info file of ours)."""
    if (folder / SYNTH_MARKER).is_file():
        return True
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("generator") == "mtaffect.data.synth"


def _split_counts(results: list[_VideoResult]) -> dict:
    lab = [r.labels for r in results]
    if not lab:
        return {"videos": 0, "rows": 0}
    expr = np.concatenate([x.expression for x in lab])
    aus = np.concatenate([x.aus for x in lab])
    return {
        "videos": len(results),
        "rows": int(expr.size),
        "lines": sum(len(r.listed) for r in results),
        "valence_arousal": int(sum(np.isfinite(x.valence).sum() for x in lab)),
        "expression": int((expr >= 0).sum()),
        "aus": int((aus >= 0).all(1).sum()),
        "aus_partial": int(((aus >= 0).any(1) & (aus < 0).any(1)).sum()),
        "expression_per_class": {n: int((expr == i).sum()) for i, n in enumerate(EXPR_NAMES)},
        "au_positive": {n: int((aus[:, i] == 1).sum()) for i, n in enumerate(AU_NAMES)},
    }


def generate(
    out: str | os.PathLike,
    config: SynthConfig | None = None,
    *,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> SynthSummary:
    """Write a complete synthetic s-Aff-Wild2 folder (official layout) into ``out``.

    ``cropped_aligned/<video>/<frame>.jpg`` for every annotated and test image, the training and
    validation annotation files (with duplicate lines, like the official ones), the ABAW7-style test
    list ``MTL.txt`` and its labels ``test_set_annotations.txt``, and ``synth_info.json``.
    Same config -> byte-identical files, whatever ``workers`` (a spawned process pool over videos).
    Refuses a non-empty ``out`` unless ``overwrite`` (and then only one that holds a synthetic set).
    """
    config = config or SynthConfig()
    config.split_sizes()  # validate before touching the disk
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    out = Path(out)
    _prepare_out(out, overwrite)
    model = label_model()
    tasks = _plan(config, model, out)

    def report(done: int) -> None:
        if progress:
            print(
                f"\rsynth: {done}/{len(tasks)} videos", end="" if done < len(tasks) else "\n", file=sys.stderr
            )

    if workers > 1 and not _spawn_can_import_main():
        warnings.warn(
            "generate(workers>1) needs a __main__ that worker processes can import (a script file, the CLI, "
            "a notebook); running from stdin, so using one process (the output is the same)",
            RuntimeWarning,
            stacklevel=2,
        )
        workers = 1
    results: list[_VideoResult] = []
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            results.append(_run_video(task))
            report(len(results))
    else:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")
        ) as pool:
            for res in pool.map(_run_video, tasks, chunksize=1):
                results.append(res)
                report(len(results))

    by_split = {s: sorted((r for r in results if r.split == s), key=lambda r: r.name) for s in SPLITS}
    files = {"train": TRAIN_ANNOTATIONS, "val": VAL_ANNOTATIONS}
    for split, name in files.items():
        _write_lines(out / name, OFFICIAL_HEADER, [ln for r in by_split[split] for ln in r.listed], overwrite)
    _write_lines(
        out / TEST_ANNOTATIONS, OFFICIAL_HEADER, [ln for r in by_split["test"] for ln in r.lines], overwrite
    )
    _write_lines(out / TEST_LIST, "image", [ln for r in by_split["test"] for ln in r.listed], overwrite)

    counts = {s: _split_counts(by_split[s]) for s in SPLITS}
    duplicates = {
        "train": sum(r.duplicates for r in by_split["train"]),
        "val": sum(r.duplicates for r in by_split["val"]),
        "test_list": sum(r.duplicates for r in by_split["test"]),
    }
    images = sum(len(r.lines) for r in results)
    info = {
        "generator": "mtaffect.data.synth",
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "seed": config.seed,
        "images": images,
        "counts": counts,
        "duplicates": duplicates,
        "videos": {s: [r.name for r in by_split[s]] for s in SPLITS},
        "label_statistics": label_stats()["_source"],
    }
    with atomic_open(out / INFO_FILE, "w", overwrite=overwrite, encoding="utf-8", newline="\n") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    return SynthSummary(
        root=out,
        rows={s: counts[s]["rows"] for s in SPLITS},
        images=images,
        seconds=time.perf_counter() - start,
        duplicates=duplicates,
    )


def _spawn_can_import_main() -> bool:
    """Spawned workers re-import ``__main__`` from its file; a script read from stdin has none."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is None or os.path.exists(path)


def _write_lines(path: Path, header: str, lines: list[str], overwrite: bool) -> None:
    with atomic_open(path, "w", overwrite=overwrite, encoding="utf-8", newline="\n") as fh:
        fh.write(header + "\n")
        fh.writelines(ln + "\n" for ln in lines)
