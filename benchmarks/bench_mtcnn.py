"""MTCNN speed on 640x480 frames holding one face: frames per second, detecting in batches.

Frames are a real photo background (``skimage.data.coffee``) with the astronaut's face
(``skimage.data.astronaut``, public domain) pasted at a size and position that drift from frame to
frame, like a talking-head video. After a warm-up batch, ``MTCNN.detect`` is timed on ``--batches``
batches of ``--batch`` frames; the same frames are checked for the pasted face (detection rate, false
positives) so a speed-up that loses faces shows. A second run with a larger ``min_face_size`` shows what
skipping the finest pyramid levels buys.

    python benchmarks/bench_mtcnn.py [--batch 16] [--batches 3] [--threads 1] [--min-face-size 20]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from mtaffect.faces import MTCNN

WIDTH, HEIGHT = 640, 480
#: Face + hair region of the astronaut photo, and the face box inside it (x1, y1, x2, y2).
PATCH = (150, 30, 300, 210)
FACE_IN_PATCH = (31, 32, 118, 142)


def make_frames(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n (480, 640, 3) uint8 frames and the true face box of each (n, 4)."""
    from skimage import data  # dev dependency: the benchmark's public-domain photos

    background = Image.fromarray(data.coffee()).resize((WIDTH, HEIGHT), Image.BILINEAR)
    x0, y0, x1, y1 = PATCH
    patch = Image.fromarray(data.astronaut()[y0:y1, x0:x1])
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi)
    frames, boxes = [], []
    for i in range(n):
        t = phase + i / 12
        scale = 0.8 + 0.25 * np.sin(t / 3)  # face ~70-95 px wide
        pw, ph = round(patch.width * scale), round(patch.height * scale)
        px = round((WIDTH - pw) * (0.5 + 0.4 * np.sin(t)))
        py = round((HEIGHT - ph) * (0.5 + 0.4 * np.cos(0.7 * t)))
        frame = background.copy()
        frame.paste(patch.resize((pw, ph), Image.BILINEAR), (px, py))
        frames.append(np.asarray(frame))
        sx, sy = pw / patch.width, ph / patch.height
        fx1, fy1, fx2, fy2 = FACE_IN_PATCH
        boxes.append([px + fx1 * sx, py + fy1 * sy, px + fx2 * sx, py + fy2 * sy])
    return np.stack(frames), np.asarray(boxes)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (k, 4) with one box b (4,)."""
    lt, rb = np.maximum(a[:, :2], b[:2]), np.minimum(a[:, 2:], b[2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return inter / (area_a + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def time_detector(detector: MTCNN, frames: np.ndarray, batch: int, truth: np.ndarray) -> dict:
    detector.detect(frames[:batch])  # warm-up: oneDNN builds its kernels per shape
    found, false_pos = 0, 0
    start = time.perf_counter()
    for i in range(0, len(frames), batch):
        dets = detector.detect(frames[i : i + batch])
        for det, box in zip(dets, truth[i : i + batch], strict=True):
            hit = _iou(det.boxes, box) > 0.5 if len(det) else np.zeros(0, bool)
            found += int(hit.any())
            false_pos += int((~hit).sum())
    seconds = time.perf_counter() - start
    return {
        "frames_per_s": round(len(frames) / seconds, 2),
        "ms_per_frame": round(1000 * seconds / len(frames), 2),
        "detection_rate": round(found / len(frames), 3),
        "false_positives_per_frame": round(false_pos / len(frames), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="frames per detect() call")
    ap.add_argument("--batches", type=int, default=3, help="timed batches")
    ap.add_argument("--min-face-size", type=float, default=20)
    ap.add_argument("--compare-min-face-size", type=float, default=40, help="second run; 0 skips it")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's setting")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        frames, truth = make_frames(args.batch * args.batches)
        result = {
            "name": "mtcnn_640x480",
            "device": args.device,
            "threads": torch.get_num_threads(),
            # Active OpenMP spin-waiting makes >1 thread many times slower when cores are shared.
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "batch": args.batch,
            "frames": len(frames),
            "min_face_size": args.min_face_size,
            **time_detector(MTCNN(args.device, min_face_size=args.min_face_size), frames, args.batch, truth),
        }
        if args.compare_min_face_size:
            other = MTCNN(args.device, min_face_size=args.compare_min_face_size)
            tag = f"min_face_{args.compare_min_face_size:g}"
            for key, value in time_detector(other, frames, args.batch, truth).items():
                result[f"{key}_{tag}"] = value
    finally:
        torch.set_num_threads(before)
    for key, value in result.items():
        print(f"{key:40s} {value}")
    return result


if __name__ == "__main__":
    main()
