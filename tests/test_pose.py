"""Head pose from 5 landmarks: OpenFace's convention, checked on hand-built landmarks and rotated photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mtaffect.faces.pose import FACE_MODEL_5PT, euler_to_matrix, head_pose, matrix_to_euler, project
from mtaffect.schema import LANDMARK_COLUMNS, POSE_COLUMNS

DEG = np.pi / 180


def test_euler_round_trip_and_openface_composition():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1.2, 1.2, (50, 3))
    r = euler_to_matrix(a)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(matrix_to_euler(r), a, atol=1e-9)
    # R = Rx @ Ry @ Rz with the usual right-handed elementary rotations
    x, y, z = 0.3, -0.2, 0.5
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    np.testing.assert_allclose(euler_to_matrix(np.array([x, y, z])), rx @ ry @ rz, atol=1e-12)


def test_recovers_the_pose_of_projected_landmarks_at_any_scale_and_position():
    rng = np.random.default_rng(1)
    a = rng.uniform([-0.5, -0.8, -0.7], [0.5, 0.8, 0.7], (200, 3))
    lm = project(a, scale=rng.uniform(0.5, 4), shift=rng.uniform(0, 600, 2))
    np.testing.assert_allclose(head_pose(lm), a, atol=1e-6)
    assert np.isnan(head_pose(np.full((1, 5, 2), np.nan))).all()
    assert head_pose(np.zeros((0, 10))).shape == (0, 3)


def test_sign_conventions_on_hand_built_landmarks():
    """Pitch > 0 is chin down, yaw > 0 the nose towards the image's left, roll > 0 clockwise."""
    front = project(np.zeros(3), scale=2.0, shift=(200, 200))
    assert np.abs(head_pose(front)).max() < 1e-9
    nose_left = front.copy()
    nose_left[2, 0] -= 8
    nose_down = front.copy()
    nose_down[2, 1] += 8
    t = 10 * DEG  # clockwise on screen (y points down): x' = x cos t - y sin t, y' = x sin t + y cos t
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    clockwise = (front - 200) @ rot.T + 200
    rx, ry, rz = head_pose(np.stack([nose_left, nose_down, clockwise])).T
    assert ry[0] > 5 * DEG and abs(rx[0]) < 2 * DEG
    assert rx[1] > 5 * DEG and abs(ry[1]) < 2 * DEG
    assert rz[2] == pytest.approx(t, abs=1e-6) and abs(rx[2]) < 1e-6 and abs(ry[2]) < 1e-6
    # the model itself: five 3D points; a head turned to the person's right (Ry > 0) moves the nose to the
    # image's left
    assert FACE_MODEL_5PT.shape == (5, 3)
    turned = project(np.array([0.0, 20 * DEG, 0.0]))
    eyes_mid = turned[:2, 0].mean()
    assert turned[2, 0] < eyes_mid


@pytest.fixture(scope="module")
def astronaut_pose():
    pytest.importorskip("skimage")
    from skimage import data

    from mtaffect.faces.mtcnn import MTCNN

    img = data.astronaut()
    det = MTCNN(min_face_size=40.0)

    def pose_of(image: np.ndarray) -> np.ndarray:
        d = det.detect([image])[0]
        assert len(d) >= 1
        return head_pose(d.landmarks[:1])[0]

    return img, pose_of


@pytest.mark.parametrize("degrees", [-15, 15])
def test_rotated_photo_changes_roll_by_the_rotation(astronaut_pose, degrees):
    img, pose_of = astronaut_pose
    base = pose_of(img)
    # PIL rotates counter-clockwise for positive angles: roll (clockwise positive) goes down by that much
    rotated = np.asarray(Image.fromarray(img).rotate(degrees, resample=Image.Resampling.BILINEAR))
    got = pose_of(rotated)
    assert got[2] - base[2] == pytest.approx(-degrees * DEG, abs=4 * DEG)
    # yaw and pitch should not move; MTCNN's landmarks on a rotated face shift by a few pixels
    assert abs(got[1] - base[1]) < 10 * DEG and abs(got[0] - base[0]) < 12 * DEG


def test_mirrored_photo_flips_yaw_and_roll_and_keeps_pitch(astronaut_pose):
    img, pose_of = astronaut_pose
    base = pose_of(img)
    mirror = pose_of(np.ascontiguousarray(img[:, ::-1]))
    assert mirror[1] == pytest.approx(-base[1], abs=3 * DEG)
    assert mirror[2] == pytest.approx(-base[2], abs=3 * DEG)
    assert mirror[0] == pytest.approx(base[0], abs=3 * DEG)


def test_pipeline_without_the_landmarker_writes_the_pose_of_its_five_points():
    """``landmarks="none"``: the five-point pose of the row's own landmarks (with the landmarker the
    pose is the 3D fit's: tests/test_predict_geometry.py)."""
    pytest.importorskip("skimage")
    from mtaffect.predict import demo_media
    from mtaffect.predict.pipeline import Predictor

    df = Predictor(landmarks="none").predict(next(demo_media.frames(1, faces=1)))
    ok = df[df["success"] == 1]
    assert len(ok) == 1
    expect = head_pose(ok[list(LANDMARK_COLUMNS)].to_numpy(np.float64))
    np.testing.assert_allclose(ok[list(POSE_COLUMNS)].to_numpy(np.float64), expect, atol=1e-5)
    assert np.abs(expect[:, 1:]).max() < 15 * DEG  # a near-frontal face: small yaw and roll
