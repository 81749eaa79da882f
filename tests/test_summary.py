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
from mtaffect.schema import AU_NAMES, EXPR_NAMES


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
    from mtaffect.schema import POSE_COLUMNS

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
