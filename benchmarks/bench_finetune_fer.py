"""Does fine-tuning the embedded backbone pay? ``finetune_fer`` vs frozen ``emotinet``, same synthetic split.

Both use recipe 4's heads on fer-minixception (pooled 128-d features + 7 logits):

- **frozen emotinet**: ``configs/emotinet.yaml`` on a feature store extracted once (the store path);
- **finetune_fer**: ``configs/finetune_fer.yaml`` from the images, the whole backbone trained with the
  heads (joint), with its light augmentation;

and the constant baseline for scale. Validation P with the official metric; train seconds.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_finetune_fer.py --videos 24 --frames 200
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_finetune_fer.py -o trainer.epochs=8
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_recipes import METRIC_HEADER, add_data_args, data_and_baseline, metric_cells, train_row
from recipe_configs import CONFIG_DIR, config_path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_args(ap)
    ap.add_argument("--override", "-o", action="append", default=[], help="applied to finetune_fer")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    root, store, train, val, base = data_and_baseline(args)
    runs = {
        "frozen emotinet (store)": (config_path("emotinet"), store, []),
        "finetune_fer (images)": (CONFIG_DIR / "finetune_fer.yaml", root, args.override),
    }
    result: dict = {"baseline_P": base.P, "data": str(root), "runs": {}}
    for name, (conf, source, over) in runs.items():
        row, res = train_row(name, conf, source, train, val, over)
        result["runs"][name] = {**row, "epochs": len(res.history), "best_epoch": res.best_epoch}
    print(f"\n{'run':<26}{METRIC_HEADER}{'epochs':>8}{'train s':>9}")
    for name, r in result["runs"].items():
        print(f"{name:<26}{metric_cells(r)}{r['epochs']:>8}{r['seconds']:>9.1f}")
    print(f"constant baseline P = {base.P:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
