"""Facial geometry in the report and timelines: head pose and gaze in degrees, AU intensities, the most
active blendshapes; tables without the geometry columns give the page and figure they always gave."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from mtaffect.predict.outputs import TableBuilder
from mtaffect.predict.plots import TOP_BLENDSHAPES, timeline_figure, timeline_pngs
from mtaffect.predict.report import ReportInput, render_report
from mtaffect.predict.sources import SourceInfo
from mtaffect.schema import (
    AU_INTENSITY_COLUMNS,
    BLENDSHAPE_COLUMNS,
    EXPR_NAMES,
    GAZE_COLUMNS,
    POSE_COLUMNS,
)

T = 10  # frames of the clip; face 0 in all of them, the landmarker misses it in frame 9


def _clip(geometry: bool = True) -> pd.DataFrame:
    b = TableBuilder()
    happy = np.eye(8)[EXPR_NAMES.index("Happiness")]
    b.add(
        "clip.mp4",
        frame=np.arange(T),
        time=np.arange(T) * 0.04,
        face_id=np.zeros(T, np.int64),
        confidence=np.full(T, 0.99),
        boxes=np.tile([10.0, 10, 50, 50], (T, 1)),
        landmarks=np.zeros((T, 5, 2)),
        expr=np.tile(happy, (T, 1)),
        au=np.full((T, 12), 0.2),
        va=np.tile([0.5, 0.1], (T, 1)),
        pose=np.tile([0.5, -0.2, 0.1], (T, 1)) if geometry else None,
    )
    b.add_empty("clip.mp4", np.array([T]), np.array([T * 0.04]))
    t = b.build(np.full(12, 0.5))
    if not geometry:
        return t
    face = (t["success"] == 1).to_numpy()
    measured = face & (t["frame"] < T - 1).to_numpy()
    ramp = np.linspace(0, 1, len(t))

    def col(value) -> np.ndarray:
        return np.where(measured, value, np.nan)

    t["pose_Rx"] = np.where(measured, t["pose_Rx"], np.nan)
    t[GAZE_COLUMNS[0]], t[GAZE_COLUMNS[1]] = col(0.25), col(-0.1)
    for c in AU_INTENSITY_COLUMNS:
        t[c] = col(0.0)
    t["AU12_r"] = col(3.5)
    for c in BLENDSHAPE_COLUMNS:
        t[c] = col(0.02)
    t["bs_jawOpen"] = col(0.9 * ramp)  # varies most
    t["bs_mouthSmileLeft"] = col(0.7)  # most active on average, constant
    t["bs_eyeBlinkLeft"] = col(np.where(np.arange(len(t)) % 2, 0.4, 0.0))
    return t


def _page(t: pd.DataFrame, pngs=None) -> str:
    return render_report([ReportInput(SourceInfo("clip.mp4", "video"), t, pngs or {}, thumbs={})], {"m": "x"})


def test_report_shows_head_pose_in_degrees_gaze_au_intensity_and_blendshapes():
    t = _clip()
    assert t["pose_Rx"].max() == pytest.approx(0.5)  # the table stays in radians
    html = _page(t, timeline_pngs(t, "clip.mp4"))
    assert math.degrees(0.5) == pytest.approx(28.648, abs=1e-3)
    assert "pitch <b>28.6°</b> ± 0.0" in html and "yaw <b>-11.5°</b>" in html and "roll <b>5.7°</b>" in html
    assert "gaze (degrees): x <b>14.3°</b>" in html and "y <b>-5.7°</b>" in html
    assert f"facial geometry measured in {T - 1} of {T} frames" in html
    assert "most active blendshapes (mean): mouthSmileLeft 0.70, jawOpen" in html
    row = re.search(r"<tr><th>mean intensity \(0–5\)</th>(.*?)</tr>", html)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert len(cells) == 12 and cells[6] == "3.50" and cells[3] == "–"  # AU12 measured; AU06 has none
    assert 'alt="timeline of face 0"' in html and "data:image/png;base64," in html
    assert "shown in degrees" in html


def _panels(fig) -> dict[str, object]:
    return {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel() and ax.get_label() != "<colorbar>"}


def test_timeline_has_au_intensity_pose_in_degrees_and_the_most_varying_blendshapes():
    import matplotlib.pyplot as plt

    fig = timeline_figure(_clip(), "clip.mp4", 0)
    try:
        panels = _panels(fig)
        assert {"AU intensity", "head pose / gaze\n(degrees)", "blendshapes\n(most varying)"} <= set(panels)
        lines = {ln.get_label(): ln.get_ydata() for ln in panels["head pose / gaze\n(degrees)"].get_lines()}
        assert np.nanmax(lines["pitch"]) == pytest.approx(28.648, abs=1e-3)
        assert np.isnan(lines["pitch"][-1])  # the frame the landmarker missed is a gap, not a value
        assert np.nanmax(lines["gaze x"]) == pytest.approx(math.degrees(0.25), rel=1e-5)
        names = [tk.get_text() for tk in panels["blendshapes\n(most varying)"].get_yticklabels()]
        assert len(names) == TOP_BLENDSHAPES < 52
        assert names[:3] == ["jawOpen", "eyeBlinkLeft", "mouthSmileLeft"] and "_neutral" not in names
        au_r = [tk.get_text() for tk in panels["AU intensity"].get_yticklabels()]
        assert au_r == ["AU01", "AU02", "AU04", "AU07", "AU12", "AU25", "AU26"]
    finally:
        plt.close(fig)


def test_a_table_without_geometry_gives_the_old_page_and_figure():
    import matplotlib.pyplot as plt

    t = _clip(geometry=False)  # pose NaN, no gaze/intensity/blendshape columns: an older table
    assert not set(GAZE_COLUMNS) & set(t.columns)
    html = _page(t, timeline_pngs(t, "clip.mp4"))
    for new in ("head pose (degrees", "gaze (degrees)", "mean intensity", "blendshapes (mean)"):
        assert new not in html
    assert "valence <b>0.50</b>" in html and "<tr><th>mean P</th>" in html and "timeline of face 0" in html
    fig = timeline_figure(t, "clip.mp4", 0)
    try:
        assert set(_panels(fig)) == {"valence / arousal", "expression\nprobability", "action unit"}
    finally:
        plt.close(fig)
    # with pose only (the 5-landmark pose of earlier versions): pose in degrees, nothing else new
    for c in POSE_COLUMNS:
        t[c] = np.where(t["success"] == 1, 0.5, np.nan)
    html = _page(t)
    assert "pitch <b>28.6°</b>" in html and "gaze (degrees)" not in html and "mean intensity" not in html


def test_stills_table_shows_pose_gaze_and_top_blendshapes_when_present(tmp_path):
    t = _clip()
    still = t[(t["frame"] == 0) & (t["success"] == 1)].assign(file="a.jpg", time=np.nan)
    old = _clip(geometry=False).iloc[[0]].assign(file="b.jpg", time=np.nan)
    page = render_report(
        [
            ReportInput(SourceInfo("a.jpg", "image"), still, thumbs={}),
            ReportInput(SourceInfo("b.jpg", "image"), old, thumbs={}),
        ],
        {"m": "x"},
    )
    assert "head pose (°)" in page and "28.6° / -11.5° / 5.7°" in page and "14.3° / -5.7°" in page
    assert "mouthSmileLeft 0.70" in page
    assert "– / – / –" in page  # b.jpg has no geometry: dashes, not an error
    plain = render_report([ReportInput(SourceInfo("b.jpg", "image"), old, thumbs={})], {"m": "x"})
    assert "head pose (°)" not in plain and "top blendshapes" not in plain
