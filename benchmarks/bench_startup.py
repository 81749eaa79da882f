"""Start-up: process start to the first training step, and the CLI's own start-up (`--help`, its import).

**First training step**: a child process imports the CLI (as ``mtaffect train`` does), then trains
recipe 4 (``configs/emotinet.yaml``) on a small store (2,000 rows x 1,290 inputs) and, at the first
training batch, reports the wall time since it was started, its CPU seconds, its peak resident memory
and which of torchmetrics' optional packages got imported. **CLI**: ``mtaffect --help`` and
``import mtaffect.cli`` in a fresh process, wall time and whether torch / Lightning were imported.

Each tree (``src`` of this checkout, and with ``--src`` another checkout's, e.g. the code before a
change) is measured with what that tree does by default, alternating the trees ``--repeats`` times so
a busy machine weighs on both alike; medians are printed with the load average.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_startup.py --src /path/to/before/src
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

FIRST_STEP = """
import json, resource, sys, time
sys.path.insert(0, {src!r})
import mtaffect.cli  # what `mtaffect train` imports before the command runs
sys.path.insert(0, {bench!r})
from bench_train import open_with_labels
from mtaffect.train.config import load_config
from mtaffect.train.fit import fit
import lightning as L  # already imported by the training modules

class First(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        u = resource.getrusage(resource.RUSAGE_SELF)
        with open({out!r}, "w") as fh:
            json.dump({{"at": time.time(), "cpu_s": u.ru_utime + u.ru_stime, "rss_mb": u.ru_maxrss / 1024,
                        "optional": [m for m in ("transformers", "matplotlib", "scipy.signal")
                                     if m in sys.modules]}}, fh)
        raise SystemExit(0)

store, train, val = open_with_labels({store!r}, 1800)
cfg = load_config({config!r}, ["trainer.epochs=1", "trainer.progress=false", "trainer.accelerator=cpu"])
fit(cfg, store, train, val, None, callbacks=[First()], log=None)
"""

CLI = """
import contextlib, io, json, sys, time
sys.path.insert(0, {src!r})
{body}
print(json.dumps({{"at": time.time(), "heavy": [m for m in ("torch", "lightning") if m in sys.modules]}}))
"""
HELP = """import mtaffect.cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    mtaffect.cli.main(["--help"])"""
IMPORT = "import mtaffect.cli"


def first_step(src: Path, store: Path, out: Path) -> dict:
    """One child process from start to its first training batch."""
    result = out / "first_step.json"
    result.unlink(missing_ok=True)
    script = out / "startup_child.py"
    config = src.parent / "configs" / "emotinet.yaml"
    script.write_text(
        FIRST_STEP.format(
            src=str(src),
            bench=str(Path(__file__).parent),
            store=str(store),
            config=str(config),
            out=str(result),
        )
    )
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(script)], cwd=out, capture_output=True, text=True)
    if not result.exists():
        raise SystemExit(f"{src}: no training step reached (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    r = json.loads(result.read_text())
    r["seconds"] = r.pop("at") - t0
    return r


def cli(src: Path, body: str) -> dict:
    """One fresh process running ``body`` (the CLI's import, or ``--help``): seconds, heavy imports."""
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CLI.format(src=str(src), body=body)], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["seconds"] = r.pop("at") - t0
    return r


def median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="process start to first training step; CLI start-up")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--src", type=Path, default=None, help="another checkout's src/ to compare (e.g. before)")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from bench_train import cached_store

    args.out.mkdir(parents=True, exist_ok=True)
    store = cached_store(args.out / "bench_startup_2000", 2000)
    trees = {"now": (REPO / "src").resolve()}
    if args.src is not None:
        trees = {"other": args.src.resolve(), **trees}
    runs: dict[str, dict[str, list[dict]]] = {n: {"first_step": [], "help": [], "import": []} for n in trees}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, src in trees.items():
            runs[name]["first_step"].append(first_step(src, store, args.out))
            runs[name]["help"].append(cli(src, HELP))
            runs[name]["import"].append(cli(src, IMPORT))
        loads.append(os.getloadavg()[0])
    result: dict = {"repeats": args.repeats, "load": [round(x, 2) for x in loads]}
    for name, src in trees.items():
        r = runs[name]
        fs = r["first_step"]
        result[name] = {
            "src": str(src),
            "first_step": {
                "seconds": median(fs, "seconds"),
                "cpu_s": median(fs, "cpu_s"),
                "rss_mb": median(fs, "rss_mb"),
                "optional": fs[0]["optional"],
                "all_seconds": [round(x["seconds"], 2) for x in fs],
            },
            "help": {"seconds": median(r["help"], "seconds"), "heavy": r["help"][0]["heavy"]},
            "import_cli": {"seconds": median(r["import"], "seconds"), "heavy": r["import"][0]["heavy"]},
        }
        f = result[name]["first_step"]
        print(
            f"{name:5s} ({src}): first training step {f['seconds']:.1f} s after the process started, "
            f"{f['cpu_s']:.1f} CPU-s, {f['rss_mb']:.0f} MB (optional packages imported: {f['optional']}); "
            f"`mtaffect --help` {result[name]['help']['seconds']:.2f} s "
            f"(imports {result[name]['help']['heavy'] or 'no torch/lightning'}); `import mtaffect.cli` "
            f"{result[name]['import_cli']['seconds']:.2f} s; median of {args.repeats}",
            flush=True,
        )
    print(f"(load average during the runs: {result['load']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
