"""Speed of the official metric: ``official_metric`` on 1,000,000 random rows (target < 0.3 s).

Run: ``python benchmarks/bench_metric.py [--rows N] [--repeats K]``. Prints one line and returns
``{"name": "metric_1m_rows", "seconds": median, "rows": N}`` (median of K timed runs after one
warm-up). Inputs look like real use: labels as pandas parses annotation files (float64 VA with -5,
int64 expression/AU codes with -1, missing at s-Aff-Wild2-like rates), predictions in float32 as
models emit them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mtaffect.metrics import official_metric
from mtaffect.schema import MISSING_VA, NUM_AUS, NUM_EXPR


def make_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random labels (with missing codes) and predictions for ``rows`` images."""
    rng = np.random.default_rng(seed)
    valence = rng.uniform(-1, 1, rows)
    arousal = rng.uniform(-1, 1, rows)
    valence[rng.random(rows) < 0.05] = MISSING_VA
    arousal[rng.random(rows) < 0.05] = MISSING_VA
    expr = rng.integers(0, NUM_EXPR, rows)
    expr[rng.random(rows) < 0.3] = -1
    aus = (rng.random((rows, NUM_AUS)) < 0.2).astype(np.int64)
    aus[rng.random(rows) < 0.2] = -1
    return {
        "valence_true": valence,
        "arousal_true": arousal,
        "expr_true": expr,
        "au_true": aus,
        "valence_pred": rng.uniform(-1, 1, rows).astype(np.float32),
        "arousal_pred": rng.uniform(-1, 1, rows).astype(np.float32),
        "expr_pred": rng.dirichlet(np.ones(NUM_EXPR), rows).astype(np.float32),
        "au_pred": rng.random((rows, NUM_AUS), dtype=np.float32),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    inputs = make_inputs(args.rows, args.seed)
    official_metric(**inputs)  # warm-up: page in the arrays and numpy's code paths
    times = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        official_metric(**inputs)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(f"metric_1m_rows: {seconds:.4f} s (median of {len(times)}, {args.rows:,} rows)")
    return {"name": "metric_1m_rows", "seconds": seconds, "rows": args.rows}


if __name__ == "__main__":
    main()
