"""Data-layer speed at real s-Aff-Wild2 sizes: parse 142,333 annotation rows, write and validate a
51,159-line submission (the ABAW7 test list length)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mtaffect.data.annotations import read_annotations
from mtaffect.data.predictions import PredictionTable
from mtaffect.data.submission import validate_submission, write_submission
from mtaffect.schema import NUM_AUS, NUM_EXPR, OFFICIAL_HEADER


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=142_333)
    ap.add_argument("--test-lines", type=int, default=51_159)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "train.txt"
        va = rng.uniform(-1, 1, (args.rows, 2))
        expr = rng.integers(-1, 8, args.rows)
        aus = rng.integers(-1, 2, (args.rows, NUM_AUS))
        lines = [
            f"v{i // 500}/{i % 500 + 1:05d}.jpg,{va[i, 0]:.6f},{va[i, 1]:.6f},{expr[i]},"
            + ",".join(map(str, aus[i]))
            for i in range(args.rows)
        ]
        ann.write_text(OFFICIAL_HEADER + "\n" + "\n".join(lines) + "\n")
        parse_s = _best(lambda: read_annotations(ann), args.repeats)

        names = [f"t{i // 500}/{i % 500 + 1:05d}.jpg" for i in range(args.test_lines)]
        probs = rng.random((args.test_lines, NUM_EXPR))
        pred = PredictionTable.from_arrays(
            names,
            va[: args.test_lines, 0],
            va[: args.test_lines, 1],
            probs / probs.sum(1, keepdims=True),
            rng.random((args.test_lines, NUM_AUS)),
        )
        sub = Path(tmp) / "sub.txt"
        write_s = _best(lambda: write_submission(pred, names, sub, overwrite=True), args.repeats)
        validate_s = _best(lambda: validate_submission(sub, names), args.repeats)
    print(
        f"parse {args.rows} rows: {parse_s:.3f}s; write submission {args.test_lines} lines: {write_s:.3f}s; "
        f"validate: {validate_s:.3f}s"
    )
    return {
        "name": "data_io",
        "rows": args.rows,
        "parse_seconds": round(parse_s, 4),
        "test_lines": args.test_lines,
        "write_submission_seconds": round(write_s, 4),
        "validate_seconds": round(validate_s, 4),
    }


if __name__ == "__main__":
    main()
