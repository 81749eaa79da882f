"""Head pose from 478 3D landmarks: the canonical face read from the bundle, the fit's exactness and
convention, and on real photos: expression leaves it alone, mirroring and in-plane rotation move it
exactly as geometry says."""

from __future__ import annotations

import re

import numpy as np
import pytest
from landmark_helpers import PHOTOS, landmarks_of, mirror, mirror_landmarks, real_faces, rotate

from mtaffect.faces.pose import euler_to_matrix, head_pose, matrix_to_euler
from mtaffect.geometry.bundle import CANONICAL_FACE, BundleError, read_member
from mtaffect.geometry.canonical import NUM_VERTICES, canonical_face, parse_canonical_face
from mtaffect.geometry.headpose import CANONICAL_TO_CAMERA, fit_canonical, head_pose_3d

DEG = np.pi / 180


# ---- the canonical face ----------------------------------------------------------------------------


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _encode(vertices: np.ndarray, ids, weights, triangles, packed: bool) -> bytes:
    """GeometryPipelineMetadata, written independently of the parser (proto field numbers)."""
    vb = np.concatenate([vertices, np.zeros((len(vertices), 2))], 1).astype("<f4").ravel()
    if packed:
        mesh = _len(3, vb.tobytes()) + _len(4, b"".join(_varint(int(i)) for i in triangles.ravel()))
    else:
        mesh = b"".join(_key(3, 5) + np.float32(v).tobytes() for v in vb)
        mesh += b"".join(_key(4, 0) + _varint(int(i)) for i in triangles.ravel())
    mesh = _key(1, 0) + _varint(0) + _key(2, 0) + _varint(0) + mesh
    basis = b"".join(
        _len(2, _key(1, 0) + _varint(int(i)) + _key(2, 5) + np.float32(w).tobytes())
        for i, w in zip(ids, weights, strict=True)
    )
    return _len(1, mesh) + basis + _key(3, 0) + _varint(1)


def test_the_canonical_face_is_a_symmetric_mean_face_in_cm():
    face = canonical_face()
    v = face.vertices
    assert v.shape == (NUM_VERTICES, 3) and face.triangles.shape == (898, 3)
    assert len(face.procrustes_ids) == 33 and face.procrustes_weights.sum() == pytest.approx(1.0)
    # x to the viewer's right (33, the eye corner on the image's left, has x < 0), y up (forehead 10 above
    # chin 152), z towards the viewer (the nose tip 4 in front)
    assert v[33, 0] < 0 < v[263, 0] and v[10, 1] > v[1, 1] > v[152, 1] and v[4, 2] == v[:, 2].max()
    assert np.linalg.norm(v[33] - v[263]) == pytest.approx(8.9, abs=0.3)  # outer eye corners, cm
    # mirror-symmetric, basis and weights too: a mirrored face gets a mirrored pose
    flipped = v * [-1, 1, 1]
    partner = np.argmin(np.linalg.norm(v[:, None] - flipped[None], axis=2), axis=1)
    np.testing.assert_allclose(v[partner], flipped, atol=1e-5)
    pos = {int(i): k for k, i in enumerate(face.procrustes_ids)}
    for k, i in enumerate(face.procrustes_ids):
        assert face.procrustes_weights[pos[int(partner[i])]] == pytest.approx(face.procrustes_weights[k])
    with pytest.raises(ValueError):
        v[0, 0] = 1.0  # cached and shared: read-only


@pytest.mark.parametrize("packed", [False, True])
def test_the_parser_reads_protobuf_as_written(packed):
    face = canonical_face()
    w = face.procrustes_weights * 3
    data = _encode(face.vertices, face.procrustes_ids, w, face.triangles, packed)
    got = parse_canonical_face(data)
    np.testing.assert_array_equal(got.vertices, face.vertices)
    np.testing.assert_array_equal(got.procrustes_ids, face.procrustes_ids)
    np.testing.assert_allclose(got.procrustes_weights, face.procrustes_weights, rtol=1e-6)
    np.testing.assert_array_equal(got.triangles, face.triangles)
    if not packed:  # the vendored member is written this way, field for field
        assert len(data) == len(read_member(CANONICAL_FACE))


def test_a_damaged_canonical_face_is_an_error_naming_it():
    good = read_member(CANONICAL_FACE)
    face = canonical_face()
    bad = {
        "empty": b"",
        "truncated varint": good[:-1],
        "truncated field": good[: len(good) // 2],
        "group wire type": _key(1, 3) + good,
        "too few vertices": _encode(face.vertices[:-1], [1, 2, 3], [1, 1, 1], face.triangles[:5], True),
        "landmark id out of range": _encode(face.vertices, [1, 2, 468], [1, 1, 1], face.triangles, True),
        "zero weight": _encode(face.vertices, [1, 2, 3], [1, 0, 1], face.triangles, True),
        "index out of range": _encode(face.vertices, [1, 2, 3], [1, 1, 1], np.array([[0, 1, 468]]), True),
    }
    for what, data in bad.items():
        with pytest.raises(BundleError, match=re.escape(CANONICAL_FACE)):
            parse_canonical_face(data)
            pytest.fail(what)
    rng = np.random.default_rng(0)
    for _ in range(100):  # random damage: parsed (harmless bytes) or a BundleError, never anything else
        b = bytearray(good)
        for i in rng.integers(0, len(b), rng.integers(1, 4)):
            b[i] = rng.integers(0, 256)
        try:
            parse_canonical_face(bytes(b))
        except BundleError as e:
            assert CANONICAL_FACE in str(e)


# ---- the fit: exact, in OpenFace's convention ------------------------------------------------------


def _posed(angles: np.ndarray, scale, shift) -> np.ndarray:
    """Landmarks (n, 478, 3) of the canonical face at head rotation ``angles`` (irises at the eye centres)."""
    v = canonical_face().vertices
    v = np.concatenate([v, np.repeat(v[[159]], 5, 0), np.repeat(v[[386]], 5, 0)]) @ CANONICAL_TO_CAMERA
    pts = np.einsum("nij,kj->nki", euler_to_matrix(angles), v)
    return np.asarray(scale)[..., None, None] * pts + np.asarray(shift)[..., None, :]


def test_recovers_a_rotated_canonical_face_exactly():
    rng = np.random.default_rng(0)
    n = 500
    angles = rng.uniform([-40, -70, -60], [40, 70, 60], (n, 3)) * DEG
    scale = rng.uniform(2, 40, n)
    shift = rng.uniform([0, 0, -50], [1000, 800, 50], (n, 3))
    lm = _posed(angles, scale, shift)
    got = head_pose_3d(lm)
    assert got.dtype == np.float32 and got.shape == (n, 3)
    assert np.abs(got - angles).max() < 0.1 * DEG
    fit = fit_canonical(lm)
    np.testing.assert_allclose(fit.scale, scale, rtol=1e-9)
    np.testing.assert_allclose(fit.shift, shift, atol=1e-8)
    # 468 landmarks (no irises) are enough; float32 input too
    np.testing.assert_allclose(head_pose_3d(lm[:, :468].astype(np.float32)), angles, atol=0.1 * DEG)


def test_signs_mean_what_openface_says():
    """Pitch > 0: chin down (nose tip below its frontal place); yaw > 0: nose to the image's left;
    roll > 0: the face turned clockwise on screen (the eye on the image's right lower)."""
    front = _posed(np.zeros((1, 3)), 10.0, [200.0, 200.0, 0.0])[0]
    assert np.abs(head_pose_3d(front[None])).max() < 1e-6
    for axis, check in (
        (0, lambda p: p[1, 1] > front[1, 1]),
        (1, lambda p: p[1, 0] < front[1, 0]),
        (2, lambda p: p[263, 1] > p[33, 1]),
    ):
        a = np.zeros((1, 3))
        a[0, axis] = 15 * DEG
        p = _posed(a, 10.0, [200.0, 200.0, 0.0])
        assert check(p[0])
        assert head_pose_3d(p)[0, axis] == pytest.approx(15 * DEG, abs=1e-5)


def test_non_finite_rows_give_nan_never_an_exception():
    lm = _posed(np.array([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.2, -0.3, 0.1]]), 5.0, [100.0, 100.0, 0.0])
    lm[0, 468, 2] = np.nan  # an iris depth: still a non-finite row
    lm[2, 4, 0] = np.inf
    got = head_pose_3d(lm)
    assert np.isnan(got[[0, 2]]).all() and np.isfinite(got[1]).all()
    assert np.isnan(head_pose_3d(np.full((3, 478, 3), np.nan))).all()
    assert head_pose_3d(np.zeros((0, 478, 3))).shape == (0, 3)
    with pytest.raises(ValueError, match="468"):
        head_pose_3d(np.zeros((2, 5, 2)))


# ---- real photos -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pytest.importorskip("skimage")
    return real_faces()


def _deform(lm: np.ndarray, move) -> np.ndarray:
    """Move a real face's landmarks by ``move(canonical vertices) -> (468, 3)`` cm, in its own head frame
    (the fit's rotation and scale), the irises with the upper eyelid's centre."""
    fit = fit_canonical(lm[None])
    r, s = fit.rotation[0], fit.scale[0]
    d = move(canonical_face().vertices)
    d = np.concatenate([d, np.repeat(d[[159]], 5, 0), np.repeat(d[[386]], 5, 0)]) @ CANONICAL_TO_CAMERA
    return lm + s * d @ r.T


def _ramp(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def jaw_drop(v: np.ndarray, drop: float = 1.5) -> np.ndarray:
    """AU26/27: the mandible swings open, the chin 1.5 cm down and 0.6 cm back (lips ~1.5 cm apart);
    the lower lip and everything below the mouth line move, points near the jaw joint less."""
    joint = np.array([0.5, -3.5])  # (y, z) near the ear
    reach = np.clip(np.linalg.norm(v[:, 1:] - joint, axis=1) / np.linalg.norm(v[152, 1:] - joint), 0, 1)
    return (_ramp(-v[:, 1], 4.2, 4.6) * reach)[:, None] * [0.0, -drop, -0.4 * drop]


def smile(v: np.ndarray) -> np.ndarray:
    """AU12 + AU6: mouth corners 0.5 cm out, 0.4 cm up (the mouth ~1 cm wider), cheeks 0.3 cm up."""
    d = np.zeros_like(v)
    for corner, side in ((61, -1.0), (291, 1.0)):
        d += np.exp(-((v - v[corner]) ** 2).sum(1) / 2)[:, None] * [0.5 * side, 0.4, -0.2]
    for cheek in (205, 425):
        d += np.exp(-((v - v[cheek]) ** 2).sum(1) / (2 * 1.5**2))[:, None] * [0.0, 0.3, 0.1]
    return d


def brow_raise(v: np.ndarray, lift: float = 0.8) -> np.ndarray:
    """AU1 + AU2: brows 0.8 cm up, the forehead skin above them less, up to the hairline not at all."""
    return (_ramp(v[:, 1], 3.4, 4.3) * np.clip((8.3 - v[:, 1]) / 4.0, 0, 1))[:, None] * [0.0, lift, 0.0]


def surprise(v: np.ndarray) -> np.ndarray:
    return jaw_drop(v) + brow_raise(v)


def five_points(lm: np.ndarray) -> np.ndarray:
    """MTCNN's five points of 478 landmarks: eye centres (irises), nose tip, mouth corners."""
    return lm[..., [468, 473, 1, 61, 291], :2]


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("expression", [jaw_drop, smile, brow_raise, surprise])
def test_expression_does_not_move_the_pose(real, name, expression):
    _, lm = real[name]
    moved = _deform(lm, expression)
    shift = np.linalg.norm(moved - lm, axis=1)
    assert shift.max() > 0.6 * fit_canonical(lm[None]).scale[0]  # some point moved >= 0.6 cm
    change = np.abs(head_pose_3d(moved[None]) - head_pose_3d(lm[None]))[0]
    assert change.max() < 2 * DEG, change / DEG
    if expression is not brow_raise:  # brows are not among the five points
        change5 = np.abs(head_pose(five_points(moved)[None]) - head_pose(five_points(lm)[None]))[0]
        assert change5.max() > max(2 * DEG, 5 * change.max()), (change5 / DEG, change / DEG)


@pytest.mark.parametrize("name", PHOTOS)
def test_a_mirrored_photo_negates_yaw_and_roll_and_keeps_pitch(real, name):
    rgb, lm = real[name]
    base = head_pose_3d(lm[None])[0]
    # the fit itself is exactly symmetric: the same landmarks mirrored
    np.testing.assert_allclose(head_pose_3d(mirror_landmarks(lm[None]))[0], base * [1, -1, -1], atol=1e-5)
    # the photo mirrored: the landmarker's own asymmetry adds to it
    got = head_pose_3d(landmarks_of(mirror(rgb)))[0]
    np.testing.assert_allclose(got, base * [1, -1, -1], atol=2 * DEG)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("degrees", [-15, 15])
def test_an_in_plane_rotation_changes_roll_by_the_angle(real, name, degrees):
    """PIL turns the photo counter-clockwise: the head's rotation becomes ``Rz(-a) @ R`` in camera
    coordinates. With OpenFace's ``R = Rx Ry Rz`` that is roll - a exactly only for pitch = yaw = 0;
    a real face's pitch p leaks into yaw by about p sin(a) (2.4° for the astronaut's 9° at 15°), so the
    exact composition is what is checked to 2°, and roll's change against the angle."""
    rgb, lm = real[name]
    r0 = fit_canonical(lm[None]).rotation[0]
    got = head_pose_3d(landmarks_of(rotate(rgb, degrees)))[0]
    expect = matrix_to_euler(euler_to_matrix(np.array([0.0, 0.0, -degrees * DEG])) @ r0)
    np.testing.assert_allclose(got, expect, atol=2 * DEG)
    base = matrix_to_euler(r0)
    assert got[2] - base[2] == pytest.approx(-degrees * DEG, abs=2 * DEG)
    assert np.abs(got[:2] - base[:2]).max() < 3 * DEG
