"""``mtaffect predict`` with the PyTorch engine vs the onnxruntime engine, in one run.

The embedded default model is exported once (``mtaffect export``, float32); then the CLI runs on the same
generated 640x480, 25 fps one-face video in fresh processes, alternately (torch, onnxruntime, torch, ...),
``--repeats`` times per detection setting (every frame, and ``--detect-every 5``). Figures: frames/s as
the CLI prints it (analysed frames over the predict loop, model loading excluded), the whole process's
wall time (start-up and model loading included) and its peak memory (max RSS); whether the onnxruntime
process imported torch at all. The tables of the last run of each engine are compared (same faces, same
ids, max |difference| of probabilities and VA).

    python benchmarks/bench_engines.py [--seconds 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from mtaffect.cli import app
sys.argv = ["mtaffect", *sys.argv[1:]]
try:
    app()
except SystemExit as e:
    if e.code:
        raise
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across exec
print("MAXRSS_KB", next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))
print("TORCH_LOADED", "torch" in sys.modules)
"""


def run_cli(video: Path, out: Path, engine: str, export: Path, detect_every: int) -> dict:
    args = [
        "predict",
        str(video),
        "--out",
        str(out),
        "--quiet",
        "--overwrite",
        "--detect-every",
        str(detect_every),
        "--engine",
        engine,
    ]
    if engine == "onnxruntime":
        args += ["--model", str(export), "--precision", "float32"]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    rate = re.search(r"([\d.]+) frames/s", res.stdout)
    rss = re.search(r"MAXRSS_KB (\d+)", res.stdout)
    if rate is None or rss is None:
        raise RuntimeError(f"unexpected CLI output: {res.stdout!r} {res.stderr!r}")
    return {
        "fps": float(rate.group(1)),
        "process_s": round(wall, 2),
        "max_rss_mb": round(int(rss.group(1)) / 1024),
        "torch_loaded": "TORCH_LOADED True" in res.stdout,
    }


def compare(a: Path, b: Path) -> dict:
    import numpy as np

    from mtaffect.predict.outputs import read_table
    from mtaffect.schema import AU_PROB_COLUMNS, EXPR_PROB_COLUMNS, VA_NAMES

    x, y = read_table(a), read_table(b)
    keys = ["frame", "face_id", "success"]
    same = len(x) == len(y) and bool((x[keys].to_numpy() == y[keys].to_numpy()).all())
    cols = [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, *VA_NAMES]
    ok = (x["success"] == 1).to_numpy()
    diff = float(np.abs(x.loc[ok, cols].to_numpy() - y.loc[ok, cols].to_numpy()).max()) if same else None
    return {"same_faces_and_ids": same, "max_abs_diff_probs_va": diff}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="video length (25 frames/s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine and detection setting")
    args = ap.parse_args(argv)
    from mtaffect.export.exporter import export_model
    from mtaffect.predict import demo_media

    result: dict = {"name": "predict_engines", "video": f"640x480, 25 fps, one face, {args.seconds:g} s"}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        video = demo_media.make_demo_video(d / "one.mp4", seconds=args.seconds, faces=1)
        t0 = time.perf_counter()
        export_model("default", d / "export")
        result["export_seconds"] = round(time.perf_counter() - t0, 1)
        for every in (1, 5):
            runs: dict[str, list[dict]] = {"torch": [], "onnxruntime": []}
            for _ in range(args.repeats):
                for engine in runs:
                    runs[engine].append(run_cli(video, d / engine, engine, d / "export", every))
                print(
                    f"detect_every {every}: "
                    + ", ".join(f"{e} {r[-1]['fps']:.1f} frames/s" for e, r in runs.items()),
                    flush=True,
                )
            row = {}
            for engine, rs in runs.items():
                row[engine] = {
                    "fps_runs": [r["fps"] for r in rs],
                    "fps_median": statistics.median(r["fps"] for r in rs),
                    "process_s_median": statistics.median(r["process_s"] for r in rs),
                    "max_rss_mb": max(r["max_rss_mb"] for r in rs),
                    "torch_loaded": any(r["torch_loaded"] for r in rs),
                }
            row["onnxruntime_over_torch"] = round(
                row["onnxruntime"]["fps_median"] / row["torch"]["fps_median"], 2
            )
            row["tables"] = compare(d / "torch" / "one.csv", d / "onnxruntime" / "one.csv")
            result[f"detect_every_{every}"] = row
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
