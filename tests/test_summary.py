"""`mtaffect.summarize(df)`: the per-face summary the report shows, as a DataFrame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import mtaffect
from mtaffect.predict.outputs import TableBuilder, empty_table
from mtaffect.predict.report import ReportInput, render_report
from mtaffect.predict.sources import SourceInfo
from mtaffect.predict.summary import SUMMARY_COLUMNS, summarize
from mtaffect.schema import AU_NAMES, EXPR_NAMES, POSE_COLUMNS


def _table() -> pd.DataFrame:
    """clip.mp4: face 0 in frames 0-3 (Happiness x3, Neutral x1), face 1 in frames 2-3; frame 4 empty."""
    b = TableBuilder()
    happy, neutral = np.eye(8)[EXPR_NAMES.index("Happiness")], np.eye(8)[0]
    au = np.zeros((6, 12))
    au[:3, AU_NAMES.index("AU12")] = 0.9  # face 0 smiles in 3 of its 4 frames
    b.add(
        "clip.mp4",
        frame=np.array([0, 1, 2, 3, 2, 3]),
        time=np.array([0.0, 0.04, 0.08, 0.12, 0.08, 0.12]),
        face_id=np.array([0, 0, 0, 0, 1, 1]),
        confidence=np.full(6, 0.99),
        boxes=np.tile([10.0, 10, 50, 50], (6, 1)),
        landmarks=np.zeros((6, 5, 2)),
        expr=np.stack([happy, happy, happy, neutral, neutral, neutral]),
        au=au,
        va=np.array([[0.5, 0.2], [0.7, 0.2], [0.6, 0.2], [0.2, 0.2], [0.0, -0.1], [0.0, -0.3]]),
        pose=np.zeros((6, 3)),
    )
    b.add_empty("clip.mp4", np.array([4]), np.array([0.16]))
    return b.build(np.full(12, 0.5))


def test_one_row_per_face_with_the_report_statistics():
    s = mtaffect.summarize(_table())
    assert tuple(s.columns) == SUMMARY_COLUMNS
    assert s[["file", "face_id", "frames"]].values.tolist() == [["clip.mp4", 0, 4], ["clip.mp4", 1, 2]]
    f0 = s.iloc[0]
    assert f0["expression"] == "Happiness"
    assert f0["Happiness_share"] == pytest.approx(0.75) and f0["Neutral_share"] == pytest.approx(0.25)
    assert f0["valence_mean"] == pytest.approx(0.5) and f0["valence_sd"] == pytest.approx(
        np.std([0.5, 0.7, 0.6, 0.2])
    )
    assert f0["AU12_active"] == pytest.approx(0.75) and f0["AU12_p_mean"] == pytest.approx(0.675)
    assert f0["AU01_active"] == 0.0
    assert (f0["first_frame"], f0["last_frame"]) == (0, 3) and f0["last_time"] == pytest.approx(0.12)
    assert s.iloc[1]["expression"] == "Neutral" and s.iloc[1]["arousal_sd"] == pytest.approx(0.1)


def test_report_shows_the_same_numbers():
    t = _table()
    s = summarize(t)
    html = render_report([ReportInput(SourceInfo("clip.mp4", "video"), t, thumbs={})], {"name": "m"})
    assert f"valence <b>{s.iloc[0]['valence_mean']:.2f}</b>" in html
    assert "AU12 (75%)" in html


def test_tables_written_before_the_pose_columns_still_read_and_summarize(tmp_path):
    from mtaffect.predict.outputs import read_table

    path = tmp_path / "old.csv"
    _table().drop(columns=list(POSE_COLUMNS)).to_csv(path, index=False)
    back = read_table(path)
    assert back[list(POSE_COLUMNS)].isna().all().all()
    assert summarize(back)["frames"].tolist() == [4, 2]


def test_empty_and_wrong_tables():
    s = summarize(empty_table())
    assert len(s) == 0 and tuple(s.columns) == SUMMARY_COLUMNS
    with pytest.raises(ValueError, match="not a prediction table"):
        summarize(pd.DataFrame({"a": [1]}))
    assert math.isnan(summarize(_table().assign(time=np.nan)).iloc[0]["first_time"])


def _with_geometry(t: pd.DataFrame) -> pd.DataFrame:
    """``_table()`` with hand-set geometry columns: face 0 measured in frames 0-2 (frame 3: NaN, as a face
    the landmarker missed), face 1 in both its frames; NaN on the faceless row."""
    from mtaffect.schema import AU_INTENSITY_COLUMNS, BLENDSHAPE_COLUMNS, GAZE_COLUMNS

    # (face, frame) -> value; rows not listed (face 0 frame 3, the empty frame) are NaN
    keys = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)]
    set_ = {
        "pose_Rx": [0.5, 0.5, 0.2, -0.1, -0.1],
        "pose_Ry": [0.1, 0.1, 0.1, 0.0, 0.0],
        "pose_Rz": [0.0] * 5,
        "gaze_angle_x": [0.2, 0.0, 0.1, 0.0, 0.0],
        "AU12_r": [3.0, 4.0, 2.0, 0.5, 0.5],
        "bs_jawOpen": [0.9, 0.3, 0.3, 0.0, 0.2],
        "bs_mouthSmileLeft": [0.6, 0.6, 0.6, 0.01, 0.01],
    }
    t = t.copy()
    at = {k: i for i, k in enumerate(zip(t["face_id"], t["frame"], strict=True))}
    for c in (*POSE_COLUMNS, *GAZE_COLUMNS, *AU_INTENSITY_COLUMNS, *BLENDSHAPE_COLUMNS):
        v = np.full(len(t), np.nan)
        for k, x in zip(keys, set_.get(c, [0.0] * len(keys)), strict=True):
            v[at[k]] = x
        t[c] = v
    return t


def test_summary_gives_geometry_in_degrees_and_means():
    from mtaffect.predict.summary import GEOMETRY_SUMMARY_COLUMNS, top_blendshapes

    s = summarize(_with_geometry(_table()))
    assert tuple(s.columns) == SUMMARY_COLUMNS and set(GEOMETRY_SUMMARY_COLUMNS) <= set(s.columns)
    f0, f1 = s.iloc[0], s.iloc[1]
    assert (f0["geometry_frames"], f1["geometry_frames"]) == (3, 2)  # frame 3 of face 0 not measured
    pitch = np.degrees([0.5, 0.5, 0.2])
    assert f0["pose_Rx_deg_mean"] == pytest.approx(pitch.mean()) == pytest.approx(22.918, abs=1e-3)
    assert f0["pose_Rx_deg_sd"] == pytest.approx(np.std(pitch))  # population sd, as valence_sd
    assert f0["pose_Rx_mean"] == pytest.approx(0.4)  # the radians column stays as it was
    assert f0["pose_Ry_deg_mean"] == pytest.approx(math.degrees(0.1)) and f0["pose_Ry_deg_sd"] == 0
    assert f0["pose_Rz_deg_mean"] == 0  # _table() wrote zeros
    assert f0["gaze_angle_x_deg_mean"] == pytest.approx(math.degrees(0.1))
    assert f1["pose_Rx_deg_mean"] == pytest.approx(math.degrees(-0.1))
    assert f0["AU12_r_mean"] == pytest.approx(3.0) and f1["AU12_r_mean"] == pytest.approx(0.5)
    assert f0["bs_jawOpen_mean"] == pytest.approx(0.5) and f0["bs__neutral_mean"] == 0
    assert top_blendshapes(f0) == [("mouthSmileLeft", pytest.approx(0.6)), ("jawOpen", pytest.approx(0.5))]
    assert top_blendshapes(f1) == [("jawOpen", pytest.approx(0.1))]  # 0.01 is below min_mean


def test_tables_without_geometry_summarize_with_nan_geometry():
    from mtaffect.predict.summary import GEOMETRY_SUMMARY_COLUMNS, top_blendshapes

    s = summarize(_table().drop(columns=list(POSE_COLUMNS)))  # an in-memory table of an older version
    assert tuple(s.columns) == SUMMARY_COLUMNS
    assert (s["geometry_frames"] == 0).all()
    rest = [c for c in GEOMETRY_SUMMARY_COLUMNS if c != "geometry_frames"]
    assert s[rest].isna().all().all() and s["pose_Rx_mean"].isna().all()
    assert top_blendshapes(s.iloc[0]) == []
    assert s["frames"].tolist() == [4, 2] and s.iloc[0]["AU12_active"] == pytest.approx(0.75)
