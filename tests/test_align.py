"""Alignment and box crops: exact geometry, padding outside the image, batch == single, real-face check."""

from __future__ import annotations

import numpy as np
import pytest

from mtaffect.faces import (
    MTCNN,
    REFERENCE_5PT_112,
    align_face,
    align_faces,
    crop_box,
    crop_boxes,
    similarity_transform,
)
from mtaffect.faces.align import warp_image

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([rot, [[tx], [ty]]], 1)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def test_reference_template_is_the_arcface_112_template():
    assert REFERENCE_5PT_112.shape == (5, 2)
    np.testing.assert_allclose(REFERENCE_5PT_112[0], (38.2946, 51.6963))
    np.testing.assert_allclose(REFERENCE_5PT_112[4], (70.7299, 92.2041))
    assert not REFERENCE_5PT_112.flags.writeable


@pytest.mark.parametrize(
    ("angle", "scale", "tx", "ty"), [(0, 1, 0, 0), (30, 1.7, -12.5, 40), (-170, 0.4, 300, -7)]
)
def test_similarity_transform_recovers_a_known_transform(angle, scale, tx, ty):
    src = np.random.default_rng(0).uniform(-50, 150, (5, 2))
    m = _similarity(angle, scale, tx, ty)
    np.testing.assert_allclose(similarity_transform(src, _apply(m, src)), m, atol=1e-9)


def test_similarity_transform_never_reflects():
    src = REFERENCE_5PT_112.copy()
    mirrored = src * [-1, 1]
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_similarity_transform_rejects_degenerate_points():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), REFERENCE_5PT_112)
    with pytest.raises(ValueError, match="NaN"):
        similarity_transform(np.full((5, 2), np.nan), REFERENCE_5PT_112)


def test_landmarks_on_the_template_align_to_the_identity():
    img = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align_face(img, REFERENCE_5PT_112), img)


def test_alignment_undoes_a_known_warp():
    """Warp a 112 crop onto a canvas by a similarity; aligning with the moved landmarks gets it back."""
    yy, xx = np.mgrid[0:112, 0:112]
    smooth = np.stack([xx * 2, yy * 2, xx + yy], -1).astype(np.uint8)  # smooth: bilinear is nearly exact
    m = _similarity(25, 2.0, 120, 20)  # crop -> canvas, all of it inside
    canvas = warp_image(smooth, m[None], (400, 400))[0]
    back = align_face(canvas, _apply(m, REFERENCE_5PT_112))
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(back[inner].astype(int) - smooth[inner]).max() <= 2


def test_custom_size_and_template():
    img = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    big_template = (REFERENCE_5PT_112 + 0.5) * 2 - 0.5
    np.testing.assert_array_equal(align_face(img, big_template, size=224), img)  # default template scales
    custom = REFERENCE_5PT_112 + np.array([3.0, -2.0])
    shifted = align_face(img[:112, :112], REFERENCE_5PT_112, template=custom)
    np.testing.assert_array_equal(shifted[10:100, 10:100], img[12:102, 7:97])


def test_batch_equals_single():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    lms = np.stack(
        [
            _apply(_similarity(a, s, tx, ty), REFERENCE_5PT_112)
            for a, s, tx, ty in [(10, 2.5, 100, 20), (-40, 0.8, 250, 120), (0, 1.0, 5, 5)]
        ]
    )
    batch = align_faces(img, lms)
    assert batch.shape == (3, 112, 112, 3) and batch.dtype == np.uint8
    for face, lm in zip(batch, lms, strict=True):
        np.testing.assert_array_equal(face, align_face(img, lm))
    boxes = np.array([[10, 20, 110, 140], [300, 250, 420, 330]], np.float32)
    crops = crop_boxes(img, boxes, margin=0.3, size=64)
    for crop, box in zip(crops, boxes, strict=True):
        np.testing.assert_array_equal(crop, crop_box(img, box, margin=0.3, size=64))
    assert align_faces(img, np.zeros((0, 5, 2))).shape == (0, 112, 112, 3)


def test_crop_box_pads_outside_the_image():
    img = np.random.default_rng(4).integers(1, 256, (100, 100, 3), dtype=np.uint8)  # no black pixel
    crop = crop_box(img, np.array([-20.0, -20.0, 40.0, 40.0]), margin=0.0, size=60)  # scale 1: exact
    assert crop.shape == (60, 60, 3)
    assert not crop[:20].any() and not crop[:, :20].any()
    np.testing.assert_array_equal(crop[20:, 20:], img[:40, :40])


def test_crop_box_margin_grows_the_square():
    img = np.zeros((200, 200, 3), np.uint8)
    img[80:120, 90:110] = 255  # a 20 x 40 white box
    tight = crop_box(img, np.array([90.0, 80.0, 110.0, 120.0]), margin=0.0, size=40)
    loose = crop_box(img, np.array([90.0, 80.0, 110.0, 120.0]), margin=1.0, size=40)
    assert tight[:, 10:30].min() == 255 and tight[:, :9].max() == 0  # square side = max(w, h) = 40
    assert (loose > 127).all(-1).sum() == pytest.approx(20 * 10, rel=0.1)  # side 80 -> half-size


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda img: align_face(img, np.zeros((4, 2))), "shape"),
        (lambda img: align_faces(img, np.zeros((5, 2))), "shape"),
        (lambda img: crop_box(img, np.array([5.0, 5.0, 5.0, 9.0])), "x2 > x1"),
        (lambda img: align_face(img.astype(np.float32), REFERENCE_5PT_112), "uint8 RGB"),
    ],
)
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.zeros((50, 50, 3), np.uint8))


def test_detected_astronaut_aligns_onto_the_template():
    skimage_data = pytest.importorskip("skimage.data")
    detector = MTCNN()
    img = skimage_data.astronaut()
    (faces,) = detector.detect(img)
    lm = faces.landmarks[0]
    m = similarity_transform(lm, REFERENCE_5PT_112)
    residual = np.linalg.norm(_apply(m, lm) - REFERENCE_5PT_112, axis=1)
    assert residual[:2].max() < 4 and residual.max() < 8  # eyes tight; a broad smile moves the mouth
    (again,) = detector.detect(align_face(img, lm))  # the aligned crop's own landmarks sit on the template
    assert len(again) == 1
    assert np.linalg.norm(again.landmarks[0] - REFERENCE_5PT_112, axis=1).max() < 8
