"""The face landmarker on our own faces: parity with MediaPipe's FaceLandmarker, and bad inputs.

MediaPipe (a test-only dependency) is the reference. Its landmark model answers the crop it is given,
and MediaPipe itself gives different answers for the same photo depending on the crop: its IMAGE mode
(the crop from its own detector) and its VIDEO mode once tracking has settled (the crop from the
previous landmarks) differ by 1.0-1.3% of the eye distance and up to 0.11 in a blendshape on the photos
below. Parity is therefore tested where both see the same face crop (the issue's bar: landmarks within
1% of the inter-ocular distance, blendshapes within 0.02), and from our own detections against
MediaPipe's IMAGE mode with the bound that its own two modes keep.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mtaffect.geometry.bundle import BUNDLE_PATH, BundleError, read_member
from mtaffect.geometry.landmarker import (
    MIN_PRESENCE,
    FaceGeometry,
    FaceLandmarker,
    detection_regions,
    landmark_regions,
)
from mtaffect.schema import BLENDSHAPE_NAMES, NUM_DENSE_LANDMARKS

skimage_data = pytest.importorskip("skimage.data")


def _photos() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        grace = np.asarray(im.convert("RGB"))
    return {"astronaut": skimage_data.astronaut(), "grace_hopper": grace}


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return _photos()


@pytest.fixture(scope="module")
def ours() -> FaceLandmarker:
    return FaceLandmarker(threads=1)


@pytest.fixture(scope="module")
def mtcnn():
    from mtaffect.faces.mtcnn import MTCNN

    return MTCNN()


def _mediapipe(mode: str):
    mp = pytest.importorskip("mediapipe")
    from mediapipe.tasks.python import BaseOptions, vision

    running = vision.RunningMode.VIDEO if mode == "video" else vision.RunningMode.IMAGE
    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_buffer=BUNDLE_PATH.read_bytes()),
        output_face_blendshapes=True,
        num_faces=1,
        running_mode=running,
    )
    return mp, vision.FaceLandmarker.create_from_options(options)


def _points(result, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    pts = np.array([[p.x * w, p.y * h, p.z * w] for p in result.face_landmarks[0]])
    return pts, np.array([c.score for c in result.face_blendshapes[0]])


def _iod(points: np.ndarray) -> float:
    return float(np.linalg.norm(points[468, :2] - points[473, :2]))  # iris centres


@pytest.fixture(scope="module")
def mediapipe_tracked(photos) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MediaPipe's VIDEO mode on each photo shown 40 times: tracking settles on the crop its own
    landmarks give (what :func:`landmark_regions` reproduces)."""
    out = {}
    for name, img in photos.items():
        mp, landmarker = _mediapipe("video")
        frame = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img))
        for t in range(40):
            result = landmarker.detect_for_video(frame, t * 40)
        out[name] = _points(result, *img.shape[:2])
        landmarker.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_same_crop_as_mediapipe_gives_its_landmarks_and_blendshapes(photos, ours, mediapipe_tracked, name):
    img = photos[name]
    ref_points, ref_shapes = mediapipe_tracked[name]
    pts, presence = ours._landmarks(Image.fromarray(img), landmark_regions(ref_points[None]))
    err = np.linalg.norm(pts[0, :, :2] - ref_points[:, :2], axis=1) / _iod(ref_points)
    assert presence[0] > 0.99
    assert err.mean() < 0.01 and np.percentile(err, 95) < 0.01, (err.mean(), err.max())
    depth = np.abs(pts[0, :, 2] - ref_points[:, 2]) / _iod(ref_points)
    assert depth.mean() < 0.01  # z scaled like x, as MediaPipe's z times the image width
    shapes = ours._blendshapes(pts[0])
    assert np.abs(shapes - ref_shapes).max() < 0.02


def test_blendshape_model_reproduces_mediapipe_from_its_own_points(photos, ours, mediapipe_tracked):
    for name in photos:
        ref_points, ref_shapes = mediapipe_tracked[name]
        np.testing.assert_allclose(ours._blendshapes(ref_points), ref_shapes, atol=1e-4)


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_from_our_detections_within_what_mediapipe_itself_varies(
    photos, ours, mtcnn, mediapipe_tracked, name
):
    """From MTCNN's boxes (stills: one refinement pass) against MediaPipe's IMAGE mode: about as close
    as MediaPipe's IMAGE and settled VIDEO answers are to each other (1.0-1.3% of the eye distance)."""
    img = photos[name]
    mp, landmarker = _mediapipe("image")
    ref_points, ref_shapes = _points(
        landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img))),
        *img.shape[:2],
    )
    landmarker.close()
    det = mtcnn.detect([img])[0]
    geo = ours.measure(img, det.boxes, det.landmarks, refine=True)
    k = int(np.argmin(np.linalg.norm(geo.points[:, 1, :2] - ref_points[1, :2], axis=1)))
    err = np.linalg.norm(geo.points[k, :, :2] - ref_points[:, :2], axis=1) / _iod(ref_points)
    assert err.mean() < 0.02
    assert np.abs(geo.blendshapes[k] - ref_shapes).max() < 0.15
    # MediaPipe against itself, for scale (IMAGE vs settled VIDEO)
    tracked, _ = mediapipe_tracked[name]
    own = np.linalg.norm(tracked[:, :2] - ref_points[:, :2], axis=1) / _iod(ref_points)
    assert err.mean() < 2 * own.mean()


def test_geometry_is_in_image_pixels_with_one_row_per_face(photos, ours, mtcnn):
    img = photos["astronaut"]
    det = mtcnn.detect([img])[0]
    geo = ours.measure(img, det.boxes, det.landmarks)
    assert geo.points.shape == (len(det), NUM_DENSE_LANDMARKS, 3)
    assert geo.blendshapes.shape == (len(det), len(BLENDSHAPE_NAMES))
    assert geo.measured.all() and (geo.presence >= MIN_PRESENCE).all()
    assert ((geo.blendshapes >= 0) & (geo.blendshapes <= 1)).all()
    # the points lie in the face box MTCNN found (a little beyond it at the chin and temples)
    b = det.boxes[0]
    w = b[2] - b[0]
    inside = (
        (geo.points[0, :, 0] > b[0] - 0.3 * w)
        & (geo.points[0, :, 0] < b[2] + 0.3 * w)
        & (geo.points[0, :, 1] > b[1] - 0.3 * w)
        & (geo.points[0, :, 1] < b[3] + 0.3 * w)
    )
    assert inside.all()
    # MTCNN's eyes and MediaPipe's iris centres agree (image left eye = subject's right: point 468)
    eyes = geo.points[0, [468, 473], :2]
    assert np.linalg.norm(eyes - det.landmarks[0, :2], axis=1).max() < 0.15 * np.linalg.norm(
        det.landmarks[0, 1] - det.landmarks[0, 0]
    )


def test_rotated_photo_gives_the_rotated_points(photos, ours, mtcnn):
    """The roll from MTCNN's eyes puts the face upright in the crop: the points follow the image."""
    img = photos["grace_hopper"]
    h, w = img.shape[:2]
    rot = np.asarray(Image.fromarray(img).rotate(20, resample=Image.Resampling.BILINEAR))
    d0, d1 = mtcnn.detect([img])[0], mtcnn.detect([rot])[0]
    g0 = ours.measure(img, d0.boxes, d0.landmarks)
    g1 = ours.measure(rot, d1.boxes, d1.landmarks)
    a = np.deg2rad(20)  # PIL rotates counter-clockwise about the centre
    c = np.array([w / 2, h / 2])
    rel = g0.points[0, :, :2] - c
    expected = c + rel @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    err = np.linalg.norm(g1.points[0, :, :2] - expected, axis=1) / _iod(g0.points[0])
    assert err.mean() < 0.03


def test_bad_faces_give_nan_rows_never_an_error(photos, ours):
    img = photos["astronaut"]
    h, w = img.shape[:2]
    boxes = np.array(
        [
            [200, 100, 208, 108],  # a few pixels: too small to measure
            [w - 30, 10, w + 60, 100],  # mostly outside the picture
            [0, h - 120, 110, h],  # the astronaut's suit, no face
            [np.nan, 0, 10, 10],  # nonsense
        ],
        np.float32,
    )
    geo = ours.measure(img, boxes)
    assert len(geo) == 4
    assert not geo.measured[[0, 3]].any()
    for k in np.flatnonzero(~geo.measured):
        assert np.isnan(geo.points[k]).all() and np.isnan(geo.blendshapes[k]).all()
    assert np.isfinite(geo.blendshapes[geo.measured]).all()


def test_greyscale_photo_is_measured(ours, mtcnn):
    grey = skimage_data.camera()
    rgb = np.repeat(grey[..., None], 3, axis=2)
    det = mtcnn.detect([rgb])[0]
    assert len(det)
    geo_grey = ours.measure(grey, det.boxes, det.landmarks)
    geo_rgb = ours.measure(rgb, det.boxes, det.landmarks)
    np.testing.assert_array_equal(geo_grey.points, geo_rgb.points)


def test_no_faces_and_concat():
    empty = FaceGeometry.empty(0)
    assert FaceGeometry.concat([]).points.shape == (0, NUM_DENSE_LANDMARKS, 3)
    assert len(FaceGeometry.concat([empty, FaceGeometry.empty(2)])) == 2


def test_regions_square_and_rolled():
    five = np.array([[[20, 40], [40, 50], [30, 55], [22, 65], [38, 70]]])
    r = detection_regions(np.array([[10, 20, 50, 80]]), five)
    np.testing.assert_allclose(r.centre, [[30, 50]])
    np.testing.assert_allclose(r.side, [90])  # 1.5 x the longer side
    np.testing.assert_allclose(r.angle, [np.arctan2(10, 20)])


def test_a_damaged_bundle_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "face_landmarker.task"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match=r"face_landmarker\.task"):
        read_member("face_landmarks_detector.tflite", bad)
    with pytest.raises(BundleError, match=r"no nothing\.tflite"):
        read_member("nothing.tflite")


def test_without_litert_predict_says_what_to_do_before_any_work(monkeypatch):
    import importlib.util

    from mtaffect.predict.pipeline import Predictor

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "ai_edge_litert" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"pip install ai-edge-litert .*--landmarks none"):
        Predictor()
    Predictor(landmarks="none")  # the landmarker is not needed
