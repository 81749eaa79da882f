"""Head pose from MediaPipe's 478 3D landmarks: a weighted rigid fit of the canonical face.

Why: the five-point pose (:mod:`mtaffect.faces.pose`) fits a face whose mouth corners and nose are as
much part of the model as its eyes, so expression moves it (a frontal surprised face read yaw 16.8°,
pitch -21.8°). Here the canonical face (:mod:`~mtaffect.geometry.canonical`) is fitted with MediaPipe's
own Procrustes weights, which sit on points the face's muscles barely move: nose bridge and sides, inner
and outer eye corners, cheekbones, temples, forehead. A smile, a jaw drop or raised brows move other
points and leave the fit where it was (``tests/test_headpose.py`` holds it to 2°).

Method: weighted orthogonal Procrustes with scale (Kabsch/Umeyama) between the canonical vertices and
the landmarks, closed form (one batched 3x3 SVD per face, no iterations). Landmarks follow mtaffect's
pixel convention: x right and y down in pixels, z MediaPipe's relative depth scaled like x (smaller =
nearer the camera), which is camera coordinates under weak perspective (MediaPipe's geometry pipeline
assumes the same of these landmarks). The canonical face has y up and z towards the viewer, so it is
turned by 180° about x (:data:`CANONICAL_TO_CAMERA`) into the camera frame of a face looking into the
camera, and ``landmarks ~ scale * R @ (CANONICAL_TO_CAMERA @ vertex) + shift``; ``R`` is the head's
rotation and its angles are OpenFace's ``pose_Rx, pose_Ry, pose_Rz`` (pitch, yaw, roll; the convention
and sign meanings of :mod:`mtaffect.faces.pose`: ``R = Rx @ Ry @ Rz``, pitch > 0 chin down, yaw > 0 nose
towards the image's left, roll > 0 clockwise in the image).

Expected error (``benchmarks/bench_pose.py``, 15 faces of real photos, mtaffect's landmarker; the 5-point
pose on the same faces in brackets): an in-plane rotation of the photo by ±10-20° was followed within
0.9° pitch, 0.5° yaw, 0.4° roll of the exact ``Rz(-a) @ R`` (5.1°, 4.0°, 2.3°); mirroring negated yaw
and roll within 0.4° and kept pitch within 0.7° (1.5°, 1.0°, 3.2°); near-frontal faces' pitch spread
sd 9° (18°). Expression: moving a real face's non-rigid landmarks (1.5 cm jaw drop, broad smile, 0.8 cm
brow raise) moved the pose by at most 0.2° (the 5-point pose: 4-10°); over SMILEsmileD's real faces
smiling ones read 2.4 ± 0.8° more pitch than non-smiling ones (5-point: 7.1 ± 1.1°). Pitch's zero is the
canonical face's: frontal portraits read +4° on average (the astronaut +9 to +12°), so compare pitch
within a face track rather than against 0. A near-profile face with its far half hidden (the camera
photo: yaw about -50°) is beyond what the landmarks, so the fit, get right.

No ``pose_Tx/Ty/Tz``: OpenFace's translation is in millimetres from the camera, which needs the camera's
focal length and principal point. Under weak perspective the landmarks fix only ``scale`` (pixels per
cm of a mean face) and the face's position in pixels; distance is ``Tz = f * 10 / scale`` mm and
``Tx = (u - cx) * Tz / f``, so a guessed focal length (OpenFace guesses 500 px per 640 px of width)
scales Tz by the guess's error, and a person's head size (±10%) adds to it. :func:`fit_canonical`
returns ``scale`` and ``shift`` for a caller who knows the intrinsics.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np

from mtaffect.faces.pose import matrix_to_euler
from mtaffect.geometry.canonical import NUM_VERTICES, canonical_face

#: Canonical face coordinates (x right, y up, z towards the viewer) -> camera coordinates of a face looking
#: into the camera (x right, y down, z away from the camera): a proper rotation, 180° about x.
CANONICAL_TO_CAMERA: Final[np.ndarray] = np.diag([1.0, -1.0, -1.0])


class RigidFit(NamedTuple):
    """Per face: ``landmarks ~ scale * rotation @ (CANONICAL_TO_CAMERA @ vertex) + shift``; NaN where the
    face's landmarks were not all finite."""

    rotation: np.ndarray  #: (n, 3, 3) head rotation in camera coordinates (OpenFace's R)
    scale: np.ndarray  #: (n,) pixels per cm of the canonical face
    shift: np.ndarray  #: (n, 3) pixels: where the canonical face's origin lands


def _check(landmarks: np.ndarray) -> np.ndarray:
    x = np.asarray(landmarks, np.float64)
    if x.ndim != 3 or x.shape[1] < NUM_VERTICES or x.shape[2] != 3:
        raise ValueError(f"landmarks must be (n, {NUM_VERTICES}+, 3) (x, y, z in pixels), got {x.shape}")
    return x


def fit_canonical(landmarks: np.ndarray) -> RigidFit:
    """(n, 468+, 3) landmarks (pixels, see the module docstring) -> the weighted similarity fit per face."""
    x = _check(landmarks)
    face = canonical_face()
    ids, w = face.procrustes_ids, face.procrustes_weights
    m = face.vertices[ids] @ CANONICAL_TO_CAMERA.T  # (k, 3) model points, camera frame
    p = x[:, ids]  # (n, k, 3)
    n = len(x)
    rot, scale, shift = np.full((n, 3, 3), np.nan), np.full(n, np.nan), np.full((n, 3), np.nan)
    ok = np.isfinite(x).all(axis=(1, 2))
    if ok.any():
        p = p[ok]
        mc = m - w @ m
        pbar = np.einsum("k,nki->ni", w, p)
        cov = np.einsum("k,nki,kj->nij", w, p - pbar[:, None], mc)  # sum_k w (p - pbar)(m - mbar)^T
        u, sv, vt = np.linalg.svd(cov)
        d = np.ones((len(p), 3))
        d[:, 2] = np.sign(np.linalg.det(u @ vt))  # a reflection would fit a mirrored face: not a pose
        r = u @ (d[:, :, None] * vt)
        s = (sv * d).sum(1) / (w * (mc**2).sum(1)).sum()
        rot[ok], scale[ok] = r, s
        shift[ok] = pbar - s[:, None] * (r @ (w @ m))
    return RigidFit(rot, scale, shift)


def fit_or_given(landmarks: np.ndarray, fit: RigidFit | None) -> RigidFit:
    """``fit`` when a caller computed it already (checked to be one per face), else
    :func:`fit_canonical` of ``landmarks``: head pose and gaze share one fit per face."""
    if fit is None:
        return fit_canonical(landmarks)
    if len(fit.rotation) != len(landmarks):
        raise ValueError(f"a fit of {len(fit.rotation)} faces for {len(landmarks)} faces' landmarks")
    return fit


def head_pose_3d(landmarks: np.ndarray, fit: RigidFit | None = None) -> np.ndarray:
    """Head pose from the dense landmarks; expression does not move it.

    Args:
        landmarks: (n, 468+, 3) landmarks in pixels (see the module docstring).
        fit: their :func:`fit_canonical`, when the caller has it already (gaze uses the same fit);
            None: computed here.

    Returns:
        (n, 3) float32 ``pose_Rx, pose_Ry, pose_Rz`` (radians, OpenFace's convention); NaN rows for faces
        with a non-finite landmark (never an exception).
    """
    return matrix_to_euler(fit_or_given(landmarks, fit).rotation).astype(np.float32)


__all__ = ["CANONICAL_TO_CAMERA", "RigidFit", "fit_canonical", "fit_or_given", "head_pose_3d"]
