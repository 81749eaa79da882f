"""478 3D face landmarks of real photos, for the head-pose and gaze tests.

:func:`landmarks_of` is the one place the landmarks come from: mtaffect's own pipeline (MTCNN's faces,
then :class:`mtaffect.geometry.landmarker.FaceLandmarker` with the stills' refinement pass), in
mtaffect's pixel convention: x right, y down (pixels), z relative depth scaled like x (smaller = nearer
the camera). Its parity with MediaPipe's own FaceLandmarker is tests/test_landmarker.py's business.
"""

from __future__ import annotations

import csv
import io
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SMILE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "smilesmiled"


@lru_cache(maxsize=1)
def _models():
    from mtaffect.faces.mtcnn import MTCNN
    from mtaffect.geometry.landmarker import FaceLandmarker

    return MTCNN(), FaceLandmarker(threads=1)


def landmarks_of(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (h, w, 3) or grey (h, w) -> (n, 478, 3) float64 landmarks in pixels of the faces
    measured, left to right."""
    rgb = np.asarray(rgb, np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    rgb = np.ascontiguousarray(rgb[..., :3])
    detector, landmarker = _models()
    det = detector.detect([rgb])[0]
    geo = landmarker.measure(rgb, det.boxes, det.landmarks, refine=True)
    out = geo.points[geo.measured].astype(np.float64)
    return out[np.argsort(out[:, :, 0].mean(1))]


#: The real portraits of :func:`photo`, both looking into the camera.
PHOTOS = ("astronaut", "grace_hopper")


@lru_cache(maxsize=1)
def real_faces() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (RGB photo, its one face's (478, 3) landmarks), for each of :data:`PHOTOS` (built once)."""
    out = {}
    for name in PHOTOS:
        rgb = photo(name)
        lm = landmarks_of(rgb)
        assert len(lm) == 1, name
        out[name] = (rgb, lm[0])
    return out


def photo(name: str) -> np.ndarray:
    """A real portrait shipped with a dependency, uint8 RGB: ``astronaut`` (scikit-image) or
    ``grace_hopper`` (matplotlib); both look into the camera."""
    if name == "astronaut":
        from skimage import data

        return data.astronaut()
    import matplotlib.cbook as cbook

    with cbook.get_sample_data(f"{name}.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """The photo turned counter-clockwise (PIL's sense) about its centre: roll goes down by ``degrees``."""
    return np.asarray(Image.fromarray(rgb).rotate(degrees, resample=Image.Resampling.BILINEAR))


def mirror(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, ::-1])


def mirror_landmarks(lm: np.ndarray) -> np.ndarray:
    """(n, 478, 3) landmarks of the face mirrored left-right (x negated, each point renamed as its mirror
    partner on the canonical face, the two irises swapped): what a mirrored photo should give."""
    from mtaffect.geometry.canonical import canonical_face

    v = canonical_face().vertices
    partner = np.argmin(np.linalg.norm(v[:, None] - v[None] * [-1, 1, 1], axis=2), axis=1)
    order = np.concatenate([partner, [473, 476, 475, 474, 477], [468, 471, 470, 469, 472]])
    return np.asarray(lm)[:, order] * [-1, 1, 1]


def smile_crops(every: int, limit: int) -> list[tuple[np.ndarray, int]]:
    """SMILEsmileD's real 64x64 face crops (LFW), every ``every``-th of labels.csv up to ``limit``, as
    (256x256 grey canvas with the crop scaled to 128 px in its middle, smile 0/1): MediaPipe's detector
    finds a face with context around it. [] when ../shared/data/smilesmiled is absent."""
    tar_path = SMILE_DIR / "smilesmiled_images.tar"
    if not tar_path.is_file():
        return []
    with (SMILE_DIR / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))[::every][:limit]
    out = []
    with tarfile.open(tar_path) as tar:
        for r in rows:
            try:
                im = Image.open(io.BytesIO(tar.extractfile(r["path"]).read())).convert("L")
            except OSError:  # 9999.jpg is truncated
                continue
            canvas = np.full((256, 256), 128, np.uint8)
            canvas[64:192, 64:192] = np.asarray(im.resize((128, 128), Image.Resampling.BICUBIC))
            out.append((canvas, int(r["smile"])))
    return out
