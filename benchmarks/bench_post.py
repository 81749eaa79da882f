"""Speed of post-processing on 1,000,000 rows: blending 3 models, smoothing, AU threshold search.

Run: ``python benchmarks/bench_post.py [--rows N] [--videos V]``. Rows are spread over ``V`` videos
with sparse frames (gaps of 1-8), names ``<video>/<frame>.jpg`` only (video and frame are derived
from the names, as for a table read from disk). Times, each once after building the inputs:

- ``blend``: weighted blend of 3 aligned models (per-task weights);
- ``smooth``: Gaussian VA (sigma 8), box EXPR (half-width 12), Gaussian AU (sigma 4);
- ``thresholds``: exact per-AU F1-maximising search over the sorted scores (12 AUs);
- ``apply``: the whole ``PostConfig.apply`` (blend -> smoothing -> expression bias);
- ``blend_search``: per-task weight search (simplex, step 0.1, 66 points) scored with the metric, on
  the first ``--search-rows`` rows (a validation set is ~26k rows; every point scores all of them);
- ``kernel_grid``: smoothing the three tasks with every kernel of ``tune``'s default grid (windows up
  to ~400 frames) on those rows, and ``kernel_grid_32`` with the earlier grid (widths up to 32).

Returns ``{"name": "post_1m_rows", "rows", "seconds": {...}, "total_seconds"}``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mtaffect.data.predictions import PredictionTable
from mtaffect.post.blend import blend, tune_blend_weights
from mtaffect.post.config import PostConfig
from mtaffect.post.smoothing import TASK_COLUMNS, Kernel, make_plan, smooth, smooth_values
from mtaffect.post.thresholds import tune_au_thresholds
from mtaffect.post.tune import SearchSpace
from mtaffect.schema import NUM_AUS, NUM_EXPR

KERNELS = {"va": Kernel("gaussian", 8.0), "expr": Kernel("box", 12.0), "au": Kernel("gaussian", 4.0)}


def make_models(rows: int, videos: int, models: int = 3, seed: int = 0):
    """Labels-like truth and ``models`` noisy prediction tables over the same sparse-frame images."""
    rng = np.random.default_rng(seed)
    per = np.full(videos, rows // videos)
    per[: rows - per.sum()] += 1
    video = np.repeat(np.arange(videos), per)
    first = np.repeat(np.cumsum(per) - per, per)  # each row's video's first row
    steps = np.cumsum(rng.integers(1, 9, rows))
    frames = steps - steps[first] + 1  # sparse frames, from 1 in each video
    images = [f"{v:05d}/{f:05d}.jpg" for v, f in zip(video.tolist(), frames.tolist(), strict=True)]
    truth = {
        "valence": rng.uniform(-1, 1, rows),
        "arousal": rng.uniform(-1, 1, rows),
        "expression": rng.integers(0, NUM_EXPR, rows),
        "aus": (rng.random((rows, NUM_AUS)) < 0.25).astype(np.int64),
    }
    tables = []
    for _ in range(models):
        va = np.clip(np.c_[truth["valence"], truth["arousal"]] + rng.normal(0, 0.5, (rows, 2)), -1, 1)
        logits = 1.5 * np.eye(NUM_EXPR)[truth["expression"]] + rng.normal(0, 1, (rows, NUM_EXPR))
        expr = np.exp(logits)
        expr /= expr.sum(axis=1, keepdims=True)
        au = 1 / (1 + np.exp(-(2 * truth["aus"] - 1 + rng.normal(0, 1.5, (rows, NUM_AUS)))))
        tables.append(PredictionTable.from_arrays(images, va[:, 0], va[:, 1], expr, au))
    return truth, tables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--videos", type=int, default=2_000)
    parser.add_argument("--search-rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    truth, tables = make_models(args.rows, args.videos, 3, args.seed)
    build = time.perf_counter() - t0
    weights = {"va": [0.5, 0.3, 0.2], "expr": [0.4, 0.4, 0.2], "au": [1 / 3, 1 / 3, 1 / 3]}
    seconds: dict[str, float] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - start, 3)
        return out

    blended = timed("blend", lambda: blend(tables, weights))
    smoothed = timed("smooth", lambda: smooth(blended, KERNELS))
    timed("thresholds", lambda: tune_au_thresholds(truth["aus"], smoothed.au_probs, method="exact"))
    config = PostConfig(kernels=KERNELS, blend_weights=weights, expr_bias=np.r_[-0.2, np.zeros(NUM_EXPR - 1)])
    timed("apply", lambda: config.apply(tables))
    k = min(args.search_rows, args.rows)
    stacks = {t: np.stack([m.frame[list(c)].to_numpy()[:k] for m in tables]) for t, c in TASK_COLUMNS.items()}
    head = {name: values[:k] for name, values in truth.items()}
    timed("blend_search", lambda: tune_blend_weights(stacks, head, step=0.1, au_thresholds=None))
    part = tables[0].take(np.arange(k))
    plan = make_plan(part)
    raw = {t: part.frame[list(c)].to_numpy(dtype=np.float64) for t, c in TASK_COLUMNS.items()}

    def grid(space: SearchSpace) -> int:
        kernels = space.kernels()
        for kernel in kernels:
            for values in raw.values():
                smooth_values(plan, values, kernel)
        return len(kernels)

    n_new = timed("kernel_grid", lambda: grid(SearchSpace()))
    n_old = timed("kernel_grid_32", lambda: grid(SearchSpace(widths=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))))
    core = seconds["blend"] + seconds["smooth"] + seconds["thresholds"]
    print(
        f"post_1m_rows: blend {seconds['blend']:.2f}s + smooth {seconds['smooth']:.2f}s + thresholds "
        f"{seconds['thresholds']:.2f}s = {core:.2f}s; apply {seconds['apply']:.2f}s; blend weight search "
        f"{seconds['blend_search']:.2f}s on {k:,} rows ({args.rows:,} rows, 3 models, {args.videos} videos; "
        f"inputs built in {build:.1f}s)"
    )
    print(
        f"tune's kernel grid on {k:,} rows, 3 tasks: {n_new} kernels (windows up to ~400 frames) "
        f"{seconds['kernel_grid']:.1f}s; the earlier grid (widths <= 32) {n_old} kernels "
        f"{seconds['kernel_grid_32']:.1f}s"
    )
    return {"name": "post_1m_rows", "rows": args.rows, "seconds": seconds, "total_seconds": round(core, 3)}


if __name__ == "__main__":
    main()
