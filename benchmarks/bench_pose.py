"""Head pose from 5 landmarks: expected error, simulated and checked on real photos.

1. Simulation (no ground-truth head-pose set is available offline): faces drawn from the 3D
   five-point model with person-to-person shape variation (mm, 1 sd: x 2, y 3 for the eyes and mouth,
   3.5 for the nose tip, depth 4) at random poses (yaw +-45°, pitch +-25°, roll +-30°), projected, with
   landmark noise of 2, 4 or 6% of the eye distance (MTCNN's landmark error on real faces is in this
   range); mean absolute error per angle. A lower bound for real faces: real shapes and expressions
   (a smile lifts the mouth corners) vary more than a Gaussian.
2. Real photos (those of bench_faces_real.py, ``--wheels`` as there): every face found is rotated in
   the image plane by -20..20° and mirrored. Rotation must change roll by exactly the angle and leave
   yaw and pitch alone; mirroring must negate yaw and roll and keep pitch. The deviations measure the
   error that MTCNN's landmarks add on real faces. Also the spread of pitch over the near-frontal faces
   (|yaw| < 15°) of the photos, which is mostly person-to-person (true pitch is near 0 in such photos).

Run: ``python benchmarks/bench_pose.py [--wheels WHEELS]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faces_real import photos

DEG = np.pi / 180


def simulate(n: int = 20000, seed: int = 0) -> list[dict]:
    from mtaffect.faces.pose import FACE_MODEL_5PT, euler_to_matrix, head_pose

    rng = np.random.default_rng(seed)
    ang = rng.uniform([-25, -45, -30], [25, 45, 30], (n, 3)) * DEG
    sd = np.array([[2, 3, 4], [2, 3, 4], [2, 3.5, 4], [2, 3, 4], [2, 3, 4]])
    shape = FACE_MODEL_5PT[None] + rng.normal(size=(n, 5, 3)) * sd
    pts = np.einsum("nij,nkj->nki", euler_to_matrix(ang), shape)[..., :2] * 2.0 + 300
    out = []
    for noise in (0.02, 0.04, 0.06):
        lm = pts + rng.normal(size=pts.shape) * noise * 63 * 2.0
        err = np.abs(head_pose(lm) - ang) / DEG
        row = {
            "landmark_noise_iod": noise,
            "mae_deg": dict(zip(("pitch", "yaw", "roll"), err.mean(0).round(2), strict=True)),
        }
        for lo, hi in ((0, 15), (15, 30), (30, 45)):
            m = (np.abs(ang[:, 1]) >= lo * DEG) & (np.abs(ang[:, 1]) < hi * DEG)
            row[f"mae_deg_yaw_{lo}_{hi}"] = dict(
                zip(("pitch", "yaw", "roll"), err[m].mean(0).round(2), strict=True)
            )
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def real(wheels: Path | None) -> dict:
    from mtaffect.faces.filtering import filter_detections
    from mtaffect.faces.mtcnn import MTCNN
    from mtaffect.faces.pose import head_pose

    det = MTCNN(min_face_size=30.0)
    roll_err, yaw_drift, pitch_drift, mirror_yaw, mirror_roll, mirror_pitch, frontal_pitch = (
        [] for _ in range(7)
    )
    faces = 0
    for _name, img, truth, _ in photos(wheels):
        for box in truth:
            x1, y1, x2, y2 = box
            side = max(x2 - x1, y2 - y1) * 2.2
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            crop = Image.fromarray(img).crop(
                (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
            )
            crop = crop.resize((256, 256), Image.Resampling.BILINEAR)

            def pose(im: Image.Image) -> np.ndarray | None:
                d = filter_detections(det.detect([np.asarray(im)])[0])
                if not len(d):
                    return None
                centre = (d.boxes[:, :2] + d.boxes[:, 2:]) / 2
                k = int(np.argmin(np.linalg.norm(centre - 128, axis=1)))
                return head_pose(d.landmarks[k : k + 1])[0] / DEG

            base = pose(crop)
            if base is None:
                continue
            faces += 1
            if abs(base[1]) < 15:
                frontal_pitch.append(base[0])
            for a in (-20, -10, 10, 20):
                p = pose(crop.rotate(a, resample=Image.Resampling.BILINEAR))
                if p is not None:
                    roll_err.append(abs((p[2] - base[2]) + a))  # PIL: counter-clockwise = negative roll
                    yaw_drift.append(abs(p[1] - base[1]))
                    pitch_drift.append(abs(p[0] - base[0]))
            m = pose(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
            if m is not None:
                mirror_yaw.append(abs(m[1] + base[1]) / 2)
                mirror_roll.append(abs(m[2] + base[2]) / 2)
                mirror_pitch.append(abs(m[0] - base[0]) / 2)
    res = {
        "faces": faces,
        "rotation_roll_error_deg_mean": round(float(np.mean(roll_err)), 2),
        "rotation_yaw_drift_deg_mean": round(float(np.mean(yaw_drift)), 2),
        "rotation_pitch_drift_deg_mean": round(float(np.mean(pitch_drift)), 2),
        "mirror_yaw_asymmetry_deg_mean": round(float(np.mean(mirror_yaw)), 2),
        "mirror_roll_asymmetry_deg_mean": round(float(np.mean(mirror_roll)), 2),
        "mirror_pitch_change_deg_mean": round(float(np.mean(mirror_pitch)), 2),
        "near_frontal_pitch_deg": {
            "n": len(frontal_pitch),
            "mean": round(float(np.mean(frontal_pitch)), 1),
            "sd": round(float(np.std(frontal_pitch)), 1),
        },
    }
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=None)
    args = ap.parse_args(argv)
    return {"simulation": simulate(), "real": real(args.wheels)}


if __name__ == "__main__":
    main()
