"""``df.affect``: the prediction table's column groups, summary and timelines (issue: py-feat's Fex)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("skimage")  # the public-domain faces of the demo clip

from mtaffect import summarize
from mtaffect.predict import demo_media
from mtaffect.predict.accessor import NotAPredictionTable
from mtaffect.predict.outputs import read_table, write_table
from mtaffect.predict.pipeline import Predictor
from mtaffect.schema import AU_PROB_COLUMNS, BLENDSHAPE_COLUMNS, EXPR_PROB_COLUMNS, POSE_COLUMNS


@pytest.fixture(scope="module")
def clip_table() -> pd.DataFrame:
    """Two faces over four frames at 10 frames/s, with the landmarker's columns."""
    clip = np.stack(list(demo_media.frames(4, faces=2, width=320, height=240)))
    return Predictor(num_threads=1).predict(clip, fps=10)


def test_groups_are_the_schema_columns_with_the_table_index(clip_table):
    df = clip_table
    assert list(df.affect.aus.columns) == list(AU_PROB_COLUMNS)
    assert list(df.affect.expressions.columns) == list(EXPR_PROB_COLUMNS)
    assert list(df.affect.pose.columns) == list(POSE_COLUMNS)
    assert list(df.affect.blendshapes.columns) == list(BLENDSHAPE_COLUMNS)
    assert list(df.affect.va.columns) == ["valence", "arousal"]
    assert df.affect.aus.index.equals(df.index)  # usable as a mask on the table
    pd.testing.assert_frame_equal(df.affect.expressions, df[list(EXPR_PROB_COLUMNS)])
    assert (df.affect.faces["success"] == 1).all() and len(df.affect.faces) == (df["success"] == 1).sum()


def test_summarize_is_mtaffects_and_survives_a_round_trip_through_a_file(clip_table, tmp_path):
    pd.testing.assert_frame_equal(clip_table.affect.summarize(), summarize(clip_table))
    back = read_table(write_table(clip_table, tmp_path / "t.csv"))
    assert back.affect.summarize()["face_id"].tolist() == [0, 1]


def test_plot_timeline_returns_a_figure_and_writes_nothing(clip_table, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    monkeypatch.chdir(tmp_path)
    fig = clip_table.affect.plot_timeline(1)
    assert isinstance(fig, Figure) and "face 1" in fig.texts[0].get_text()
    assert list(tmp_path.iterdir()) == []
    plt.close(fig)
    with pytest.raises(ValueError, match=r"has no face 7 \(its faces: \[0, 1\]\)"):
        clip_table.affect.plot_timeline(7)
    two_files = pd.concat([clip_table, clip_table.assign(file="other.mp4")], ignore_index=True)
    with pytest.raises(ValueError, match="2 inputs: say which with file="):
        two_files.affect.plot_timeline(0)
    plt.close(two_files.affect.plot_timeline(0, file="other.mp4"))


def test_a_frame_that_is_no_prediction_table_names_what_it_lacks(clip_table):
    with pytest.raises(NotAPredictionTable, match=r"lacks the column\(s\) face_id, success"):
        _ = pd.DataFrame({"file": ["a.jpg"], "frame": [0]}).affect.aus
    no_geometry = clip_table.drop(columns=list(BLENDSHAPE_COLUMNS))  # as with landmarks="none"
    with pytest.raises(NotAPredictionTable, match=r"no bs__neutral, .* and 48 more .*landmarks none"):
        _ = no_geometry.affect.blendshapes
    assert isinstance(NotAPredictionTable("x"), ValueError)  # the CLI's and the user's error kind
