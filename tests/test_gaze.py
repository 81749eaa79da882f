"""Gaze angles from the irises: OpenFace's convention on built eyes, and on real photos: eyes on the
camera read near zero, an iris moved right reads a look right, a mirrored face the opposite look."""

from __future__ import annotations

import numpy as np
import pytest
from landmark_helpers import PHOTOS, landmarks_of, mirror, mirror_landmarks, real_faces, smile_crops

from mtaffect.faces.pose import euler_to_matrix
from mtaffect.geometry.canonical import canonical_face
from mtaffect.geometry.gaze import EYES, IRIS_RADIUS, IRIS_REST, gaze_angles, gaze_vectors
from mtaffect.geometry.headpose import CANONICAL_TO_CAMERA, fit_canonical, head_pose_3d

DEG = np.pi / 180


def _eyes_looking(head: np.ndarray, gaze: np.ndarray, scale: float = 8.0) -> np.ndarray:
    """(n, 478, 3) canonical faces at head rotations ``head`` (n, 3) whose eyes both look along the camera
    frame unit vectors ``gaze`` (n, 3): each iris centre on its eyeball's sphere (the module's model)."""
    v = canonical_face().vertices @ CANONICAL_TO_CAMERA
    r = euler_to_matrix(head)
    lm = np.zeros((len(head), 478, 3))
    lm[:, :468] = scale * np.einsum("nij,kj->nki", r, v) + [300.0, 250.0, 0.0]
    lat, up, fwd = IRIS_REST
    for side, (iris, outer, inner) in zip((-1.0, 1.0), EYES, strict=True):
        offset = CANONICAL_TO_CAMERA @ [side * lat, up, fwd - IRIS_RADIUS]
        centre = (lm[:, outer] + lm[:, inner]) / 2 + scale * r @ offset
        lm[:, iris : iris + 5] = (centre + scale * IRIS_RADIUS * gaze)[:, None]
    return lm


def test_built_eyes_give_their_gaze_in_openface_convention():
    rng = np.random.default_rng(0)
    n = 300
    head = rng.uniform([-30, -45, -30], [30, 45, 30], (n, 3)) * DEG
    g = np.stack([rng.uniform(-0.5, 0.5, n), rng.uniform(-0.4, 0.4, n), -np.ones(n)], 1)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    got = gaze_angles(_eyes_looking(head, g))
    assert got.dtype == np.float32 and got.shape == (n, 2)
    expect = np.stack([np.arctan2(g[:, 0], -g[:, 2]), np.arctan2(g[:, 1], -g[:, 2])], 1)
    np.testing.assert_allclose(got, expect, atol=1e-5)
    np.testing.assert_allclose(gaze_vectors(_eyes_looking(head, g)), np.stack([g, g], 1), atol=1e-6)
    # eyes on the camera read (0, 0) however the head is turned; a look right is x > 0, a look down y > 0
    into_camera = np.tile([0.0, 0.0, -1.0], (n, 1))
    assert np.abs(gaze_angles(_eyes_looking(head, into_camera))).max() < 1e-6
    right_down = np.array([[np.sin(0.3), np.sin(0.2), -np.cos(0.3)]])
    gx, gy = gaze_angles(_eyes_looking(np.array([[0.2, -0.4, 0.1]]), right_down))[0]
    assert gx > 0.25 and gy > 0.15


def test_one_shared_fit_gives_the_same_pose_and_gaze_as_fitting_each():
    """predict fits the canonical face once per face for head pose and gaze: the same numbers as each
    fitting on its own, NaN rows included; a fit of other faces is refused."""
    rng = np.random.default_rng(1)
    head = rng.uniform(-0.4, 0.4, (5, 3))
    g = np.stack([rng.uniform(-0.3, 0.3, 5), rng.uniform(-0.3, 0.3, 5), -np.ones(5)], 1)
    lm = _eyes_looking(head, g / np.linalg.norm(g, axis=1, keepdims=True))
    lm[2, 10, 0] = np.nan
    fit = fit_canonical(lm)
    np.testing.assert_array_equal(gaze_angles(lm, fit), gaze_angles(lm))
    np.testing.assert_array_equal(head_pose_3d(lm, fit), head_pose_3d(lm))
    assert np.isnan(gaze_angles(lm, fit)[2]).all() and np.isfinite(head_pose_3d(lm, fit)[[0, 1, 3, 4]]).all()
    with pytest.raises(ValueError, match="a fit of 4 faces for 5"):
        gaze_angles(lm, fit_canonical(lm[:4]))
    with pytest.raises(ValueError, match="a fit of 4 faces for 5"):
        head_pose_3d(lm, fit_canonical(lm[:4]))


def test_non_finite_rows_give_nan_and_irises_are_required():
    lm = _eyes_looking(np.zeros((3, 3)), np.tile([0.0, 0.0, -1.0], (3, 1)))
    lm[1, 470, 1] = np.nan
    got = gaze_angles(lm)
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()
    assert np.isnan(gaze_angles(np.full((2, 478, 3), np.nan))).all()
    assert gaze_angles(np.zeros((0, 478, 3))).shape == (0, 2)
    with pytest.raises(ValueError, match="478"):
        gaze_angles(lm[:, :468])


@pytest.fixture(scope="module")
def real() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pytest.importorskip("skimage")
    return real_faces()


@pytest.mark.parametrize("name", PHOTOS)
def test_eyes_looking_into_the_camera_read_near_zero(real, name):
    _, lm = real[name]
    assert np.abs(gaze_angles(lm[None])).max() < 0.25


@pytest.mark.parametrize("name", PHOTOS)
def test_irises_moved_right_or_up_read_a_look_right_or_up(real, name):
    _, lm = real[name]
    width = np.linalg.norm(lm[263, :2] - lm[362, :2])  # one eye's width, pixels
    base = gaze_angles(lm[None])[0]
    looks = []
    for frac in (0.05, 0.1, 0.15, 0.2):
        moved = lm.copy()
        moved[468:, 0] += frac * width  # towards the image's right
        looks.append(gaze_angles(moved[None])[0])
    looks = np.array(looks)
    assert (np.diff(np.r_[base[0], looks[:, 0]]) > 0).all() and looks[-1, 0] > 0.3
    assert np.abs(looks[:, 1] - base[1]).max() < 0.05
    up = lm.copy()
    up[468:, 1] -= 0.15 * width  # towards the top of the image
    assert gaze_angles(up[None])[0, 1] < min(base[1] - 0.2, -0.1)


@pytest.mark.parametrize("name", PHOTOS)
def test_a_mirrored_face_looks_the_other_way(real, name):
    rgb, lm = real[name]
    base = gaze_angles(lm[None])[0]
    # the same landmarks mirrored: exactly the opposite look
    np.testing.assert_allclose(gaze_angles(mirror_landmarks(lm[None]))[0], base * [-1, 1], atol=1e-5)
    # the photo mirrored: the landmarker's own asymmetry adds to it
    got = gaze_angles(landmarks_of(mirror(rgb)))[0]
    np.testing.assert_allclose(got, base * [-1, 1], atol=0.08)


@pytest.mark.slow
def test_real_averted_looks_flip_with_the_photo():
    """Real faces (SMILEsmileD's LFW crops) that clearly look left or right look the other way mirrored."""
    pytest.importorskip("skimage")
    crops = smile_crops(every=200, limit=60)
    if not crops:
        pytest.skip("../shared/data/smilesmiled is absent")
    pairs = []
    for img, _ in crops:
        a, b = landmarks_of(img), landmarks_of(mirror(img))
        if len(a) == 1 and len(b) == 1:
            pairs.append((gaze_angles(a)[0, 0], gaze_angles(b)[0, 0]))
    gx, gx_mirrored = np.array(pairs).T
    clear = np.abs(gx) > 0.2
    assert len(gx) >= 40 and clear.sum() >= 5  # MTCNN finds one face in 45 of the 60 canvases
    assert (np.sign(gx_mirrored[clear]) == -np.sign(gx[clear])).all()
    assert np.median(np.abs(gx + gx_mirrored)) < 0.1
