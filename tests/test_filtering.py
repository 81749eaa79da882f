"""Detection filter: a confidence floor and no face nested inside a larger face."""

from __future__ import annotations

import numpy as np
import pytest

from mtaffect.faces.filtering import filter_detections, nested_mask
from mtaffect.faces.mtcnn import FaceDetections


def _dets(boxes, scores) -> FaceDetections:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    lm = np.repeat(((b[:, :2] + b[:, 2:]) / 2)[:, None], 5, axis=1)
    return FaceDetections(b, np.asarray(scores, np.float32), lm)


def test_low_confidence_faces_are_dropped_and_the_order_kept():
    d = _dets([[0, 0, 50, 50], [100, 0, 150, 50], [200, 0, 250, 50]], [0.99, 0.85, 0.95])
    out = filter_detections(d, min_confidence=0.9)
    assert out.scores.tolist() == pytest.approx([0.99, 0.95])
    assert out.landmarks.shape == (2, 5, 2) and out.boxes[1, 0] == 200
    assert len(filter_detections(d, min_confidence=0.0, nested_overlap=None)) == 3


def test_a_face_inside_a_larger_face_is_dropped_not_a_neighbour():
    # the multi_face.jpg case: a 28 px "face" in the sunglasses, 57% inside its wearer's 79 px box
    wearer, lens = [219, 71, 298, 171], [282, 112, 310, 147]
    neighbour = [300, 80, 380, 180]  # touching the wearer's box, a real face
    d = _dets([wearer, lens, neighbour], [0.999, 0.945, 0.99])
    out = filter_detections(d, min_confidence=0.9)
    assert out.boxes.tolist() == [wearer, neighbour]
    assert len(filter_detections(d, min_confidence=0.9, nested_overlap=None)) == 3
    assert len(filter_detections(d, min_confidence=0.9, nested_overlap=0.7)) == 3  # 57% < 70%


def test_nested_mask_decides_larger_boxes_first():
    # c lies inside b, b inside a: b goes, and c is judged against a only (it is inside a too)
    boxes = np.array([[0, 0, 100, 100], [10, 10, 60, 60], [20, 20, 40, 40], [200, 200, 220, 220]])
    assert nested_mask(boxes, 0.5).tolist() == [False, True, True, False]
    assert not nested_mask(np.zeros((0, 4)), 0.5).any()


def test_predictor_checks_the_filter_options():
    from mtaffect.predict.pipeline import Predictor

    with pytest.raises(ValueError, match="min_confidence"):
        Predictor(min_confidence=1.5)
    with pytest.raises(ValueError, match="nested_overlap"):
        Predictor(nested_overlap=0.0)


@pytest.mark.slow
def test_a_weak_tracked_box_triggers_a_full_detection_instead_of_losing_the_face(tmp_path):
    """Between full detections O-Net follows the old box; when the face moved far it scores below
    min_confidence, and the frame must then be searched again, not left without its face."""
    pytest.importorskip("skimage")
    from mtaffect.predict import demo_media
    from mtaffect.predict.pipeline import Predictor

    video = demo_media.make_demo_video(tmp_path / "fast.mp4", seconds=7.2, faces=1)
    df = Predictor(every=5, detect_every=5).predict(video)
    assert (df["success"] == 1).all() and df["frame"].nunique() == 36


def test_cli_defaults_are_the_library_defaults():
    """The CLI spells its defaults out (its start-up must not import torch); they must not drift."""
    import typer

    from mtaffect.cli import app
    from mtaffect.faces.filtering import DEFAULT_MIN_CONFIDENCE
    from mtaffect.predict.tracking import DEFAULT_REID_SECONDS

    cmd = typer.main.get_command(app).commands["predict"]
    defaults = {p.name: p.default for p in cmd.params}
    assert defaults["min_confidence"] == DEFAULT_MIN_CONFIDENCE
    assert defaults["reid_memory"] == DEFAULT_REID_SECONDS
    assert defaults["keep_nested"] is False
