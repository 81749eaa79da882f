"""Head pose from 5 landmarks and from 478 3D landmarks: expected error, simulated and on real photos.

1. Simulation of the 5-point pose (no ground-truth head-pose set is available offline): faces drawn
   from the 3D five-point model with person-to-person shape variation (mm, 1 sd: x 2, y 3 for the eyes
   and mouth, 3.5 for the nose tip, depth 4) at random poses (yaw +-45°, pitch +-25°, roll +-30°),
   projected, with landmark noise of 2, 4 or 6% of the eye distance (MTCNN's landmark error on real faces
   is in this range); mean absolute error per angle. A lower bound for real faces: real shapes and
   expressions (a smile lifts the mouth corners) vary more than a Gaussian.
2. Real photos (those of bench_faces_real.py, ``--wheels`` as there): every face found is rotated in
   the image plane by -20..20° and mirrored, and measured by both poses: the 5-point pose from MTCNN's
   landmarks and the 3D-landmark pose (:mod:`mtaffect.geometry.headpose`) from the 478 landmarks of
   mtaffect's landmarker (MediaPipe's own where that is absent), with the gaze. Rotation must change
   roll by the angle and, to first order, leave yaw and pitch alone (exactly: the rotation becomes
   ``Rz(-a) @ R``, also reported); mirroring must negate yaw and roll and keep pitch. The deviations
   measure the error the landmarks add on real faces. Also the spread of pitch over the near-frontal
   faces (|yaw| < 15°), which is mostly person-to-person (true pitch is near 0 in such photos).
3. Real expression (SMILEsmileD's LFW crops in ../shared/data/smilesmiled, when present): mean pose of
   smiling and non-smiling faces; a smile should not shift a pose's mean pitch.
4. Speed of the batched 3D pose and gaze (landmarks given).

Run: ``python benchmarks/bench_pose.py [--wheels WHEELS] [--smiles N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faces_real import photos

from mtaffect.faces.pose import euler_to_matrix, matrix_to_euler

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


def landmark_source() -> tuple[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """(name, fn(rgb, boxes, landmarks5) -> (n, 478, 3) pixels): mtaffect's landmarker on our detections,
    or, where it is not there, MediaPipe's own FaceLandmarker (its face nearest each box's centre)."""
    try:
        from mtaffect.geometry.landmarker import FaceLandmarker
    except ImportError:
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        from mtaffect.geometry.bundle import BUNDLE_PATH

        opts = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=BUNDLE_PATH.read_bytes()), num_faces=8
        )
        fl = vision.FaceLandmarker.create_from_options(opts)

        def mediapipe_points(rgb: np.ndarray, boxes: np.ndarray, _lm5: np.ndarray) -> np.ndarray:
            h, w = rgb.shape[:2]
            faces = fl.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).face_landmarks
            pts = np.array([[(p.x * w, p.y * h, p.z * w) for p in f] for f in faces]).reshape(-1, 478, 3)
            out = np.full((len(boxes), 478, 3), np.nan)
            if len(pts):
                centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
                k = np.linalg.norm(pts[None, :, :, :2].mean(2) - centre, axis=2).argmin(1)
                out[:] = pts[k]
            return out

        return "mediapipe FaceLandmarker (mtaffect.geometry.landmarker absent)", mediapipe_points
    lmk = FaceLandmarker()
    return "mtaffect.geometry.landmarker", lambda rgb, boxes, lm5: lmk.measure(rgb, boxes, lm5).points


def _rotated_gaze(gaze: np.ndarray, degrees: float) -> np.ndarray:
    """Gaze angles after the photo turned counter-clockwise by ``degrees`` (the vector turns with it)."""
    g = np.array([np.tan(gaze[0]), np.tan(gaze[1]), -1.0])
    g = euler_to_matrix(np.array([0.0, 0.0, -degrees * DEG])) @ g
    return np.array([np.arctan2(g[0], -g[2]), np.arctan2(g[1], -g[2])])


def _summary(base: np.ndarray, rotated: list, mirrored: list) -> dict:
    """Pose checks of one method, degrees: ``base`` (faces, 3) rad; ``rotated`` (face, angle, pose);
    ``mirrored`` (face, pose). Rows with NaN (not measured) are left out and counted."""
    rot = [(base[i], a, p) for i, a, p in rotated if np.isfinite(base[i]).all() and np.isfinite(p).all()]
    mir = [(base[i], p) for i, p in mirrored if np.isfinite(base[i]).all() and np.isfinite(p).all()]
    d = np.array([p - b for b, _, p in rot]) / DEG
    a = np.array([a for _, a, _ in rot])
    # the exact truth of an in-plane turn: R -> Rz(-a) @ R (yaw and pitch move a little when pitch is not 0)
    exact = np.array(
        [
            p - matrix_to_euler(euler_to_matrix(np.array([0, 0, -a * DEG])) @ euler_to_matrix(b))
            for b, a, p in rot
        ]
    )
    m = np.array([(p[1] + b[1], p[2] + b[2], p[0] - b[0]) for b, p in mir]) / DEG / 2
    ok = base[np.isfinite(base).all(1)] / DEG
    frontal = ok[np.abs(ok[:, 1]) < 15, 0]
    r2 = lambda v: round(float(v), 2)  # noqa: E731
    return {
        "faces_measured": len(ok),
        "rotations_measured": len(rot),
        "rotation_roll_error_deg_mean": r2(np.abs(d[:, 2] + a).mean()),
        "rotation_yaw_drift_deg_mean": r2(np.abs(d[:, 1]).mean()),
        "rotation_pitch_drift_deg_mean": r2(np.abs(d[:, 0]).mean()),
        "rotation_vs_exact_composition_deg_mean": dict(
            zip(("pitch", "yaw", "roll"), (np.abs(exact).mean(0) / DEG).round(2).tolist(), strict=True)
        ),
        "mirror_yaw_asymmetry_deg_mean": r2(np.abs(m[:, 0]).mean()),
        "mirror_roll_asymmetry_deg_mean": r2(np.abs(m[:, 1]).mean()),
        "mirror_pitch_change_deg_mean": r2(np.abs(m[:, 2]).mean()),
        "near_frontal_pitch_deg": {
            "n": len(frontal),
            "mean": round(float(np.mean(frontal)), 1),
            "sd": round(float(np.std(frontal)), 1),
        },
    }


def real(wheels: Path | None) -> dict:
    """Both poses (and the gaze) of every face of the photos, its in-plane rotations and its mirror."""
    from mtaffect.faces.filtering import filter_detections
    from mtaffect.faces.mtcnn import MTCNN
    from mtaffect.faces.pose import head_pose
    from mtaffect.geometry.gaze import gaze_angles
    from mtaffect.geometry.headpose import head_pose_3d

    det = MTCNN(min_face_size=30.0)
    source, points_of = landmark_source()
    print(f"3D landmarks from {source}", flush=True)

    def measure(im: Image.Image) -> np.ndarray | None:
        """(8,): 5-point pose, 3D pose, gaze of the face nearest the crop's centre; None if none found."""
        arr = np.asarray(im)
        d = filter_detections(det.detect([arr])[0])
        if not len(d):
            return None
        centre = (d.boxes[:, :2] + d.boxes[:, 2:]) / 2
        k = int(np.argmin(np.linalg.norm(centre - 128, axis=1)))
        pts = points_of(arr, d.boxes[k : k + 1], d.landmarks[k : k + 1])
        return np.concatenate(
            [head_pose(d.landmarks[k : k + 1])[0], head_pose_3d(pts)[0], gaze_angles(pts)[0]]
        )

    base, rotated, mirrored, names = [], [], [], []
    for name, img, truth, _ in photos(wheels):
        for box in truth:
            x1, y1, x2, y2 = box
            side = max(x2 - x1, y2 - y1) * 2.2
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            crop = Image.fromarray(img).crop(
                (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
            )
            crop = crop.resize((256, 256), Image.Resampling.BILINEAR)
            b = measure(crop)
            if b is None:
                continue
            i = len(base)
            base.append(b)
            names.append(name)
            for a in (-20, -10, 10, 20):
                p = measure(crop.rotate(a, resample=Image.Resampling.BILINEAR))
                if p is not None:
                    rotated.append((i, a, p))
            m = measure(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
            if m is not None:
                mirrored.append((i, m))
    base_a = np.array(base)
    res: dict = {"faces": len(base), "landmarks": source}
    for key, sl in (("five_point", slice(0, 3)), ("landmarks_3d", slice(3, 6))):
        res[key] = _summary(
            base_a[:, sl], [(i, a, p[sl]) for i, a, p in rotated], [(i, p[sl]) for i, p in mirrored]
        )
        print(json.dumps({key: res[key]}), flush=True)
    g = base_a[:, 6:]
    ok = np.isfinite(g).all(1)
    rot_err = [
        np.abs(p[6:] - _rotated_gaze(g[i], a)) for i, a, p in rotated if ok[i] and np.isfinite(p[6:]).all()
    ]
    mir = [(g[i], p[6:]) for i, p in mirrored if ok[i] and np.isfinite(p[6:]).all()]
    res["gaze"] = {
        "faces_measured": int(ok.sum()),
        "abs_rad_median": np.median(np.abs(g[ok]), 0).round(3).tolist(),
        "abs_rad_max": np.abs(g[ok]).max(0).round(3).tolist(),
        "rotation_error_rad_mean": np.mean(rot_err, 0).round(3).tolist(),
        "mirror_x_asymmetry_rad_mean": round(float(np.mean([abs(a[0] + b[0]) / 2 for a, b in mir])), 3),
        "mirror_y_change_rad_mean": round(float(np.mean([abs(a[1] - b[1]) / 2 for a, b in mir])), 3),
    }
    print(json.dumps({"gaze": res["gaze"]}), flush=True)
    res["per_face"] = [
        {
            "photo": n,
            "pose_5pt_deg": (b[:3] / DEG).round(1).tolist(),
            "pose_3d_deg": (b[3:6] / DEG).round(1).tolist(),
            "gaze_rad": b[6:].round(2).tolist(),
        }
        for n, b in zip(names, base, strict=True)
    ]
    return res


def smiles(per_class: int) -> dict | None:
    """Real expression: SMILEsmileD's LFW crops (../shared/data/smilesmiled), smiling vs not. Different
    people, but a smile should not shift the mean pitch of a few hundred faces: each pose's mean pitch
    difference (smile - not) with its standard error. None when the data set is absent."""
    import csv
    import io
    import tarfile

    from mtaffect.faces.filtering import filter_detections
    from mtaffect.faces.mtcnn import MTCNN
    from mtaffect.faces.pose import head_pose
    from mtaffect.geometry.headpose import head_pose_3d

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "smilesmiled"
    if not (root / "smilesmiled_images.tar").is_file():
        return None
    with (root / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(0)
    det = MTCNN(min_face_size=30.0)
    _, points_of = landmark_source()
    poses: dict[int, list] = {0: [], 1: []}
    with tarfile.open(root / "smilesmiled_images.tar") as tar:
        for label in (1, 0):
            paths = [r["path"] for r in rows if int(r["smile"]) == label]
            for path in rng.choice(paths, per_class, replace=False):
                try:
                    im = Image.open(io.BytesIO(tar.extractfile(path).read())).convert("RGB")
                except OSError:
                    continue
                canvas = Image.new("RGB", (256, 256), (128, 128, 128))
                canvas.paste(im.resize((128, 128), Image.Resampling.BICUBIC), (64, 64))
                arr = np.asarray(canvas)
                d = filter_detections(det.detect([arr])[0])
                if not len(d):
                    continue
                k = int(np.argmax(d.scores))
                pts = points_of(arr, d.boxes[k : k + 1], d.landmarks[k : k + 1])
                p3 = head_pose_3d(pts)[0]
                if np.isfinite(p3).all():
                    poses[label].append(np.concatenate([head_pose(d.landmarks[k : k + 1])[0], p3]) / DEG)
    s, n = np.array(poses[1]), np.array(poses[0])
    out = {"faces": {"smile": len(s), "no_smile": len(n)}}
    for key, sl in (("five_point", slice(0, 3)), ("landmarks_3d", slice(3, 6))):
        diff = s[:, sl].mean(0) - n[:, sl].mean(0)
        se = np.sqrt(s[:, sl].var(0) / len(s) + n[:, sl].var(0) / len(n))
        out[key] = {
            "mean_deg_smile": s[:, sl].mean(0).round(2).tolist(),
            "mean_deg_no_smile": n[:, sl].mean(0).round(2).tolist(),
            "difference_deg": diff.round(2).tolist(),
            "difference_se_deg": se.round(2).tolist(),
        }
    print(json.dumps({"smiles": out}), flush=True)
    return out


def speed(n: int = 20000) -> dict:
    """Microseconds per face of the batched 3D pose and gaze (landmarks given)."""
    from mtaffect.geometry.gaze import gaze_angles
    from mtaffect.geometry.headpose import head_pose_3d

    lm = np.random.default_rng(0).normal(size=(n, 478, 3)) + np.linspace(0, 100, 478)[:, None]
    out = {}
    for name, fn in (("head_pose_3d", head_pose_3d), ("gaze_angles", gaze_angles)):
        fn(lm[:10])
        t = time.perf_counter()
        fn(lm)
        out[f"{name}_us_per_face"] = round((time.perf_counter() - t) / n * 1e6, 2)
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=None)
    ap.add_argument("--smiles", type=int, default=300, help="SMILEsmileD faces per class (0: skip)")
    args = ap.parse_args(argv)
    return {
        "simulation": simulate(),
        "real": real(args.wheels),
        "smiles": smiles(args.smiles) if args.smiles else None,
        "speed": speed(),
    }


if __name__ == "__main__":
    main()
