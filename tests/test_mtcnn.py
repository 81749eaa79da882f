"""MTCNN: the embedded weights find the astronaut's one face; batched == single; fast paths are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from mtaffect.faces import MTCNN, FaceDetections
from mtaffect.faces.mtcnn import DEFAULT_WEIGHTS, _max_pool, box_iou, nms

skimage_data = pytest.importorskip("skimage.data")

#: Hand-measured face box of skimage.data.astronaut() (x1, y1, x2, y2).
ASTRONAUT_FACE = (181.0, 62.0, 268.0, 172.0)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def astronaut_faces(detector, astronaut) -> FaceDetections:
    return detector.detect(astronaut)[0]


def _iou(a, b) -> float:
    return float(box_iou(np.reshape(a, (1, 4)), np.reshape(b, (1, 4)))[0, 0])


def test_weights_are_safetensors_with_provenance():
    with safe_open(str(DEFAULT_WEIGHTS), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"pnet", "rnet", "onet"}
    assert meta["source_version"] == "2.6.0"
    assert all(len(meta[f"sha256_{n}.pt"]) == 64 for n in ("pnet", "rnet", "onet"))
    assert (DEFAULT_WEIGHTS.parent / "LICENSE-facenet-pytorch.txt").is_file()


def test_astronaut_has_exactly_one_face(astronaut_faces):
    assert len(astronaut_faces) == 1
    assert _iou(astronaut_faces.boxes[0], ASTRONAUT_FACE) > 0.7
    assert astronaut_faces.scores[0] > 0.99
    assert astronaut_faces.boxes.dtype == np.float32 and astronaut_faces.landmarks.shape == (1, 5, 2)


def test_astronaut_landmarks_are_anatomical(astronaut_faces):
    (le, re, nose, ml, mr), (x1, y1, x2, y2) = astronaut_faces.landmarks[0], astronaut_faces.boxes[0]
    assert le[0] < re[0] and ml[0] < mr[0]  # image left/right as seen
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])  # eyes above nose above mouth
    assert le[0] < nose[0] < re[0]
    pts = astronaut_faces.landmarks[0]
    assert np.all((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2))


def test_detections_follow_the_face(detector, astronaut, astronaut_faces):
    """Shifting the photo inside a larger canvas shifts the box and landmarks by the same amount."""
    dx, dy = 37, 21
    canvas = np.full((600, 640, 3), 128, np.uint8)
    canvas[dy : dy + 512, dx : dx + 512] = astronaut
    (moved,) = detector.detect(canvas)
    assert len(moved) == 1
    np.testing.assert_allclose(moved.boxes[0], astronaut_faces.boxes[0] + [dx, dy, dx, dy], atol=4)
    np.testing.assert_allclose(moved.landmarks[0], astronaut_faces.landmarks[0] + [dx, dy], atol=3)


def test_face_cut_by_the_image_edge_is_still_found(detector, astronaut):
    """The face's left third is outside the frame: crops are padded, not clamped."""
    cut = np.ascontiguousarray(astronaut[:, 210:])
    (faces,) = detector.detect(cut)
    assert len(faces) >= 1
    assert faces.boxes[0, 0] < 5  # the box runs to (or past) the left edge


def test_batch_and_mixed_sizes_match_single_calls(detector, astronaut):
    flipped = np.ascontiguousarray(astronaut[:, ::-1])
    small = np.ascontiguousarray(astronaut[40:300, 120:330])
    singles = [detector.detect(im)[0] for im in (astronaut, flipped, small)]
    batched = detector.detect([astronaut, flipped, small, astronaut])
    assert len(batched) == 4
    for got, want in zip(batched, [*singles, singles[0]], strict=True):
        assert len(got) == len(want)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
        np.testing.assert_allclose(got.landmarks, want.landmarks, atol=1e-3)
    # A stacked (N, H, W, 3) array is a batch too; the mirror image mirrors the landmarks' roles.
    stacked = detector.detect(np.stack([astronaut, flipped]))
    assert [len(d) for d in stacked] == [1, 1]
    le_flip = stacked[1].landmarks[0, 0, 0]
    assert abs(le_flip - (512 - stacked[0].landmarks[0, 1, 0])) < 4


def test_no_face_no_detection(detector):
    blank = np.full((240, 320, 3), 90, np.uint8)
    tiny = np.zeros((8, 8, 3), np.uint8)
    out = detector([blank, tiny])
    assert [len(d) for d in out] == [0, 0]
    assert out[0].boxes.shape == (0, 4) and out[0].landmarks.shape == (0, 5, 2)
    assert detector([]) == []


def test_larger_min_face_size_uses_fewer_levels_and_still_finds_a_big_face(astronaut):
    fine, coarse = MTCNN(), MTCNN(min_face_size=60)
    assert len(coarse.scales(512, 512)) < len(fine.scales(512, 512))
    (faces,) = coarse.detect(astronaut)
    assert len(faces) == 1 and _iou(faces.boxes[0], ASTRONAUT_FACE) > 0.7


@pytest.mark.parametrize(
    "bad",
    [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8)],
)
def test_bad_images_are_refused_with_a_hint(detector, bad):
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect(bad)


def test_bad_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        MTCNN(weights=tmp_path / "nowhere.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"pnet.conv1.weight": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match=r"other\.safetensors"):
        MTCNN(weights=other)


def _greedy_nms(boxes, scores, thr, groups, mode):
    """Plain reference: walk boxes by score, drop later same-group boxes overlapping a kept one."""
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(boxes, boxes, mode)
    keep: list[int] = []
    for i in order:
        if all(groups[i] != groups[j] or iou[j, i] <= thr for j in keep):
            keep.append(int(i))
    return keep


@pytest.mark.parametrize(("n", "n_groups"), [(1, 1), (40, 3), (300, 3), (2600, 1)])  # matrix/split/walk
@pytest.mark.parametrize("mode", ["union", "min"])
def test_vectorised_nms_equals_greedy_nms(n, n_groups, mode):
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 200, (n, 2)).astype(np.float32)
    wh = rng.uniform(5, 60, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.permutation(n).astype(np.float32)  # distinct: greedy order is unambiguous
    groups = rng.integers(0, n_groups, n)
    got = nms(boxes, scores, 0.5, groups, mode)
    assert got.tolist() == _greedy_nms(boxes, scores, 0.5, groups, mode)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_max_pool_equals_torch_ceil_mode(k, channels_last):
    for h, w in [(3, 3), (4, 7), (22, 22), (23, 46), (11, 10)]:
        x = torch.randn(2, 5, h, w)
        y = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        assert torch.equal(_max_pool(y, k), F.max_pool2d(x, k, 2, ceil_mode=True))
