"""Demo and test videos made from a public-domain photo: no download, no licence question.

The face is the astronaut portrait shipped with scikit-image (``skimage.data.astronaut()``: Eileen
Collins, NASA, public domain). It is cut out with a soft elliptical mask and composited, moving and
changing scale, over a procedural background; a second face (the same photo mirrored and tinted) makes
the two-face variant. Videos are written with PyAV (H.264 when available), optionally with a variable
frame rate (irregular timestamps). :func:`frames` generates frames lazily, so a 10-minute video costs
no memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from mtaffect.io import atomic_path
from mtaffect.predict.video_out import add_video_stream

WIDTH, HEIGHT, FPS = 640, 480, 25
#: Square around the astronaut's face in the 512x512 photo (MTCNN finds the face at about
#: x 178-267, y 62-175), with hair and collar: x0, y0, side.
FACE_CROP = (112, 8, 220)


def _require_skimage():
    try:
        from skimage import data
    except ImportError as e:  # scikit-image is a dev/demo dependency
        raise ImportError("demo media need scikit-image: pip install scikit-image") from e
    return data


@lru_cache(maxsize=2)
def face_patch(mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The face cut-out (S, S, 3) uint8 and its soft alpha mask (S, S) float32 in [0, 1]."""
    img = _require_skimage().astronaut()
    x0, y0, side = FACE_CROP
    patch = img[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
    if mirror:  # a second identity: mirrored, warmer and darker
        patch = patch[:, ::-1] * np.array([1.0, 0.85, 0.7], np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    r = np.sqrt(((xx - side / 2) / (0.46 * side)) ** 2 + ((yy - side / 2) / (0.5 * side)) ** 2)
    alpha = np.clip((1.0 - r) / 0.12, 0.0, 1.0)
    return np.clip(patch, 0, 255).astype(np.uint8), alpha


@lru_cache(maxsize=4)
def background(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """A smooth procedural backdrop (uint8 RGB): gradients and soft blobs, no face-like structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.empty((height, width, 3), np.float32)
    for c, base in enumerate((70, 110, 140)):
        bg[..., c] = base + 40 * xx / width - 25 * yy / height
    for _ in range(6):
        cx, cy, s = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 140)
        col = rng.uniform(-40, 40, 3)
        bg += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None] * col
    return np.clip(bg, 0, 255).astype(np.uint8)


def _paste(canvas: np.ndarray, patch: np.ndarray, alpha: np.ndarray, cx: float, cy: float, side: int) -> None:
    """Composite ``patch`` scaled to ``side`` pixels, centred at (cx, cy), clipped to the canvas."""
    p = np.asarray(Image.fromarray(patch).resize((side, side), Image.Resampling.BILINEAR), np.float32)
    a = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).resize((side, side)), np.float32) / 255
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    h, w = canvas.shape[:2]
    xs, ys = max(0, -x0), max(0, -y0)
    xe, ye = min(side, w - x0), min(side, h - y0)
    if xe <= xs or ye <= ys:
        return
    region = canvas[y0 + ys : y0 + ye, x0 + xs : x0 + xe].astype(np.float32)
    aa = a[ys:ye, xs:xe, None]
    canvas[y0 + ys : y0 + ye, x0 + xs : x0 + xe] = (aa * p[ys:ye, xs:xe] + (1 - aa) * region).astype(np.uint8)


def _away(t: float, span: tuple[float, float] | None, ramp: float = 0.5) -> float:
    """0 in view, 1 out of view: slides out over ``ramp`` s from span[0], back in by span[1]."""
    if span is None:
        return 0.0
    a, b = span
    return float(np.clip(min(t - a, b - t) / ramp, 0.0, 1.0))


def frames(
    n: int,
    faces: int = 1,
    width: int = WIDTH,
    height: int = HEIGHT,
    fps: float = FPS,
    away: tuple[float, float] | None = None,
) -> Iterator[np.ndarray]:
    """``n`` frames (uint8 RGB) with 0, 1 or 2 faces moving smoothly; faces never cross.

    ``away=(t0, t1)``: the first face slides out of the picture at ``t0`` seconds and back by ``t1`` (shows
    frames without that face, and a new id when it returns after the tracker forgot it).
    """
    if faces not in (0, 1, 2):
        raise ValueError(f"faces must be 0, 1 or 2, got {faces}")
    bg = background(width, height)
    patches = [face_patch(False), face_patch(True)][:faces]
    for i in range(n):
        t = i / fps
        canvas = bg.copy()
        for k, (patch, alpha) in enumerate(patches):
            if faces == 1:
                cx = width / 2 + 0.25 * width * math.sin(2 * math.pi * t / 4.0)
                cy = height / 2 + 0.08 * height * math.sin(2 * math.pi * t / 2.7)
                side = int(min(width, height) * (0.55 + 0.12 * math.sin(2 * math.pi * t / 3.1)))
            else:  # two lanes: left and right halves
                cx = width * (0.27 + 0.46 * k) + 0.06 * width * math.sin(2 * math.pi * t / 3.0 + k)
                cy = height / 2 + 0.1 * height * math.sin(2 * math.pi * t / 2.3 + 2 * k)
                side = int(min(width, height) * (0.42 + 0.05 * math.sin(2 * math.pi * t / 2.9 + k)))
            if k == 0:
                cx -= _away(t, away) * (cx + side)  # out over the left edge, never across the other face
            _paste(canvas, patch, alpha, cx, cy, side)
        yield canvas


def write_video(
    out: str | os.PathLike,
    images,
    fps: float = FPS,
    times: list[float] | None = None,
    codec: str | None = None,
    overwrite: bool = False,
    crf: int = 23,
) -> Path:
    """Encode uint8 RGB frames to a video file (atomically). ``times`` (seconds) makes it variable-rate."""
    import av

    out = Path(out)
    with atomic_path(out, overwrite=overwrite) as tmp:
        fmt = {".mp4": "mp4", ".mkv": "matroska", ".avi": "avi", ".mov": "mov"}.get(out.suffix.lower(), "mp4")
        with av.open(str(tmp), "w", format=fmt) as c:
            rate = Fraction(fps).limit_denominator(1001)
            s = add_video_stream(c, codec, rate, crf=crf)
            tb = Fraction(1, 1000) if times is not None else 1 / rate
            s.codec_context.time_base = tb
            first = True
            for i, img in enumerate(images):
                if first:
                    s.width, s.height = img.shape[1], img.shape[0]
                    first = False
                fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                fr.pts = round(times[i] * 1000) if times is not None else i
                fr.time_base = tb
                for pkt in s.encode(fr):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    return out


def make_demo_video(
    out: str | os.PathLike,
    seconds: float = 4.0,
    faces: int = 1,
    fps: float = FPS,
    overwrite: bool = False,
    width: int = WIDTH,
    height: int = HEIGHT,
    away: tuple[float, float] | None = None,
) -> Path:
    """The demo clip: ``seconds`` of 640x480 at ``fps`` with 0, 1 or 2 faces; see :func:`frames`."""
    n = max(1, round(seconds * fps))
    return write_video(out, frames(n, faces, width, height, fps, away), fps=fps, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """``python -m mtaffect.predict.demo_media OUT.mp4 [--seconds S] [--faces K] [--away T0 T1]
    [--overwrite]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Write a demo face video from public-domain images.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--faces", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--fps", type=float, default=FPS)
    ap.add_argument(
        "--away",
        type=float,
        nargs=2,
        metavar=("T0", "T1"),
        default=None,
        help="the first face leaves the picture between T0 and T1 seconds",
    )
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    away = tuple(args.away) if args.away else None
    path = make_demo_video(args.out, args.seconds, args.faces, args.fps, overwrite=args.overwrite, away=away)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
