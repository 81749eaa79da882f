"""Quality of the four recipes on a synthetic set: validation P vs the constant baseline, ranked.

Generates ``mtaffect synth`` data (cached under bench_out/), extracts ``fer-minixception`` features
(with tokens, so recipe 1 can run), scores the constant baseline on the validation split and trains
each recipe from its YAML in ``configs/``. Prints a table ranked by P (P, CCC_VA, F1_EXPR, F1_AU,
train seconds) and the ratio to the baseline (the target is >= 1.5x).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_recipes.py --videos 24 --frames 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from recipe_configs import RECIPES, config_path

REPO = Path(__file__).resolve().parents[1]


def synth_set(out: Path, videos: int, frames: int, seed: int) -> Path:
    """The synthetic set (``mtaffect synth``), generated once under ``out`` and reused."""
    from mtaffect.data.synth import SynthConfig, generate

    root = out / f"synth_v{videos}_f{frames}_s{seed}"
    if not (root / "training_set_annotations.txt").is_file():
        generate(root, SynthConfig(videos=videos, frames=frames, seed=seed), overwrite=True, progress=False)
    return root


def prepare(out: Path, videos: int, frames: int, seed: int) -> tuple[Path, Path]:
    """The synthetic set and its feature store, built once and reused."""
    from mtaffect.features.extract import extract

    root = synth_set(out, videos, frames, seed)
    store = root.with_name(root.name + "_fer")
    if not (store / "meta.json").is_file():
        extract(root, "fer-minixception", store, tokens=True, batch_size=256, workers=1, progress=False)
    return root, store


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """The synthetic set's options (shared with bench_finetune_fer.py: the same split)."""
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")


def data_and_baseline(args: argparse.Namespace):
    """(root, store, train, val, constant-baseline MetricResult), printed; all cores for torch."""
    import torch

    from mtaffect.baselines import constant_baseline
    from mtaffect.data.annotations import load_split
    from mtaffect.metrics import score

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    root, store = prepare(args.out, args.videos, args.frames, args.seed)
    train, val = load_split(root, "train"), load_split(root, "val")
    base = score(val, constant_baseline(train, val.images))
    print(f"data {root.name}: train {len(train)} rows, val {len(val)} rows; constant baseline P {base.P:.4f}")
    return root, store, train, val, base


def metric_row(res, seconds: float) -> dict:
    """P, its terms (``res.terms()`` of a TrainResult or PipelineResult) and the train time."""
    return {**res.terms(), "seconds": seconds}


def train_row(name: str, config: Path, source: Path, train, val, overrides=()) -> tuple[dict, object]:
    """Train ``config`` on ``source`` (a feature store or a dataset root), timed, its summary printed:
    (its :func:`metric_row`, the TrainResult)."""
    from mtaffect.train.config import load_config
    from mtaffect.train.fit import fit

    cfg = load_config(config, ["trainer.progress=false", *overrides])
    t0 = time.perf_counter()
    res = fit(cfg, source, train, val, None, log=None)
    row = metric_row(res, time.perf_counter() - t0)
    print(f"{name}: {res.summary()}", flush=True)
    return row, res


#: The table columns of a metric_row's P and terms (each benchmark adds its own around them).
METRIC_HEADER = f"{'P':>8}{'CCC_VA':>8}{'F1_EXPR':>9}{'F1_AU':>8}"


def metric_cells(r: dict) -> str:
    """A :func:`metric_row`'s P and terms under :data:`METRIC_HEADER`."""
    return f"{r['P']:>8.4f}{r['ccc_va']:>8.4f}{r['f1_expr']:>9.4f}{r['f1_au']:>8.4f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--override", "-o", action="append", default=[], help="applied to every recipe")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    root, store, train, val, base = data_and_baseline(args)
    result: dict = {"baseline_P": base.P, "data": str(root), "recipes": {}}
    if args.prepare_only:
        return result
    for name in args.recipes:
        row, _ = train_row(name, config_path(name), store, train, val, args.override)
        row["ratio"] = row["P"] / base.P if base.P > 0 else float("inf")
        result["recipes"][name] = row
    ranked = sorted(result["recipes"].items(), key=lambda kv: -kv[1]["P"])
    print(f"\n{'rank':<5}{'recipe':<14}{METRIC_HEADER}{'x base':>8}{'train s':>9}")
    for i, (name, r) in enumerate(ranked, 1):
        print(f"{i:<5}{name:<14}{metric_cells(r)}{r['ratio']:>8.2f}{r['seconds']:>9.1f}")
    print(f"constant baseline P = {base.P:.4f}; target: every recipe >= {1.5 * base.P:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
