"""Process start to the first training step of a ``mtaffect train``-like process: time, CPU, memory.

A child process imports the CLI (as ``mtaffect train`` does), then trains recipe 4
(``configs/emotinet.yaml``) on a small store (2,000 rows x 1,290 inputs) and, at the first training
batch, reports the wall time since it was started, its CPU seconds and its resident memory. It runs
with the lean Lightning import (default) and with ``MTAFFECT_LEAN_IMPORTS=0`` (Lightning imported
plainly, as before), alternating ``--repeats`` times; with ``--src`` it measures another checkout.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {src!r})
import mtaffect.cli  # what `mtaffect train` imports before the command runs
sys.path.insert(0, {bench!r})
from bench_train import open_with_labels
from mtaffect.train.config import load_config
from mtaffect.train.fit import fit
import lightning as L

class First(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        u = resource.getrusage(resource.RUSAGE_SELF)
        with open({out!r}, "w") as fh:
            json.dump({{"at": time.time(), "cpu_s": u.ru_utime + u.ru_stime, "rss_mb": u.ru_maxrss / 1024,
                        "torchmetrics_optional": [m for m in ("transformers", "matplotlib", "scipy.signal")
                                                  if m in sys.modules]}}, fh)
        raise SystemExit(0)

store, train, val = open_with_labels({store!r}, 1800)
cfg = load_config({config!r}, ["trainer.epochs=1", "trainer.progress=false", "trainer.accelerator=cpu"])
fit(cfg, store, train, val, None, callbacks=[First()], log=None)
"""


def once(src: Path, store: Path, out: Path, lean: bool) -> dict:
    result = out / "first_step.json"
    if result.exists():
        result.unlink()
    script = out / "startup_child.py"
    config = src.parent / "configs" / "emotinet.yaml"
    fields = {"src": str(src), "bench": str(Path(__file__).parent), "store": str(store)}
    script.write_text(CHILD.format(config=str(config), out=str(result), **fields))
    env = {**os.environ, "MTAFFECT_LEAN_IMPORTS": "1" if lean else "0"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(script)], cwd=out, env=env, capture_output=True, text=True)
    if not result.exists():
        raise SystemExit(proc.stderr[-3000:])
    r = json.loads(result.read_text())
    r["seconds"] = r.pop("at") - t0
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="process start to first training step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--src", type=Path, default=REPO / "src")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from bench_train import cached_store

    store = cached_store(args.out / "bench_startup_2000", 2000)
    runs: dict[str, list[dict]] = {"lean": [], "plain": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(once(args.src.resolve(), store, args.out, lean=name == "lean"))
    result: dict = {"src": str(args.src)}
    for name, rs in runs.items():
        result[name] = {
            k: round(statistics.median(r[k] for r in rs), 2) for k in ("seconds", "cpu_s", "rss_mb")
        }
        result[name]["torchmetrics_optional"] = rs[0]["torchmetrics_optional"]
        print(
            f"{name:5s} imports: first training step {result[name]['seconds']:.1f} s after the process "
            f"started, {result[name]['cpu_s']:.1f} CPU-s, {result[name]['rss_mb']:.0f} MB "
            f"(median of {args.repeats}; optional packages imported: "
            f"{result[name]['torchmetrics_optional']})",
            flush=True,
        )
    result["load"] = round(os.getloadavg()[0], 2)
    print(f"(load average {result['load']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
