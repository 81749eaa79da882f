"""Head pose (pitch, yaw, roll) from MTCNN's five landmarks, in OpenFace's convention.

Method: a mean 3D face of the five points (eye centres, nose tip, mouth corners; :data:`FACE_MODEL_5PT`)
is fitted to the landmarks under scaled orthographic projection (``x = s R[:2] X + t``): a linear
least-squares start, projected onto a rotation, then Gauss-Newton on (rotation, scale, shift). Everything
is batched numpy (no torch, no OpenCV): tens of microseconds a face.

Convention (OpenFace's ``pose_Rx, pose_Ry, pose_Rz``): camera coordinates with x to the image's right,
y down and z away from the camera; the head's rotation is ``R = Rx(pose_Rx) @ Ry(pose_Ry) @ Rz(pose_Rz)``
with the usual right-handed elementary rotations, all zero for a face looking straight into the camera.
What the signs mean in the picture:

- ``pose_Rx`` (pitch) > 0: the head tilts down (the nose moves down towards the mouth);
- ``pose_Ry`` (yaw) > 0: the nose turns towards the image's left (the person turns to their right);
- ``pose_Rz`` (roll) > 0: the face rotates clockwise in the image.

Expected error (docs/benchmarks.md, ``benchmarks/bench_pose.py``): five points and a generic face
determine roll well, yaw reasonably and pitch poorly. Simulated with person-to-person shape variation
and landmark noise of 4% of the eye distance (MTCNN's range): mean absolute error 2.7° roll, 6.0° yaw,
7.4° pitch (|yaw| <= 45°). On real photos rotated in the image plane, roll followed the rotation to
2.9° and yaw/pitch moved by 5.3°/7.7° where they should not have. Pitch also carries a person-to-person
offset (how far below the eyes a nose tip and the mouth corners sit; a smile lifts the corners): over
near-frontal faces in group photos its spread was 18° (sd). So compare pitch within a face track, not
between people. Beyond ~50° of yaw the far eye and mouth corner are hidden and MTCNN's landmarks, so the
estimate, degrade.
"""

from __future__ import annotations

from typing import Final

import numpy as np

#: Mean 3D positions (mm) of MTCNN's five points: eye centres (image-left, image-right), nose tip, mouth
#: corners, for a face looking into the camera; x right, y down, z away from the camera, origin at the
#: nose tip. Widths: 63 mm between the eyes (the adult mean), mouth corners 0.83 of it apart (the ArcFace
#: alignment template's ratio). Heights: the nose tip 0.60 and the mouth corners 0.99 eye distances below
#: the eyes, the medians of MTCNN's landmarks on the near-frontal faces of the benchmark photos (the
#: ArcFace template puts the mouth 1.15 below, which read every frontal face as pitched down by ~30°).
#: Depths are anthropometric means: eye centres ~20 mm and mouth corners ~25 mm behind the nose tip.
FACE_MODEL_5PT: Final[np.ndarray] = np.array(
    [
        [-31.5, -38.0, 20.0],
        [31.5, -38.0, 20.0],
        [0.0, 0.0, 0.0],
        [-26.0, 24.5, 25.0],
        [26.0, 24.5, 25.0],
    ]
)


def euler_to_matrix(angles: np.ndarray) -> np.ndarray:
    """(..., 3) OpenFace Euler angles (Rx, Ry, Rz) in radians -> (..., 3, 3) ``Rx @ Ry @ Rz``."""
    a = np.asarray(angles, np.float64)
    s1, s2, s3 = np.sin(a[..., 0]), np.sin(a[..., 1]), np.sin(a[..., 2])
    c1, c2, c3 = np.cos(a[..., 0]), np.cos(a[..., 1]), np.cos(a[..., 2])
    rows = [
        [c2 * c3, -c2 * s3, s2],
        [c1 * s3 + c3 * s1 * s2, c1 * c3 - s1 * s2 * s3, -c2 * s1],
        [s1 * s3 - c1 * c3 * s2, c3 * s1 + c1 * s2 * s3, c1 * c2],
    ]
    return np.stack([np.stack(r, -1) for r in rows], -2)


def matrix_to_euler(r: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations -> (..., 3) OpenFace Euler angles (inverse of :func:`euler_to_matrix`)."""
    r = np.asarray(r, np.float64)
    ry = np.arcsin(np.clip(r[..., 0, 2], -1.0, 1.0))
    rx = np.arctan2(-r[..., 1, 2], r[..., 2, 2])
    rz = np.arctan2(-r[..., 0, 1], r[..., 0, 0])
    return np.stack([rx, ry, rz], -1)


def project(angles: np.ndarray, scale: float = 1.0, shift=(0.0, 0.0), model: np.ndarray = FACE_MODEL_5PT):
    """Landmarks (..., 5, 2) of ``model`` seen with head rotation ``angles`` (scaled orthographic)."""
    pts = np.einsum("...ij,kj->...ki", euler_to_matrix(angles), model)
    return scale * pts[..., :2] + np.asarray(shift, np.float64)


def _skew(v: np.ndarray) -> np.ndarray:
    z = np.zeros(v.shape[:-1])
    return np.stack(
        [
            np.stack([z, -v[..., 2], v[..., 1]], -1),
            np.stack([v[..., 2], z, -v[..., 0]], -1),
            np.stack([-v[..., 1], v[..., 0], z], -1),
        ],
        -2,
    )


def _exp_so3(w: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation vectors (..., 3) -> (..., 3, 3)."""
    theta = np.linalg.norm(w, axis=-1)[..., None, None]
    k = _skew(w)
    small = theta < 1e-9
    t = np.where(small, 1.0, theta)
    a = np.where(small, 1.0, np.sin(t) / t)
    b = np.where(small, 0.5, (1 - np.cos(t)) / (t * t))
    return np.eye(3) + a * k + b * (k @ k)


def _nearest_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, 2] *= d[..., None]
    return u @ vt


def head_pose(landmarks: np.ndarray, iterations: int = 8, model: np.ndarray = FACE_MODEL_5PT) -> np.ndarray:
    """Five landmarks per face (n, 5, 2) (or (n, 10)) in pixels -> (n, 3) ``pose_Rx, pose_Ry, pose_Rz``.

    The landmark order is MTCNN's: image-left eye, image-right eye, nose, image-left and image-right
    mouth corners. Rows with a non-finite landmark give NaN.
    """
    x = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    n = len(x)
    out = np.full((n, 3), np.nan)
    ok = np.isfinite(x).all(axis=(1, 2))
    if not ok.any():
        return out
    x = x[ok]
    m = np.asarray(model, np.float64)
    xc = x - x.mean(1, keepdims=True)
    mc = m - m.mean(0)
    # Linear start: the 2x3 affine camera A minimising |xc - mc A^T|, then its nearest scaled rotation.
    a = np.einsum("nki,kj->nij", xc, mc) @ np.linalg.inv(mc.T @ mc)  # (n, 2, 3)
    s = np.sqrt(np.abs(np.linalg.det(a @ a.transpose(0, 2, 1)))) ** 0.5  # geometric mean of row norms
    r1 = a[:, 0] / np.linalg.norm(a[:, 0], axis=1, keepdims=True)
    r2 = a[:, 1] - (a[:, 1] * r1).sum(1, keepdims=True) * r1
    r2 /= np.maximum(np.linalg.norm(r2, axis=1, keepdims=True), 1e-12)
    rot = _nearest_rotation(np.stack([r1, r2, np.cross(r1, r2)], 1))
    t = x.mean(1) - s[:, None] * np.einsum("nij,j->ni", rot[:, :2], m.mean(0))
    # Gauss-Newton on the reprojection error; parameters: rotation increment (3), log-scale, shift (2).
    for _ in range(iterations):
        p = np.einsum("nij,kj->nki", rot, m)  # rotated model (n, 5, 3)
        pred = s[:, None, None] * p[..., :2] + t[:, None]
        res = (x - pred).reshape(len(x), -1)
        # d(R exp(w)) X / dw at w=0 is -R [X]_x; only its first two rows enter the projection.
        jr = -np.einsum("nij,kjl->nkil", rot, _skew(m))[:, :, :2, :] * s[:, None, None, None]
        js = pred - t[:, None]
        jac = np.concatenate(
            [jr, js[..., None], np.broadcast_to(np.eye(2), (len(x), 5, 2, 2))], axis=-1
        ).reshape(len(x), 10, 6)
        jtj = jac.transpose(0, 2, 1) @ jac + 1e-9 * np.eye(6)
        step = np.linalg.solve(jtj, np.einsum("nki,nk->ni", jac, res)[..., None])[..., 0]
        rot = rot @ _exp_so3(step[:, :3])
        s = s * np.exp(step[:, 3])
        t = t + step[:, 4:]
    out[ok] = matrix_to_euler(rot)
    return out


__all__ = ["FACE_MODEL_5PT", "euler_to_matrix", "head_pose", "matrix_to_euler", "project"]
