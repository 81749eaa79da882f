"""What ``mtaffect tune`` gains, measured honestly: tuned on half the validation videos, scored on the other.

Two modes (``--mode``):

- ``recipe4`` (the real measure): synthetic set (``mtaffect synth``) -> features of the embedded
  ``fer-minixception`` backbone -> recipe 4 (``emotinet``) trained on the training split -> its
  validation predictions -> nested tune -> held-out P before/after.
- ``noisy`` (fast; no training): labels from the synthetic label process (temporal persistence,
  sparse frames, missing runs) and per-frame predictions made from them with temporally independent
  noise, a class prior and miscalibrated AUs, as a model trained per frame produces; two such models
  are blended. Validates the tuner in seconds.

``auto`` (default) runs ``recipe4`` when the training code is importable, else ``noisy``.
Run: ``python benchmarks/bench_tune_gain.py [--mode noisy|recipe4] [--videos N --frames F]`` (defaults:
noisy 40 validation videos x 300 rows; recipe4 120 videos x 200 rows, i.e. 30 validation videos,
60 epochs: about 4 minutes on 2 CPU cores).
Returns ``{"name": "tune_gain", "mode", "P_before", "P_after", "gain", ...}`` (held-out numbers).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.schema import AU_NAMES, LABEL_COLUMNS, MISSING_VA, NUM_AUS, NUM_EXPR


# ---------------------------------------------------------------------------------------------------
# Noisy-model mode
# ---------------------------------------------------------------------------------------------------
def synthetic_labels(videos: int, frames: int, seed: int = 0) -> tuple[LabelTable, dict[str, np.ndarray]]:
    """Validation-like labels from the synthetic label process, plus the latent states behind them.

    Returns the LabelTable and ``latent``: per row the never-missing expression, VA and AU states a
    model sees in the face (what noisy predictions are made from).
    """
    from mtaffect.data.synth import label_model, sample_video_labels

    model = label_model()
    rng = np.random.default_rng(seed)
    rows: list[pd.DataFrame] = []
    latent: dict[str, list[np.ndarray]] = {"expr": [], "va": [], "au": []}
    for v in range(videos):
        n = max(8, round(frames * rng.uniform(0.6, 1.4)))
        segments, covered, prev = [], 0, -1
        while covered < n:
            length = max(6, round(rng.gamma(3.0, 40 / 3.0)))
            c = prev
            while c == prev:
                c = int(rng.choice(NUM_EXPR, p=model.expr_p))
            segments.append((c, length))
            covered, prev = covered + length, c
        lab = sample_video_labels(rng, n, segments, "val", model)
        name = f"{v + 1:03d}"
        va = np.c_[lab.valence, lab.arousal]
        missing_va = np.isnan(va[:, 0])
        filled = pd.DataFrame(va).ffill().bfill().fillna(0.0).to_numpy()
        frame = pd.DataFrame(
            {
                "image": [f"{name}/{f:05d}.jpg" for f in lab.frames],
                "video": name,
                "frame": lab.frames.astype(np.int64),
                "valence": np.where(missing_va, MISSING_VA, va[:, 0]).astype(np.float32),
                "arousal": np.where(missing_va, MISSING_VA, va[:, 1]).astype(np.float32),
                "expression": lab.expression,
                **{au: lab.aus[:, j].astype(np.int8) for j, au in enumerate(AU_NAMES)},
            },
            columns=list(LABEL_COLUMNS),
        )
        rows.append(frame)
        latent["expr"].append(lab.latent_expression)
        latent["va"].append(filled)
        latent["au"].append((lab.intensity >= 0.45).astype(np.int64))
    table = LabelTable(pd.concat(rows, ignore_index=True), source="<synthetic validation labels>")
    return table, {k: np.concatenate(v) for k, v in latent.items()}


def _ar1(rng: np.random.Generator, shape: tuple[int, int], rho: float) -> np.ndarray:
    """Unit-variance AR(1) noise along the rows: the slowly drifting part of a model's error."""
    e = rng.standard_normal(shape)
    out = np.empty(shape)
    out[0] = e[0]
    s = np.sqrt(1.0 - rho**2)
    for t in range(1, shape[0]):
        out[t] = rho * out[t - 1] + s * e[t]
    return out


def noisy_predictions(
    gt: LabelTable, latent: dict[str, np.ndarray], seed: int, noise: float = 1.0
) -> PredictionTable:
    """Per-frame predictions from the latent states plus noise (``noise`` scales it).

    The error has a temporally independent part (what smoothing removes) and a slowly drifting AR(1)
    part (what it cannot), plus a frequent-class prior on expressions and a per-AU calibration offset,
    the two biases the expression bias and the per-AU thresholds exist to correct.
    """
    rng = np.random.default_rng(seed)
    n = len(gt)

    def err(cols: int, white: float, drift: float) -> np.ndarray:
        return noise * (white * rng.standard_normal((n, cols)) + drift * _ar1(rng, (n, cols), 0.98))

    pred_va = np.clip(0.75 * latent["va"] + err(2, 0.35, 0.2), -1.0, 1.0)
    onehot = np.eye(NUM_EXPR)[latent["expr"]]
    prior = np.log(np.r_[0.3, np.full(NUM_EXPR - 1, 0.1)])
    logits = 2.0 * onehot + 0.8 * prior + err(NUM_EXPR, 1.5, 1.0)
    expr = np.exp(logits - logits.max(axis=1, keepdims=True))
    expr /= expr.sum(axis=1, keepdims=True)
    offset = np.random.default_rng(1000 + seed).uniform(-1.5, 0.5, NUM_AUS)
    au_logit = 2.0 * (2 * latent["au"] - 1) + offset + err(NUM_AUS, 1.8, 1.2)
    au = 1.0 / (1.0 + np.exp(-au_logit))
    return PredictionTable.from_arrays(
        gt.images,
        pred_va[:, 0],
        pred_va[:, 1],
        expr,
        au,
        video=gt.frame["video"].to_numpy(),
        frame=gt.frame["frame"].to_numpy(),
    )


def run_noisy(videos: int, frames: int, seed: int) -> tuple[LabelTable, list[PredictionTable]]:
    gt, latent = synthetic_labels(videos, frames, seed)
    tables = [noisy_predictions(gt, latent, seed + 1), noisy_predictions(gt, latent, seed + 2, noise=1.2)]
    return gt, tables


# ---------------------------------------------------------------------------------------------------
# Recipe-4 mode
# ---------------------------------------------------------------------------------------------------
def training_available() -> bool:
    """True when the training code (mtaffect.train.fit) and recipe 4 are importable."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("mtaffect.train.fit", "mtaffect.models.recipe4_emotinet")
    )


def run_recipe4(
    videos: int, frames: int, seed: int, epochs: int, work: Path
) -> tuple[LabelTable, list[PredictionTable]]:
    """synth -> extract fer-minixception -> train emotinet -> validation predictions."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mtaffect.data.annotations import load_split
    from mtaffect.data.synth import SynthConfig, generate
    from mtaffect.features.extract import extract
    from mtaffect.train.config import config_from_dict
    from mtaffect.train.fit import fit

    root, store = work / "data", work / "features"
    generate(root, SynthConfig(videos=videos, frames=frames, seed=seed))
    extract(root, "fer-minixception", store, splits=("train", "val"), progress=False, workers=0)
    config = config_from_dict(
        {
            "model": {"recipe": "emotinet"},
            "trainer": {"epochs": epochs, "seed": seed, "progress": False, "accelerator": "cpu"},
        }
    )
    val = load_split(root, "val")
    result = fit(config, store, load_split(root, "train"), val, None, log=None)
    if result.val_predictions is None:
        raise RuntimeError("training returned no validation predictions")
    print(f"recipe 4 trained: {result.summary()}")
    return val, [result.val_predictions]


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("auto", "noisy", "recipe4"), default="auto")
    parser.add_argument(
        "--videos", type=int, default=None, help="noisy: validation videos; recipe4: all videos"
    )
    parser.add_argument("--frames", type=int, default=None, help="annotated rows per video (mean)")
    parser.add_argument("--epochs", type=int, default=60, help="recipe4: training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    args = parser.parse_args(argv)

    from mtaffect.post.tune import tune

    mode = args.mode
    if mode == "auto":
        mode = "recipe4" if training_available() else "noisy"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
        if mode == "recipe4":
            gt, tables = run_recipe4(
                args.videos or 120, args.frames or 200, args.seed, args.epochs, Path(tmp)
            )
        else:
            gt, tables = run_noisy(args.videos or 40, args.frames or 300, args.seed)
    prepared = time.perf_counter() - start
    t0 = time.perf_counter()
    report = tune(gt, tables, nested=True, tune_fraction=0.5, split_seed=args.split_seed)
    seconds = time.perf_counter() - t0
    from rich.console import Console

    console = Console()
    for table in report.tables():
        console.print(table)
    for line in report.lines():
        console.print(line)
    held = report.report_steps or report.tune_steps
    before, after = held[0].before, held[-1].after
    result = {
        "name": "tune_gain",
        "mode": mode,
        "rows": len(gt),
        "videos": {"tune": len(report.tune_videos), "held_out": len(report.report_videos)},
        "P_before": round(before.P, 4),
        "P_after": round(after.P, 4),
        "gain": round(after.P - before.P, 4),
        "terms_before": {
            "va": round(before.va_mean, 4),
            "expr": round(before.expr_f1, 4),
            "au": round(before.au_f1, 4),
        },
        "terms_after": {
            "va": round(after.va_mean, 4),
            "expr": round(after.expr_f1, 4),
            "au": round(after.au_f1, 4),
        },
        "tune_seconds": round(seconds, 2),
        "prepare_seconds": round(prepared, 2),
    }
    print(
        f"tune_gain ({mode}): held-out P {result['P_before']:.4f} -> {result['P_after']:.4f} "
        f"({result['gain']:+.4f}) on {result['videos']['held_out']} videos; tune {seconds:.1f}s"
    )
    return result


if __name__ == "__main__":
    main()
