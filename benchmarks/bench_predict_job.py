"""Long `predict` jobs and temporal checkpoints: what resumability and track windows cost.

- job: frames/s of ``Predictor.predict`` (rows kept in memory) against ``predict_to_file`` (the CLI's
  path: rows appended to the partial CSV as they are produced, the table read back, post-processed and
  written atomically at the end), on the same generated 640x480, 25 fps one-face video.
- resume: the job interrupted half-way, then resumed: seconds of the resumed run, and the rate at which
  the frames before the resume point are skipped (decoded, not converted nor analysed).
- temporal: frames/s of a per-frame checkpoint (recipe 4 heads) against a temporal one (recipe 3 with
  an LSTM over windows of 30 frames, as configs/progressive.yaml), centred and causal; random-init
  weights (speed does not depend on them).

Run: ``python benchmarks/bench_predict_job.py [--what job,resume,temporal] [--seconds 20] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_predict import long_video  # same folder


def _predictor(**kw):
    from mtaffect.predict.pipeline import Predictor, streaming_threads

    return Predictor(num_threads=streaming_threads(), **kw)  # as `mtaffect predict` runs it


def _warm(p) -> None:
    import numpy as np

    from mtaffect.predict import demo_media

    p.predict(np.stack(list(demo_media.frames(16, 1))), fps=25)


def bench_job(video: Path, repeats: int, settings: list[dict]) -> list[dict]:
    from mtaffect.predict.job import predict_to_file

    out = []
    for s in settings:
        p = _predictor(**s)
        _warm(p)
        mem, job = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            n = p.predict(video)["frame"].nunique()
            mem.append(n / (time.perf_counter() - t0))
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                res = predict_to_file(p, video, Path(d) / f"t{r}.csv")
                job.append(res[0].analysed / (time.perf_counter() - t0))
        row = {
            "settings": s,
            "frames": int(n),
            "in_memory_frames_per_s": [round(x, 1) for x in mem],
            "job_frames_per_s": [round(x, 1) for x in job],
            "job_vs_memory": round(statistics.median(job) / statistics.median(mem), 3),
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def bench_resume(video: Path) -> dict:
    from mtaffect.predict.job import predict_to_file
    from mtaffect.predict.sources import VideoSource

    p = _predictor()
    _warm(p)
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "t.csv"
        t0 = time.perf_counter()
        total = predict_to_file(p, video, Path(d) / "full.csv")[0].analysed
        full = time.perf_counter() - t0
        seen = []

        def stop_half(n: int) -> None:
            seen.append(n)
            if sum(seen) >= total // 2:
                raise KeyboardInterrupt

        t0 = time.perf_counter()
        with contextlib.suppress(KeyboardInterrupt):
            predict_to_file(p, video, target, progress=stop_half)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict_to_file(p, video, target)
        second = time.perf_counter() - t0
    src = VideoSource(video)
    src.after = total - 2  # decode-skip everything but the last frame
    t0 = time.perf_counter()
    sum(1 for _ in src)
    skip_rate = (total - 1) / (time.perf_counter() - t0)
    row = {
        "frames": total,
        "uninterrupted_s": round(full, 2),
        "interrupted_at_half_s": round(first, 2),
        "resumed_s": round(second, 2),
        "interrupted_plus_resumed_vs_uninterrupted": round((first + second) / full, 3),
        "skipped_frames_per_s": round(skip_rate, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def bench_temporal(video: Path, settings: dict) -> list[dict]:
    import torch

    from mtaffect.features.registry import create_backbone
    from mtaffect.models.checkpoint import save_checkpoint
    from mtaffect.models.registry import create_model

    spec = create_backbone("fer-minixception").spec
    backbone = {"name": "fer-minixception", "spec": {"name": spec.name}, "fingerprint": spec.fingerprint()}
    out = []
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        models = {
            "emotinet (per frame)": (
                create_model("emotinet", feature_dim=spec.feature_dim, num_logits=spec.num_logits),
                1,
            ),
            "progressive + lstm, window 30": (
                create_model("progressive", feature_dim=spec.feature_dim, temporal="lstm"),
                30,
            ),
        }
        for name, (model, window) in models.items():
            path = save_checkpoint(
                Path(d) / name.split()[0],
                model.eval(),
                backbone=backbone,
                feature_dim=spec.feature_dim,
                num_logits=spec.num_logits,
                window=window,
            )
            for mode in ("centred", "causal") if window > 1 else ("-",):
                p = _predictor(model=path, temporal=mode if window > 1 else "centred", **settings)
                _warm(p)
                t0 = time.perf_counter()
                n = p.predict(video)["frame"].nunique()
                row = {
                    "model": name,
                    "mode": mode,
                    "settings": settings,
                    "frames_per_s": round(n / (time.perf_counter() - t0), 1),
                }
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="job,resume,temporal")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mtaffect_bench_videos")
    args = ap.parse_args(argv)
    what = set(args.what.split(","))
    video = long_video(args.cache / f"job_{args.seconds:g}s.mp4", args.seconds)
    result: dict = {"name": "predict_job", "video": str(video), "load_average_before": os.getloadavg()}
    print(json.dumps({"load_average": result["load_average_before"], "video": str(video)}), flush=True)
    if "job" in what:
        result["job"] = bench_job(video, args.repeats, [{}, {"detect_every": 5}])
    if "resume" in what:
        result["resume"] = bench_resume(video)
    if "temporal" in what:
        result["temporal"] = bench_temporal(video, {"detect_every": 5})
    result["load_average_after"] = os.getloadavg()
    print(json.dumps({"load_average": result["load_average_after"]}), flush=True)
    return result


if __name__ == "__main__":
    main()
