"""Peak memory per process of a DDP training: 2 ranks (CPU, gloo) against 1 process, same data.

A store of ``--rows`` rows x 1,290 inputs (1,280 features + 10 logits, float16; 90 % train, 10 %
validation, random labels) is written once; recipe 4 (``configs/emotinet.yaml``) trains one epoch
per stage, in memory (the default), once in one process and once as 2 DDP processes started by
Lightning's launcher. Every process reports its peak resident memory (``ru_maxrss``, which counts the
store's file pages it touched: shared page cache), its private (anonymous) resident memory at the end
of training and the bytes of inputs it holds; with ``--src`` the same measurement runs against another
checkout's ``src`` (e.g. the code before this change, to get the "before" column).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_ddp_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {src!r})
sys.path.insert(0, {bench!r})
from bench_train import open_with_labels
from mtaffect.train.config import load_config
from mtaffect.train.fit import fit

t0 = time.perf_counter()
store, train, val = open_with_labels({store!r}, {train_rows})
over = ["trainer.epochs=1", "trainer.patience=0", "trainer.progress=false", "data.batch_size=4096",
        "trainer.accelerator=cpu"]
if {world} > 1:
    over += ["trainer.devices={world}", "trainer.strategy=ddp"]
cfg = load_config({config!r}, over)
held = {{}}
import lightning as L

class Held(L.Callback):
    def on_train_start(self, trainer, module):
        src = trainer.datamodule.source
        held["bytes"] = int(src.nbytes(4 if str(src.dtype).endswith("32") else 2)) if src.in_memory else 0

fit(cfg, store, train, val, None, callbacks=[Held()], log=None)
rank = int(os.environ.get("LOCAL_RANK", 0))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
anon = int(status.get("RssAnon", "0 kB").split()[0]) / 1024
with open(os.path.join({out!r}, f"rss_{{rank}}.json"), "w") as fh:
    json.dump({{"rank": rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "anon_rss_mb_at_end": anon, "inputs_held_mb": held.get("bytes", 0) / 2**20,
               "seconds": time.perf_counter() - t0}}, fh)
"""


def run(src: Path, store: Path, train_rows: int, world: int, out: Path) -> list[dict]:
    from recipe_configs import config_path

    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rss_*.json"):
        f.unlink()
    script = out / "child.py"
    fields = {
        "src": str(src),
        "bench": str(Path(__file__).parent),
        "store": str(store),
        "world": world,
        "train_rows": train_rows,
    }
    config = src.parent / "configs" / "emotinet.yaml"  # the checkout's own config
    config = config if config.is_file() else config_path("emotinet")
    script.write_text(CHILD.format(config=str(config), out=str(out), **fields))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, str(script)], cwd=out, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads(f.read_text()) for f in sorted(out.glob("rss_*.json"))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="peak RSS per rank: 2 DDP ranks vs 1 process")
    ap.add_argument("--rows", type=int, default=142_000)
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the mtaffect sources to measure")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from bench_train import cached_store

    store = cached_store(args.out / f"bench_ddp_memory_{args.rows}", args.rows)
    result: dict = {"rows": args.rows, "src": str(args.src)}
    for world in (1, 2):
        t0 = time.perf_counter()
        train_rows = args.rows * 9 // 10
        ranks = run(args.src.resolve(), store, train_rows, world, args.out / f"bench_ddp_memory_run{world}")
        result[f"world{world}"] = ranks
        for r in ranks:
            print(
                f"{world} process(es), rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(file pages of the store included), private {r['anon_rss_mb_at_end']:.0f} MB at the end, "
                "inputs held "
                f"{r['inputs_held_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    result["load"] = round(os.getloadavg()[0], 2)
    print(f"(load average {result['load']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
