"""The application pipeline: speed, peak memory against video length, and the default model's accuracy.

- speed: frames/s of ``Predictor.predict`` (decode, detection/tracking, alignment, backbone, heads, table)
  on a generated 640x480, 25 fps, one-face video, for several settings (full detection on every frame,
  ``detect_every``, ``every``). Model loading is excluded; the first (warm-up) pass is not timed.
- memory: peak RSS (``VmHWM``) of a fresh process predicting a generated video of each length; flat
  in length means streaming works. Videos are made procedurally (a moving face over a backdrop,
  H.264 "ultrafast"), cached in ``--cache``.
- landmarks: frames/s with the face landmarker (``landmarks`` compact, dense) and without it (none),
  alternated on the speed video; its cost in % of frames/s (the bar: at most 25% with one face).
- smile: the embedded default model on the 13,165 real faces of ../shared/data/smilesmiled (64x64
  face crops read from the tar, never extracted): AUROC of P(Happiness) and P(AU12) for smile vs not.

Run: ``python benchmarks/bench_predict.py [--what speed,landmarks,memory,smile] [--seconds 12]
[--minutes 0.5,1,2] [--memory-every 1]``; ``--minutes 1,3,10`` is the full memory measurement.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

HERE = Path(__file__).resolve().parent
SMILE = HERE.parents[1] / "shared" / "data" / "smilesmiled"


def long_video(path: Path, seconds: float, fps: int = 25) -> Path:
    """A cheap long 640x480 one-face video: the demo face sliding over the backdrop (cached)."""
    if path.is_file():
        return path
    from mtaffect.predict import demo_media

    patch, alpha = demo_media.face_patch()
    bg = demo_media.background()
    side = 240
    # Pre-render 50 poses once; the video cycles through them (encoding is the only per-frame cost).
    poses = []
    for k in range(50):
        canvas = bg.copy()
        cx = 320 + 150 * np.sin(2 * np.pi * k / 50)
        demo_media._paste(canvas, patch, alpha, cx, 240 + 20 * np.cos(2 * np.pi * k / 50), side)
        poses.append(canvas)
    n = round(seconds * fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    return demo_media.write_video(path, (poses[i % 50] for i in range(n)), fps=fps, crf=30)


def bench_speed(seconds: float, settings: list[dict]) -> list[dict]:
    from mtaffect.predict import demo_media
    from mtaffect.predict.pipeline import Predictor, streaming_threads

    with tempfile.TemporaryDirectory() as d:
        video = demo_media.make_demo_video(Path(d) / "one.mp4", seconds=seconds, faces=1)
        out = []
        for s in settings:
            p = Predictor(num_threads=streaming_threads(), **s)  # as `mtaffect predict` runs it
            p.predict(np.stack(list(demo_media.frames(16, 1))))  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            df = p.predict(video)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            frames = df["frame"].nunique()
            out.append(
                {
                    "settings": s,
                    "video_frames": round(seconds * 25),
                    "analysed_frames": int(frames),
                    "seconds": round(dt, 2),
                    # CPU seconds of all the process's threads: on a busy shared machine, frames per
                    # CPU-second shows what the pipeline costs independently of the other load.
                    "cpu_seconds": round(cpu, 2),
                    "analysed_frames_per_cpu_s": round(frames / cpu, 1),
                    "analysed_frames_per_s": round(frames / dt, 1),
                    "video_frames_per_s": round(round(seconds * 25) / dt, 1),
                    "face_rows": int((df["success"] == 1).sum()),
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def bench_landmarks(seconds: float, repeats: int = 3) -> dict:
    """The landmarker's cost: frames/s with ``landmarks`` compact (the default), dense and none on the speed
    video, the settings alternated ``repeats`` times (a busy machine slows all of them alike); the
    median of each and the cost in % of the frames/s without the landmarker."""
    modes = ("none", "compact", "dense")
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            runs[m].append(bench_speed(seconds, [{"landmarks": m}])[0]["analysed_frames_per_s"])
    median = {m: float(np.median(v)) for m, v in runs.items()}
    out = {
        "frames_per_s": runs,
        "median_frames_per_s": median,
        "cost_pct": {m: round(100 * (1 - median[m] / median["none"]), 1) for m in ("compact", "dense")},
    }
    print(json.dumps(out), flush=True)
    return out


def _rss_child(video: str, every: int, detect_every: int) -> None:
    """Child process: predict ``video`` and print peak RSS (its own, from /proc)."""
    import resource

    from mtaffect.predict.pipeline import Predictor

    t0 = time.perf_counter()
    df = Predictor(every=every, detect_every=detect_every).predict(video)
    dt = time.perf_counter() - t0
    hwm = None
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(hwm or ru, 1), "rows": len(df), "seconds": round(dt, 1)}))


def bench_memory(minutes: list[float], cache: Path, every: int, detect_every: int) -> list[dict]:
    out = []
    for m in minutes:
        video = long_video(cache / f"long_{m:g}min.mp4", 60 * m)
        cmd = [
            sys.executable,
            __file__,
            "--rss-child",
            str(video),
            "--memory-every",
            str(every),
            "--memory-detect-every",
            str(detect_every),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(next(ln for ln in res.stdout.splitlines() if "peak_rss_mb" in ln))
        r.update({"minutes": m, "every": every, "detect_every": detect_every})
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def load_smile(data: Path = SMILE) -> tuple[np.ndarray, np.ndarray]:
    """All labelled SMILEsmileD faces as uint8 (N, 64, 64) greyscale and labels (N,)."""
    from PIL import Image, ImageFile

    with open(data / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = np.empty((len(rows), 64, 64), np.uint8)
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # one JPEG of the set is cut short
    try:
        with tarfile.open(data / "smilesmiled_images.tar") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for i, r in enumerate(rows):
                with Image.open(io.BytesIO(tar.extractfile(members[r["path"]]).read())) as im:
                    im = im.convert("L")
                    if im.size != (64, 64):
                        im = im.resize((64, 64), Image.Resampling.BILINEAR)
                    images[i] = np.asarray(im)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return images, np.array([int(r["smile"]) for r in rows])


def bench_smile() -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from mtaffect.features.registry import create_backbone
    from mtaffect.models.default import DefaultAffectModel
    from mtaffect.schema import AU_NAMES, EXPR_NAMES

    if not (SMILE / "smilesmiled_images.tar").is_file():
        return {"skipped": f"{SMILE} not found"}
    images, y = load_smile()
    bb, model = create_backbone("fer-minixception"), DefaultAffectModel()
    expr, au = [], []
    with torch.inference_mode():
        for s in range(0, len(images), 512):
            o = bb(bb.preprocess(images[s : s + 512]))
            res = model.predict(o.features, o.logits)
            expr.append(res.expr_probs)
            au.append(res.au_probs)
    expr, au = np.concatenate(expr), np.concatenate(au)
    happy = expr[:, EXPR_NAMES.index("Happiness")]
    au12 = au[:, AU_NAMES.index("AU12")]
    au6 = au[:, AU_NAMES.index("AU6")]
    label = expr.argmax(1) == EXPR_NAMES.index("Happiness")
    au12_c = au12 >= model.au_thresholds[AU_NAMES.index("AU12")]
    out = {
        "n": len(y),
        "positives": int(y.sum()),
        "happiness_auroc": round(float(roc_auc_score(y, happy)), 4),
        "au12_auroc": round(float(roc_auc_score(y, au12)), 4),
        "au6_auroc": round(float(roc_auc_score(y, au6)), 4),
        "happiness_label_tpr": round(float(label[y == 1].mean()), 3),
        "happiness_label_fpr": round(float(label[y == 0].mean()), 3),
        "au12_c_tpr": round(float(au12_c[y == 1].mean()), 3),
        "au12_c_fpr": round(float(au12_c[y == 0].mean()), 3),
        "other_share": round(float((expr.argmax(1) == EXPR_NAMES.index("Other")).mean()), 3),
    }
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="speed,landmarks,memory,smile")
    ap.add_argument("--seconds", type=float, default=12.0, help="length of the speed video")
    ap.add_argument("--minutes", default="0.5,1,2", help="video lengths for the memory test")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs per landmarker setting")
    ap.add_argument("--memory-every", type=int, default=1)
    ap.add_argument("--memory-detect-every", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mtaffect_bench_predict")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        _rss_child(args.rss_child, args.memory_every, args.memory_detect_every)
        return {}
    import torch

    what = {w.strip() for w in args.what.split(",")}
    result: dict = {"name": "predict", "cpu_threads": torch.get_num_threads()}
    if "speed" in what:
        settings = [
            {},
            {"min_face_size": 48},
            {"detect_every": 5},
            {"every": 5},
            {"every": 5, "detect_every": 5},
        ]
        result["speed"] = bench_speed(args.seconds, settings)
    if "landmarks" in what:
        result["landmarks"] = bench_landmarks(args.seconds, args.repeats)
    if "memory" in what:
        minutes = [float(m) for m in args.minutes.split(",")]
        result["memory"] = bench_memory(minutes, args.cache, args.memory_every, args.memory_detect_every)
    if "smile" in what:
        result["smile"] = bench_smile()
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
