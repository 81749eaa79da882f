"""Gaze angles from MediaPipe's iris and eye-corner landmarks, in OpenFace's convention.

Convention (OpenFace's ``gaze_angle_x, gaze_angle_y``): camera coordinates, x to the image's right,
y down, z away from the camera; ``g`` is the mean of the two eyes' unit gaze vectors and
``gaze_angle_x = atan2(g.x, -g.z)``, ``gaze_angle_y = atan2(g.y, -g.z)``. Looking into the camera gives
about (0, 0) whatever the head does; x > 0 is a look towards the image's right (the person's left),
y > 0 a look down.

Eyeball model, per eye, in the head's frame (the canonical face of :mod:`~mtaffect.geometry.canonical`,
cm, x right, y up, z towards the viewer; mapped into the image by the rigid fit of
:func:`~mtaffect.geometry.headpose.fit_canonical`, so it turns and scales with the head):

- the iris centre at rest (:data:`IRIS_REST`) sits 0.12 cm lateral of the eye corners' midpoint
  (33/133, 362/263: corners are skin over bone, unmoved by blinks and squints, unlike the lids), 0.13 cm
  above and 0.25 cm in front of it. Lateral and depth are the medians over 400 real faces
  (SMILEsmileD's LFW crops) of MediaPipe's iris in the head's frame; the height makes those faces' mean
  gaze zero (press photos: on average the subject looks into the camera). Their median iris sits 0.23
  cm above the corners, 0.1 cm higher, which is their mean head pitch (+6°, the canonical face's pitch
  zero is not a level head) seen by an eye that looks at the camera;
- the eyeball's centre of rotation is :data:`IRIS_RADIUS` = 1.15 cm behind that rest position: the
  distance from the rotation centre to the (apparent) iris centre is 10.5 mm in an adult eye, 0.9 of
  the visible iris diameter (11.7 mm); MediaPipe's iris measures 1.27 canonical cm across, so 1.15.

The gaze vector runs from the rotation centre to the iris centre: its x, y are the observed iris
centre (468, 473) minus the projected rotation centre, its z follows from the sphere (``|g| = radius``,
iris in front). Only the iris's x, y are used: MediaPipe's iris depth is a weak, smoothed guess. A
projected offset larger than the radius (noise, a squint at an extreme angle) is clipped to 90°.

Expected error: no gaze ground truth is available offline. On the 15 faces of real photos of
``benchmarks/bench_pose.py`` (mtaffect's landmarker) the median |gaze| was 0.06 rad (x) and 0.12 rad (y),
mirroring the photo negated gaze_angle_x within 0.04 rad, rotating it in-plane by ±10-20° turned the gaze
as it should within 0.06 rad. MediaPipe's iris points, regressed from a 256 px face crop, tend to lag
extreme eye turns, so large angles read small; beyond ~45° of head yaw the far eye is hidden and its iris
is a guess (a near-profile face read 1.2 rad). Compare within a face track.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from mtaffect.geometry.headpose import CANONICAL_TO_CAMERA, RigidFit, fit_or_given

#: (iris centre, outer corner, inner corner) landmark ids per eye: the eye on the image's left, then right.
EYES: Final[tuple[tuple[int, int, int], ...]] = ((468, 33, 133), (473, 263, 362))
#: Iris centre of an eye looking straight ahead, relative to its corners' midpoint: (lateral, up, forward)
#: cm in the canonical face (lateral is away from the nose: -x for the eye on the image's left).
IRIS_REST: Final[tuple[float, float, float]] = (0.12, 0.13, 0.25)
#: Distance (canonical cm) from the eyeball's centre of rotation to the iris centre.
IRIS_RADIUS: Final[float] = 1.15


def _rotation_centres(landmarks: np.ndarray, rotation: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, 2, 3) eyeball rotation centres in pixels (camera frame), image-left eye first."""
    lat, up, fwd = IRIS_REST
    out = []
    for side, (_, outer, inner) in zip((-1.0, 1.0), EYES, strict=True):
        offset = np.array([side * lat, up, fwd - IRIS_RADIUS])  # canonical cm, from the corners' midpoint
        mid = (landmarks[:, outer] + landmarks[:, inner]) / 2
        out.append(mid + scale[:, None] * (rotation @ (CANONICAL_TO_CAMERA @ offset)))
    return np.stack(out, 1)


def gaze_vectors(landmarks: np.ndarray, fit: RigidFit | None = None) -> np.ndarray:
    """Unit gaze vectors of both eyes.

    Args:
        landmarks: (n, 478, 3) landmarks in pixels, irises included (468 points are an error).
        fit: their :func:`~mtaffect.geometry.headpose.fit_canonical` when the caller has it (head pose
            uses the same fit); None: computed here.

    Returns:
        (n, 2, 3) unit vectors in the camera frame, image-left eye first; NaN rows for faces with a
        non-finite landmark.
    """
    x = np.asarray(landmarks, np.float64)
    if x.ndim != 3 or x.shape[1] < 478 or x.shape[2] != 3:
        raise ValueError(f"landmarks must be (n, 478, 3) (x, y, z in pixels, irises included), got {x.shape}")
    out = np.full((len(x), 2, 3), np.nan)
    ok = np.isfinite(x).all(axis=(1, 2))
    if not ok.any():
        return out
    every = fit_or_given(x, fit)
    rotation, scale = every.rotation[ok], every.scale[ok]
    x = x[ok]
    centre = _rotation_centres(x, rotation, scale)
    iris = x[:, [e[0] for e in EYES], :2]
    radius = (IRIS_RADIUS * scale)[:, None, None]
    d = (iris - centre[..., :2]) / radius  # projected offset in radii
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    d = d / np.maximum(norm, 1.0)  # beyond the sphere's outline: 90° off the camera axis
    dz = -np.sqrt(np.clip(1.0 - (d**2).sum(-1, keepdims=True), 0.0, None))  # iris in front: towards -z
    out[ok] = np.concatenate([d, dz], -1)
    return out


def gaze_angles(landmarks: np.ndarray, fit: RigidFit | None = None) -> np.ndarray:
    """Gaze angles of a face (both eyes averaged).

    Args:
        landmarks: (n, 478, 3) landmarks in pixels.
        fit: their rigid fit, when the caller has it (see :func:`gaze_vectors`).

    Returns:
        (n, 2) float32 ``gaze_angle_x, gaze_angle_y`` (radians, OpenFace's convention); NaN rows for faces
        with a non-finite landmark, never an exception.
    """
    g = gaze_vectors(landmarks, fit).mean(1)
    return np.stack([np.arctan2(g[:, 0], -g[:, 2]), np.arctan2(g[:, 1], -g[:, 2])], -1).astype(np.float32)


__all__ = ["EYES", "IRIS_RADIUS", "IRIS_REST", "gaze_angles", "gaze_vectors"]
