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

    row = {
        "face_id": 0,
        "x1": 20.0,
        "y1": 150.0,
        "x2": 110.0,
        "y2": 238.0,
        "expression": "Happiness",
        "Happiness_p": 0.9,
        "valence": 0.8,
        "arousal": -0.5,
    }
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
    args = [
        "predict",
        str(still),
        "--out",
        str(out),
        "--plot",
        "--report",
        "--quiet",
        "--min-confidence",
        "0.95",
        "--reid-memory",
        "10",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "face_annotated.jpg").read_bytes()[:2] == b"\xff\xd8"
    html = (out / "report.html").read_text()
    assert 'class="thumb"' in html and "data:image/jpeg;base64," in html
    assert "min_confidence=0.95" in html and "reid_memory_s=10.0" in html
    bad = CliRunner().invoke(app, ["predict", str(still), "--out", str(out / "b"), "--min-confidence", "2"])
    assert bad.exit_code == 2 and "min_confidence" in bad.output


def _dense(row: dict, xs: np.ndarray, ys: np.ndarray) -> dict:
    """``row`` with the dense landmark columns: the first ``len(xs)`` points at (xs, ys), the rest NaN."""
    from mtaffect.schema import NUM_DENSE_LANDMARKS

    x, y = np.full(NUM_DENSE_LANDMARKS, np.nan), np.full(NUM_DENSE_LANDMARKS, np.nan)
    x[: len(xs)], y[: len(ys)] = xs, ys
    return {
        **row,
        **{f"x_{i}": v for i, v in enumerate(x)},
        **{f"y_{i}": v for i, v in enumerate(y)},
        **{f"z_{i}": 0.0 for i in range(NUM_DENSE_LANDMARKS)},
    }


_ROW = {
    "face_id": 1,
    "x1": 60.0,
    "y1": 60.0,
    "x2": 180.0,
    "y2": 150.0,
    "expression": "Happiness",
    "Happiness_p": 0.9,
    "valence": 0.5,
    "arousal": 0.1,
    "success": 1,
}


def test_drawn_landmarks_change_exactly_the_landmark_pixels():
    import pandas as pd
    from PIL import ImageColor

    from mtaffect.predict.annotate import ID_COLOURS

    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (240, 320, 3), dtype=np.uint8)  # dark noise: no pixel is the dot colour
    xs, ys = rng.uniform(70, 170, 200), rng.uniform(70, 140, 200)  # inside the box, off its edges
    xs[0], ys[0] = 120.0, -3.0  # off the picture: skipped, not an error
    rows = pd.DataFrame([_dense(_ROW, xs, ys)])
    plain = draw_faces(img, rows)  # today's overlay: the default draws no landmark
    both = draw_faces(img, rows, {"faces", "landmarks"})
    dots = np.zeros(img.shape[:2], bool)
    dots[np.floor(ys[1:]).astype(int), np.floor(xs[1:]).astype(int)] = True  # one pixel: a face < 160 px
    changed = np.any(both != plain, axis=2)
    assert np.array_equal(changed, dots)  # the landmark pixels and nothing else besides the overlay
    colour = ImageColor.getrgb(ID_COLOURS[1])
    assert (both[dots] == colour).all()
    only = draw_faces(img, rows, ["landmarks"])  # the dots alone: the rest of the picture untouched
    assert np.array_equal(np.any(only != img, axis=2), dots) and not np.shares_memory(only, img)
    # a face the landmarker did not measure (NaN coordinates) gets no dots
    unmeasured = pd.DataFrame([_dense(_ROW, np.full(5, np.nan), np.full(5, np.nan))])
    assert np.array_equal(draw_faces(img, unmeasured, {"landmarks"}), img)


def test_landmark_dots_grow_with_the_face():
    import pandas as pd

    from mtaffect.predict.annotate import draw_landmarks

    img = np.zeros((400, 400, 3), np.uint8)
    xs = np.array([20.5, 200.5, 380.5])  # a face 360 pixels wide: 5x5 discs
    rows = pd.DataFrame([_dense({"face_id": 0}, xs, np.full(3, 200.5))])
    out = draw_landmarks(img, rows)
    lit = np.any(out > 0, axis=2)
    assert lit.sum() == 3 * 21  # a 5x5 square less its 4 corners, per point
    assert lit[200, 198:203].all() and not lit[198, 198] and not lit[200, 203]


def test_drawing_landmarks_needs_the_dense_columns(tmp_path):
    import pandas as pd

    from mtaffect.predict.annotate import check_draw

    path = tmp_path / "still.png"
    img = np.zeros((240, 320, 3), np.uint8)
    Image.fromarray(img).save(path)
    table = pd.DataFrame([{**_ROW, "file": str(path), "frame": 0}])
    with pytest.raises(ValueError, match=r"--landmarks dense"):
        annotate_image(path, table, tmp_path / "a.png", draw={"faces", "landmarks"})
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(ValueError, match=r"x_0\.\.x_477 and y_0\.\.y_477.*--landmarks dense"):
        draw_faces(img, table, {"landmarks"})
    with pytest.raises(ValueError, match="the layers are faces, landmarks"):
        check_draw({"mesh"})
    assert check_draw(None) == {"faces"} and check_draw("landmarks") == {"landmarks"}
    annotate_image(path, table, tmp_path / "b.png")  # the default needs no dense columns


def test_annotated_still_with_landmarks_through_write_extras(tmp_path):
    """A real still analysed end to end, given dense landmarks on the detected face (a lattice inside its
    box), written by write_extras as ``--video --draw landmarks`` would: the dots are in the picture."""
    import pandas as pd

    from mtaffect.predict.extras import write_extras
    from mtaffect.predict.pipeline import FileResult
    from mtaffect.predict.sources import SourceInfo
    from mtaffect.schema import NUM_DENSE_LANDMARKS

    frame = next(demo_media.frames(1, faces=1))
    path = tmp_path / "still.png"
    Image.fromarray(frame).save(path)
    df = Predictor().predict(path)
    r = df[df["success"] == 1].iloc[0]
    gx, gy = np.meshgrid(np.linspace(r["x1"] + 8, r["x2"] - 8, 22), np.linspace(r["y1"] + 8, r["y2"] - 8, 22))
    xs, ys = gx.ravel()[:NUM_DENSE_LANDMARKS], gy.ravel()[:NUM_DENSE_LANDMARKS]
    dense = pd.DataFrame([_dense({}, xs, ys)] * len(df), index=df.index)
    table = pd.concat([df, dense], axis=1)
    info = SourceInfo(str(path), "image", width=frame.shape[1], height=frame.shape[0])
    result = FileResult(info, table, 1.0, 1)
    out = tmp_path / "out"
    out.mkdir()
    _, written = write_extras(
        [result],
        "still",
        out / "still.csv",
        plot=False,
        video=True,
        report=False,
        overwrite=False,
        draw=("faces", "landmarks"),
    )
    assert written[1:] == [str(out / "still_annotated.jpg")]
    drawn = np.asarray(Image.open(out / "still_annotated.jpg")).astype(int)
    plain = np.asarray(annotate_image_array(frame, df)).astype(int)
    at = (np.floor(ys).astype(int), np.floor(xs).astype(int))
    assert np.abs(drawn[at] - plain[at]).mean() > 40  # the dots (JPEG blurs them a little)
    half = (gy[1, 0] - gy[0, 0]) / 2, (gx[0, 1] - gx[0, 0]) / 2
    between = (np.floor(ys + half[0]).astype(int), np.floor(xs + half[1]).astype(int))  # mid-cell: no dot
    assert min(half) >= 2
    assert np.abs(drawn[between] - plain[between]).mean() < 12
    with pytest.raises(ValueError, match="--landmarks dense"):
        write_extras(
            [FileResult(info, df, 1.0, 1)],
            "x",
            out / "x.csv",
            False,
            True,
            False,
            False,
            draw=("faces", "landmarks"),
        )
    assert not (out / "x_annotated.jpg").exists()


def annotate_image_array(image: np.ndarray, table) -> np.ndarray:
    return draw_faces(image, table[table["success"] == 1])


def test_annotated_video_draws_the_landmarks_on_every_frame(tmp_path):
    import pandas as pd

    src = tmp_path / "dark.mp4"
    with av.open(str(src), "w") as c:
        v = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 400, 400, "yuv420p"
        for i in range(6):
            f = av.VideoFrame.from_ndarray(np.zeros((400, 400, 3), np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 10)
            for pkt in v.encode(f):
                c.mux(pkt)
        for pkt in v.encode():
            c.mux(pkt)
    xs, ys = np.array([20.5, 200.5, 360.5]), np.array([200.5, 60.5, 300.5])  # 340 px apart: 5x5 dots
    rows = [_dense({**_ROW, "face_id": 0, "file": str(src), "frame": i}, xs + 4 * i, ys) for i in (0, 3)]
    out = annotate_video(src, pd.DataFrame(rows), tmp_path / "dots.mp4", draw={"landmarks"})
    with av.open(str(out)) as c:
        frames = [fr.to_ndarray(format="rgb24").astype(int) for fr in c.decode(c.streams.video[0])]
    assert len(frames) == 6
    for i, img in enumerate(frames):
        shift = 4 * (3 if i >= 3 else 0)  # a frame shows the latest analysed result
        at = (ys.astype(int), xs.astype(int) + shift)
        assert (img[at][:, 1] > 120).all(), i  # #00e676, face 0's colour: green
        assert img[(ys.astype(int), xs.astype(int) + shift + 8)].max() < 40  # off the dots: still dark
    with pytest.raises(ValueError, match="--landmarks dense"):
        annotate_video(src, pd.DataFrame([_ROW]), tmp_path / "no.mp4", draw=("faces", "landmarks"))
    assert not (tmp_path / "no.mp4").exists()
