"""`mtaffect predict` over many files: one process against ``--workers N``, end to end.

Eight short one-face videos (640x480, 25 fps, 3-8 s each, 38 s and 950 frames in all, made from the
public-domain astronaut photo) are run by the command a user types, in a subprocess, into a fresh
output folder:

- ``classic``: ``mtaffect predict DIR`` (one table for the folder, one process);
- ``workers=N``: ``mtaffect predict DIR --per-file --workers N`` (per-file tables; N=1 runs the files in
  the process itself, N>1 in N worker processes).

Reported per run: wall seconds from the command's start to its exit (model loading and worker start-up
included), frames/s over that wall time, and (per-file runs) the seconds the files' jobs took, summed
over files (their job records), and the thread arithmetic the run printed. Run:
``python benchmarks/bench_predict_workers.py [--workers 1,2] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SECONDS = (3, 4, 5, 6, 8, 3, 4, 5)  # unequal lengths: what longest-first scheduling is for


def videos(folder: Path) -> Path:
    """The eight videos (made once, cached)."""
    from mtaffect.predict import demo_media

    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(SECONDS):
        path = folder / f"session{i}.mp4"
        if not path.exists():
            demo_media.make_demo_video(path, seconds=s, faces=1)
    return folder


def _mtaffect() -> list[str]:
    exe = Path(sys.executable).parent / "mtaffect"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from mtaffect.cli import app; app()"]


def run_once(folder: Path, extra: list[str]) -> dict:
    from mtaffect.predict.claims import RECORDS_DIR

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*_mtaffect(), "predict", str(folder), "--out", str(out), "--quiet", *extra],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        records = [json.loads(p.read_text()) for p in (out / RECORDS_DIR).glob("*.json")]
        frames = sum(int(r.get("frames") or 0) for r in records)
        busy = sum(float(r.get("seconds") or 0) for r in records)
        if not records:  # the classic table: count its frames
            import pandas as pd

            table = pd.read_csv(out / f"{folder.name}.csv", usecols=["file", "frame"])
            frames = int(table.drop_duplicates().shape[0])
        note = next((line for line in proc.stderr.splitlines() if "worker(s) x" in line), "")
    return {
        "wall_s": round(wall, 2),
        "frames": frames,
        "frames_per_s": round(frames / wall, 1),
        "file_seconds": round(busy, 2),
        "threads": note.removeprefix("note: "),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mtaffect_bench_archive")
    args = ap.parse_args(argv)
    folder = videos(args.cache)
    result: dict = {"name": "predict_workers", "cores": os.cpu_count()}
    result["load_average_before"] = os.getloadavg()
    runs = {"classic": []}
    runs.update({f"workers={n}": ["--per-file", "--workers", n] for n in args.workers.split(",")})
    rows = []
    for label, extra in runs.items():
        reps = [run_once(folder, list(extra)) for _ in range(args.repeats)]
        row = {
            "run": label,
            **reps[-1],
            "wall_s": [r["wall_s"] for r in reps],
            "frames_per_s": [r["frames_per_s"] for r in reps],
            "median_frames_per_s": statistics.median(r["frames_per_s"] for r in reps),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    result["runs"] = rows
    result["load_average_after"] = os.getloadavg()
    return result


if __name__ == "__main__":
    main()
