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


def _look(k: int, dim: int = 16, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Appearance vector of person k (orthogonal people), optionally perturbed."""
    v = np.eye(dim)[k] + noise * np.random.default_rng(seed).normal(size=dim)
    return v / np.linalg.norm(v)


def test_a_returning_face_is_reidentified_by_appearance_within_the_memory():
    tr = FaceTracker(max_age=3, reid_memory=50)
    for t in range(5):
        assert tr.update(_box(100 + t, 100)[None], _look(0, seed=t)[None]).tolist() == [0]
    for _ in range(20):  # gone for longer than max_age, but within the memory
        tr.update(np.zeros((0, 4)), np.zeros((0, 16)))
    # comes back elsewhere (after a cut): same look -> same id; a new look -> a new id
    ids = tr.update(np.stack([_box(500, 300), _box(250, 300)]), np.stack([_look(0, noise=0.1), _look(1)]))
    assert ids.tolist() == [0, 1]
    # without re-identification the returning face would have had a new id
    plain = FaceTracker(max_age=3)
    for t in range(5):
        plain.update(_box(100 + t, 100)[None], _look(0)[None])
    for _ in range(20):
        plain.update(np.zeros((0, 4)), np.zeros((0, 16)))
    assert plain.update(_box(500, 300)[None], _look(0)[None]).tolist() == [1]


def test_a_cut_that_swaps_two_people_keeps_each_id():
    tr = FaceTracker(reid_memory=50)
    left, right = _box(100, 200), _box(500, 200)
    for _ in range(5):
        assert tr.update(np.stack([left, right]), np.stack([_look(0), _look(1)])).tolist() == [0, 1]
    # the next shot: person 1 on the left, person 0 on the right, no box overlap with before
    ids = tr.update(np.stack([_box(130, 330), _box(470, 330)]), np.stack([_look(1), _look(0)]))
    assert ids.tolist() == [1, 0]


def test_memory_expires_and_brief_tracks_are_not_remembered():
    tr = FaceTracker(max_age=2, reid_memory=10)
    for _ in range(4):
        tr.update(_box(100, 100)[None], _look(0)[None])
    for _ in range(15):  # longer than the memory
        tr.update(np.zeros((0, 4)), np.zeros((0, 16)))
    assert tr.update(_box(100, 100)[None], _look(0)[None]).tolist() == [1]
    # a face seen in one frame only (a passing false detection) cannot claim a later face
    tr2 = FaceTracker(max_age=2, reid_memory=50)
    tr2.update(_box(100, 100)[None], _look(2)[None])
    for _ in range(5):
        tr2.update(np.zeros((0, 4)), np.zeros((0, 16)))
    assert tr2.update(_box(300, 100)[None], _look(2)[None]).tolist() == [1]
    with pytest.raises(ValueError, match="reid_memory"):
        FaceTracker(reid_memory=-1)


def test_memories_in_seconds_follow_the_frame_rate_and_every():
    tr = FaceTracker.for_rate(30.0, every=3, reid_seconds=20)
    assert (tr.max_age, tr.reid_memory) == (10, 200)  # 1 s and 20 s at 10 analysed frames/s
    assert FaceTracker.for_rate(float("nan"), reid_seconds=0).reid_memory == 0  # off; 25 fps assumed
    assert FaceTracker.for_rate(float("nan")).max_age == 25


def test_a_face_first_seen_cut_off_at_the_edge_is_merged_into_its_remembered_id():
    tr = FaceTracker(max_age=2, reid_memory=100, reid_young=10)
    for _ in range(5):
        tr.update(_box(300, 200)[None], _look(0)[None])
    for _ in range(10):
        tr.update(np.zeros((0, 4)), np.zeros((0, 16)))
    # walks in from the left edge: the half-visible face looks different at first (a new id) ...
    half = _look(0) + 1.2 * _look(5)
    first = tr.update(_box(20, 200)[None], half[None])
    assert first.tolist() == [1]
    # ... and once fully in view its mean appearance matches the remembered face: merged, ids resolved
    ids = [tr.update(_box(20 + 10 * k, 200)[None], _look(0)[None]).tolist()[0] for k in range(1, 6)]
    assert ids[-1] == 0 and tr.canonical(np.array([1, 0, 3])).tolist() == [0, 0, 3]
