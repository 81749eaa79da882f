"""Annotated outputs: overlays inside the picture, phone rotation honoured, audio kept, annotated stills."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")  # the public-domain test face

import av

from mtaffect.predict import demo_media
from mtaffect.predict.annotate import annotate_image, annotate_video, draw_faces, overlay_layout
from mtaffect.predict.pipeline import Predictor


def _inside(rect, w, h) -> bool:
    x1, y1, x2, y2 = rect
    return 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h


@pytest.mark.parametrize(
    "box",
    [
        (10, 400, 120, 478),  # at the bottom edge: the bars cannot go below
        (560, 5, 639, 90),  # top-right corner: the label cannot go above, nor run off to the right
        (0, 0, 639, 479),  # the whole picture
        (300, 200, 340, 240),  # small face in the middle
    ],
)
def test_overlays_stay_inside_the_picture(box):
    lay = overlay_layout(box, (640, 480), (150, 14), 1.0)
    assert _inside(lay.label, 640, 480)
    for r in lay.bars:
        assert _inside(r, 640, 480)
    if box[3] < 300:  # room below: the bars go under the face, not over it
        assert lay.bars[0][1] >= box[3]


def test_drawing_near_the_bottom_edge_draws_the_bars_in_view():
    img = np.zeros((240, 320, 3), np.uint8)
    import pandas as pd

    row = {"face_id": 0, "x1": 20.0, "y1": 150.0, "x2": 110.0, "y2": 238.0, "expression": "Happiness",
           "Happiness_p": 0.9, "valence": 0.8, "arousal": -0.5}  # fmt: skip
    out = draw_faces(img, pd.DataFrame([row]))
    # the valence bar (green fill, from the middle to +0.8) appears somewhere in the picture
    green = (out[..., 1] > 150) & (out[..., 0] < 120) & (out[..., 2] < 120)
    assert green.sum() > 50


def _phone_video(path: Path, seconds: float = 1.0, fps: int = 25) -> tuple[Path, np.ndarray]:
    """A portrait clip stored as landscape frames + a 90° display rotation, with a 440 Hz AAC track."""
    portrait = list(demo_media.frames(round(seconds * fps), faces=1, width=360, height=640, fps=fps))
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = 640, 360, "yuv420p"
        v.set_display_rotation(90)  # shown rotated 90° counter-clockwise
        a = c.add_stream("aac", rate=16000)
        for i, p in enumerate(portrait):
            stored = np.ascontiguousarray(np.rot90(p, -1))  # what the phone stores
            f = av.VideoFrame.from_ndarray(stored, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            for pkt in v.encode(f):
                c.mux(pkt)
        t = np.arange(round(seconds * 16000)) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for s in range(0, len(tone), 1024):
            af = av.AudioFrame.from_ndarray(tone[None, s : s + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, s
            for pkt in a.encode(af):
                c.mux(pkt)
        for st in (v, a):
            for pkt in st.encode():
                c.mux(pkt)
    return path, portrait[0]


def test_phone_video_is_analysed_upright_and_its_annotated_copy_keeps_audio_and_orientation(tmp_path):
    video, first = _phone_video(tmp_path / "phone.mp4")
    p = Predictor(detect_every=5)
    df = p.predict(video)
    faces = df[df["success"] == 1]
    assert len(faces) >= 20  # found upright: a lying face would mostly be missed
    # boxes are in the upright (360 wide, 640 high) picture
    assert faces["x2"].max() <= 361 and faces["y2"].max() > 360
    out = annotate_video(video, df, tmp_path / "phone_annotated.mp4")
    with av.open(str(out)) as c:
        vs = c.streams.video[0]
        assert (vs.codec_context.width, vs.codec_context.height) == (360, 640)
        assert c.streams.audio, "the audio stream was dropped"
        frames = [fr for fr in c.decode(vs)]
        assert len(frames) == 25 and frames[0].rotation == 0
        img = frames[0].to_ndarray(format="rgb24")
    with av.open(str(out)) as c:
        audio = sum(fr.samples for fr in c.decode(c.streams.audio[0]))
    assert audio >= 0.9 * 16000
    # away from the overlays (top rows), the picture matches the upright source, not a rotated one
    assert np.abs(img[:40].astype(int) - first[:40].astype(int)).mean() < 12


def test_annotated_still_has_the_face_drawn(tmp_path):
    frame = next(demo_media.frames(1, faces=1))
    path = tmp_path / "still.png"
    Image.fromarray(frame).save(path)
    df = Predictor().predict(path)
    out = annotate_image(path, df, tmp_path / "still_annotated.jpg")
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == frame.shape
    r = df[df["success"] == 1].iloc[0]
    x1, y1 = int(r["x1"]), int(r["y1"])
    col = drawn[y1 + 2 : int(r["y2"]) - 2, x1 - 1 : x1 + 2]  # the box's left edge
    assert np.abs(col.astype(int) - frame[y1 + 2 : int(r["y2"]) - 2, x1 - 1 : x1 + 2]).mean() > 30
    with pytest.raises(FileExistsError):
        annotate_image(path, df, out)


def test_cli_annotates_stills_and_the_report_shows_face_thumbnails(tmp_path):
    from typer.testing import CliRunner

    from mtaffect.cli import app

    still = tmp_path / "face.png"
    Image.fromarray(next(demo_media.frames(1, faces=1))).save(still)
    out = tmp_path / "out"
    args = ["predict", str(still), "--out", str(out), "--plot", "--report", "--quiet",
            "--min-confidence", "0.95", "--reid-memory", "10"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "face_annotated.jpg").read_bytes()[:2] == b"\xff\xd8"
    html = (out / "report.html").read_text()
    assert 'class="thumb"' in html and "data:image/jpeg;base64," in html
    assert "min_confidence=0.95" in html and "reid_memory_s=10.0" in html
    bad = CliRunner().invoke(app, ["predict", str(still), "--out", str(out / "b"), "--min-confidence", "2"])
    assert bad.exit_code == 2 and "min_confidence" in bad.output
