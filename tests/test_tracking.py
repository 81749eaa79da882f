"""Face identities: stable ids from overlap and appearance, ageing, O-Net refinement between detections."""

from __future__ import annotations

import numpy as np
import pytest

from mtaffect.predict.tracking import FaceTracker, iou_matrix


def _box(cx: float, cy: float, s: float = 80) -> np.ndarray:
    return np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]])


def test_ids_follow_two_moving_faces_whatever_the_detection_order():
    tr = FaceTracker()
    rng = np.random.default_rng(0)
    first = tr.update(np.stack([_box(100, 200), _box(400, 200)]))
    assert first.tolist() == [0, 1]
    for t in range(1, 60):
        boxes = [_box(100 + 2 * t, 200 + 3 * np.sin(t)), _box(400 - 2 * t, 200)]
        order = rng.permutation(2)  # detectors list faces by score: the order changes
        ids = tr.update(np.stack([boxes[i] for i in order]))
        assert dict(zip(order.tolist(), ids.tolist(), strict=True)) == {0: 0, 1: 1}


def test_a_new_face_gets_a_new_id_and_ids_are_never_reused():
    tr = FaceTracker(max_age=3)
    assert tr.update(_box(100, 100)[None]).tolist() == [0]
    assert tr.update(np.stack([_box(102, 100), _box(400, 300)])).tolist() == [0, 1]
    for _ in range(5):  # both leave for longer than max_age
        tr.update(np.zeros((0, 4)))
    assert tr.update(_box(102, 100)[None]).tolist() == [2]


def test_short_gap_keeps_the_id():
    tr = FaceTracker(max_age=5)
    tr.update(_box(100, 100)[None])
    tr.update(np.zeros((0, 4)))
    tr.update(np.zeros((0, 4)))
    assert tr.update(_box(104, 100)[None]).tolist() == [0]


def test_appearance_relinks_a_fast_move_and_separates_crossing_faces():
    a, b = np.eye(8)[0], np.eye(8)[1]
    tr = FaceTracker()
    tr.update(_box(100, 100)[None], a[None])
    # a jump of one box side: no overlap, but the same appearance
    assert tr.update(_box(170, 100)[None], a[None]).tolist() == [0]
    # without features the same jump starts a new track
    tr2 = FaceTracker()
    tr2.update(_box(100, 100)[None])
    assert tr2.update(_box(170, 100)[None]).tolist() == [1]
    # crossing: both boxes overlap both tracks about equally; appearance decides
    tr3 = FaceTracker()
    tr3.update(np.stack([_box(100, 100), _box(140, 100)]), np.stack([a, b]))
    ids = tr3.update(np.stack([_box(125, 100), _box(115, 100)]), np.stack([a, b]))
    assert ids.tolist() == [0, 1]


def test_reset_starts_again_at_zero():
    tr = FaceTracker()
    tr.update(np.stack([_box(100, 100), _box(300, 100)]))
    tr.reset()
    assert tr.update(_box(300, 100)[None]).tolist() == [0]
    assert tr.live_boxes().shape == (1, 4)


def test_refine_boxes_follows_a_face_and_drops_it_when_gone():
    skimage = pytest.importorskip("skimage")
    from mtaffect.faces import MTCNN

    img = skimage.data.astronaut()
    det = MTCNN()
    found = det.detect(img)[0]
    shifted = np.zeros_like(img)
    shifted[:, 12:] = img[:, :-12]  # the face moved 12 px to the right
    ref = det.refine(shifted, found.boxes)
    assert len(ref) == 1 and ref.scores[0] > 0.9
    centre_old = (found.boxes[0, 0] + found.boxes[0, 2]) / 2
    centre_new = (ref.boxes[0, 0] + ref.boxes[0, 2]) / 2
    assert 6 < centre_new - centre_old < 18
    assert ref.landmarks.shape == (1, 5, 2)
    blank = np.full_like(img, 128)
    assert len(det.refine(blank, found.boxes)) == 0
    assert len(det.refine(img, np.zeros((0, 4)))) == 0
