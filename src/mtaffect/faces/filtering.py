"""Which detections count as faces: a confidence floor and no face nested inside a larger face.

MTCNN's own stage thresholds (0.6, 0.7, 0.7) let through, on real group photos, face-like patterns on
a hand or a patterned scarf (O-Net probability 0.72-0.87) and a "face" inside a larger face (the
lenses of sunglasses, 0.945): each then gets an expression in the table. Two rules remove them, with
defaults measured on real photos (docs/benchmarks.md, ``benchmarks/bench_faces_real.py``):

- ``min_confidence``: drop detections whose O-Net probability is below it (default 0.9: every real
  face of the benchmark photos scored >= 0.967; the faces on a hand and a scarf 0.72-0.87);
- ``nested_overlap``: drop a box when at least this share of its area lies inside a larger kept box
  (default 0.5: the sunglasses "face" lay 57% inside its wearer's box; real faces of people standing
  close overlap far less, because a face hidden that much is not visible). ``None`` keeps them.

Pure numpy on :class:`~mtaffect.faces.mtcnn.FaceDetections` (no torch), so it serves any detector.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from mtaffect.faces.cascade import FaceDetections, box_areas, box_intersections

DEFAULT_MIN_CONFIDENCE: Final[float] = 0.9
DEFAULT_NESTED_OVERLAP: Final[float] = 0.5


def nested_mask(boxes: np.ndarray, overlap: float) -> np.ndarray:
    """(k,) bool: True where a box has >= ``overlap`` of its area inside a larger box that is kept.

    Larger boxes are decided first, so a box inside a box that is itself dropped can stay.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area, inter = box_areas(b), box_intersections(b, b)
    order = np.argsort(-area, kind="stable")
    drop = np.zeros(len(b), bool)
    kept: list[int] = []
    for i in order:
        if kept and area[i] > 0 and (inter[i, kept] / area[i] >= overlap).any():
            drop[i] = True
            continue
        kept.append(int(i))
    return drop


def filter_detections(
    d: FaceDetections,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    nested_overlap: float | None = DEFAULT_NESTED_OVERLAP,
) -> FaceDetections:
    """``d`` without low-confidence and nested detections (order kept: best score first)."""
    if len(d) == 0:
        return d
    keep = np.asarray(d.scores) >= min_confidence
    if nested_overlap is not None and keep.sum() > 1:
        idx = np.flatnonzero(keep)
        keep[idx[nested_mask(d.boxes[idx], nested_overlap)]] = False
    if keep.all():
        return d
    return FaceDetections(d.boxes[keep], d.scores[keep], d.landmarks[keep])


def check_filter_options(min_confidence: float, nested_overlap: float | None) -> None:
    """Raise ValueError with what to pass when an option is out of range."""
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise ValueError(f"min_confidence must be a probability in [0, 1], got {min_confidence}")
    if nested_overlap is not None and not 0.0 < float(nested_overlap) <= 1.0:
        raise ValueError(
            f"nested_overlap must be in (0, 1] or None (keep nested faces), got {nested_overlap}"
        )


__all__ = [
    "DEFAULT_MIN_CONFIDENCE",
    "DEFAULT_NESTED_OVERLAP",
    "check_filter_options",
    "filter_detections",
    "nested_mask",
]
