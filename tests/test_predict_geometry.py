"""What the face landmarker adds to `mtaffect predict`'s table, in every engine and input mode.

The columns are the ones users rely on (names fixed in mtaffect.schema): the 3D pose, gaze, the 52
blendshapes, AU intensities and, with ``landmarks="dense"``, the 478 points; a face the landmarker cannot
measure keeps its row with NaN geometry; ``landmarks="none"`` gives today's compact table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cli_helpers import invoke, run
from PIL import Image

from mtaffect.geometry.gaze import gaze_angles
from mtaffect.geometry.headpose import head_pose_3d
from mtaffect.predict.outputs import ALL_COLUMNS, COLUMNS, read_table
from mtaffect.predict.pipeline import Predictor
from mtaffect.schema import (
    AU_INTENSITY_COLUMNS,
    AU_PROB_COLUMNS,
    BLENDSHAPE_COLUMNS,
    DENSE_LANDMARK_COLUMNS,
    GAZE_COLUMNS,
    NUM_DENSE_LANDMARKS,
    POSE_COLUMNS,
)

skimage_data = pytest.importorskip("skimage.data")
MEASURED = (*POSE_COLUMNS, *GAZE_COLUMNS, *BLENDSHAPE_COLUMNS)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(landmarks="dense")


@pytest.fixture(scope="module")
def astronaut_dense(predictor) -> pd.DataFrame:
    return predictor.predict(skimage_data.astronaut())


def _points(row: pd.Series) -> np.ndarray:
    return row[list(DENSE_LANDMARK_COLUMNS)].to_numpy(np.float64).reshape(3, NUM_DENSE_LANDMARKS).T


def test_the_table_has_the_new_columns_in_order(astronaut_dense):
    df = astronaut_dense
    assert list(df.columns) == [c for c in ALL_COLUMNS if c in COLUMNS or c in df.columns]
    for c in (*GAZE_COLUMNS, *AU_INTENSITY_COLUMNS, *BLENDSHAPE_COLUMNS, *DENSE_LANDMARK_COLUMNS):
        assert c in df.columns
    assert list(df.columns[-len(DENSE_LANDMARK_COLUMNS) :]) == list(DENSE_LANDMARK_COLUMNS)
    row = df[df["success"] == 1].iloc[0]
    bs = row[list(BLENDSHAPE_COLUMNS)].to_numpy(np.float64)
    assert np.isfinite(bs).all() and (bs >= 0).all() and (bs <= 1).all()
    r = row[list(AU_INTENSITY_COLUMNS)].to_numpy(np.float64)
    assert np.isfinite(r).all() and (r >= 0).all() and (r <= 5).all()


def test_pose_and_gaze_are_those_of_the_dense_points(astronaut_dense):
    row = astronaut_dense[astronaut_dense["success"] == 1].iloc[0]
    pts = _points(row)[None]
    np.testing.assert_allclose(row[list(POSE_COLUMNS)].to_numpy(np.float64), head_pose_3d(pts)[0], atol=1e-5)
    np.testing.assert_allclose(row[list(GAZE_COLUMNS)].to_numpy(np.float64), gaze_angles(pts)[0], atol=1e-5)
    # a portrait looking into the camera: small yaw and roll, gaze near the camera
    assert np.abs(np.rad2deg(row[["pose_Ry", "pose_Rz"]].to_numpy(np.float64))).max() < 15
    assert np.abs(row[list(GAZE_COLUMNS)].to_numpy(np.float64)).max() < 0.3
    # the points lie on the face MTCNN found
    x, y = pts[0, :, 0], pts[0, :, 1]
    w = row["x2"] - row["x1"]
    assert row["x1"] - 0.3 * w < x.min() and x.max() < row["x2"] + 0.3 * w
    assert row["y1"] - 0.3 * w < y.min() and y.max() < row["y2"] + 0.3 * w


def test_compact_and_none(astronaut_dense):
    img = skimage_data.astronaut()
    compact = Predictor().predict(img)
    assert not set(DENSE_LANDMARK_COLUMNS) & set(compact.columns)
    shared = [c for c in compact.columns if c != "file"]
    pd.testing.assert_frame_equal(compact[shared], astronaut_dense[shared])
    none = Predictor(landmarks="none").predict(img)
    assert list(none.columns) == list(COLUMNS)  # the table before the landmarker existed
    # the expression is the model's either way; AUs differ only by the evidence
    np.testing.assert_allclose(none["Happiness_p"], compact["Happiness_p"], atol=1e-6)
    with pytest.raises(ValueError, match="landmarks must be one of"):
        Predictor(landmarks="all")


def test_faces_the_landmarker_cannot_measure_keep_their_rows_with_nan_geometry(predictor, tmp_path):
    img = skimage_data.astronaut()
    half = np.ascontiguousarray(img[:, 205:])  # the face cut by the picture's left edge
    grey = tmp_path / "camera.png"  # a greyscale file: a man in near profile behind a camera
    Image.fromarray(skimage_data.camera()).save(grey)
    for picture in (half, grey, np.zeros((64, 64, 3), np.uint8)):
        df = predictor.predict(picture)
        assert len(df) >= 1
        ok = df[df["success"] == 1]
        for _, row in ok.iterrows():
            measured = row[list(MEASURED)].to_numpy(np.float64)
            # either the whole geometry or none of it: never a half-measured face
            assert np.isfinite(measured).all() or np.isnan(measured).all()
            assert np.isfinite(row[list(AU_PROB_COLUMNS)].to_numpy(np.float64)).all()  # AUs always


def test_onnxruntime_engine_gives_the_same_columns(default_export, astronaut_dense):
    folder, _ = default_export
    onnx = Predictor(engine="onnxruntime", model=folder, landmarks="dense").predict(skimage_data.astronaut())
    assert list(onnx.columns) == list(astronaut_dense.columns)
    a, b = onnx[onnx["success"] == 1].iloc[0], astronaut_dense[astronaut_dense["success"] == 1].iloc[0]
    # the same faces (the engines' boxes agree to float rounding), so the same geometry
    np.testing.assert_allclose(
        a[list(MEASURED)].to_numpy(np.float64), b[list(MEASURED)].to_numpy(np.float64), atol=2e-3
    )
    au = list(AU_PROB_COLUMNS)
    np.testing.assert_allclose(a[au].to_numpy(np.float64), b[au].to_numpy(np.float64), atol=0.03)


def test_aligned_crops_are_measured():
    img = skimage_data.astronaut()
    from mtaffect.faces.align import align_faces
    from mtaffect.faces.mtcnn import MTCNN

    det = MTCNN().detect([img])[0]
    crop = align_faces(img, det.landmarks[:1], 112)[0]
    df = Predictor(aligned=True).predict(crop)
    assert len(df) == 1 and df["success"].iloc[0] == 1
    row = df.iloc[0]
    assert np.isfinite(row[list(BLENDSHAPE_COLUMNS)].to_numpy(np.float64)).all()
    # the aligned crop is upright: the pose's roll is small
    assert abs(np.rad2deg(row["pose_Rz"])) < 10


def test_tracking_and_ids_do_not_depend_on_the_landmarker(away_torch_table, away_video):
    none = Predictor(detect_every=5, landmarks="none").predict(away_video)
    keys = ["frame", "face_id", "x1", "y1", "x2", "y2", "Happiness_p", "valence"]
    pd.testing.assert_frame_equal(none[keys], away_torch_table[keys])
    ok = away_torch_table["success"] == 1
    assert np.isfinite(away_torch_table.loc[ok, "bs_jawOpen"]).mean() > 0.9


def test_cli_landmarks_and_draw(tmp_path):
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    out = tmp_path / "out"
    run("predict", photo, "--out", out, "--plot", "--draw", "landmarks", "--quiet")
    table = read_table(out / "astronaut.csv")
    assert set(DENSE_LANDMARK_COLUMNS) <= set(table.columns)  # --draw landmarks implies dense
    assert (out / "astronaut_annotated.jpg").is_file()
    out2 = tmp_path / "none"
    run("predict", photo, "--out", out2, "--landmarks", "none", "--quiet")
    assert not set(BLENDSHAPE_COLUMNS) & set(read_table(out2 / "astronaut.csv").columns)
    for args, message in (
        (("--draw", "landmarks"), "add --video or --plot"),
        (("--draw", "landmarks", "--plot", "--landmarks", "none"), "drop --landmarks none"),
        (("--draw", "boxes", "--plot"), "--draw takes landmarks"),
        (("--landmarks", "all"), "landmarks must be one of"),
    ):
        result = invoke("predict", photo, "--out", tmp_path / "bad", *args)
        assert result.exit_code == 2 and message in result.output, result.output
