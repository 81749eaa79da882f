"""Python API vs CLI: frames/s of ``Predictor().predict(video)`` and ``mtaffect predict video`` in one run.

Both run in fresh processes on the same generated 640x480, 25 fps one-face video, alternately
(API, CLI, API, CLI, ...), with the environment as a user has it: ``OMP_WAIT_POLICY`` removed, so the
API gets nothing the CLI sets for itself before torch is imported. The API process does exactly what
the README shows (``Predictor().predict(path)``, no settings); the rate counts analysed frames over
the predict call (model loading excluded, as the CLI's printed rate excludes it).

Run: ``python benchmarks/bench_api_cli.py [--seconds 12] [--repeats 3] [--detect-every 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

API_CHILD = """
import sys, time
from mtaffect import Predictor
kw = {"num_threads": None} if sys.argv[3] == "torch-default" else {}
p = Predictor(detect_every=int(sys.argv[2]), **kw)
t0 = time.perf_counter()
df = p.predict(sys.argv[1])
dt = time.perf_counter() - t0
print("API_RATE", df["frame"].nunique() / dt)
"""


def _env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    return env


def run_api(video: Path, detect_every: int, threads: str = "auto") -> float:
    res = subprocess.run(
        [sys.executable, "-c", API_CHILD, str(video), str(detect_every), threads],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    return float(next(ln for ln in res.stdout.splitlines() if ln.startswith("API_RATE")).split()[1])


def run_cli(video: Path, detect_every: int, out: Path) -> float:
    exe = Path(sys.executable).with_name("mtaffect")
    cmd = [
        str(exe),
        "predict",
        str(video),
        "--out",
        str(out),
        "--quiet",
        "--overwrite",
        "--detect-every",
        str(detect_every),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_env())
    m = re.search(r"([\d.]+) frames/s", res.stdout)
    if m is None:
        raise RuntimeError(f"no rate in the CLI's output: {res.stdout!r} {res.stderr!r}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detect-every", type=int, default=1)
    ap.add_argument(
        "--torch-default",
        action="store_true",
        help="also time the API with num_threads=None (torch's own thread count: the behaviour before)",
    )
    args = ap.parse_args(argv)
    from mtaffect.predict import demo_media

    with tempfile.TemporaryDirectory() as d:
        video = demo_media.make_demo_video(Path(d) / "one.mp4", seconds=args.seconds, faces=1)
        api, cli, old = [], [], []
        for _ in range(args.repeats):
            api.append(run_api(video, args.detect_every))
            cli.append(run_cli(video, args.detect_every, Path(d) / "out"))
            line = f"API {api[-1]:.1f} frames/s, CLI {cli[-1]:.1f} frames/s"
            if args.torch_default:
                old.append(run_api(video, args.detect_every, "torch-default"))
                line += f", API with torch's default threads {old[-1]:.1f} frames/s"
            print(line, flush=True)
    a, c = statistics.median(api), statistics.median(cli)
    result = {
        "name": "api_cli",
        "seconds": args.seconds,
        "detect_every": args.detect_every,
        "api_frames_per_s": [round(x, 1) for x in api],
        "cli_frames_per_s": [round(x, 1) for x in cli],
        "median_ratio_api_over_cli": round(a / c, 3),
        "api_torch_default_threads_frames_per_s": [round(x, 1) for x in old],
        "load_1min": os.getloadavg()[0],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
