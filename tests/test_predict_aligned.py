"""`predict --aligned --recursive` on s-Aff-Wild2-style frame folders: the numbers of `mtaffect infer`
for a per-frame checkpoint, the windows of `predict_store` for a temporal one, causal (live) windows
that never look ahead, and frame sequences that are tracked, smoothed and timed like videos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_helpers import run
from model_helpers import checkpoint

from mtaffect.data.predictions import PredictionTable
from mtaffect.data.units import split_image_names
from mtaffect.features.extract import extract
from mtaffect.features.store import FeatureStore
from mtaffect.models.loading import load_model
from mtaffect.predict.outputs import AU_P_COLUMNS, EXPR_P_COLUMNS, read_table
from mtaffect.predict.pipeline import Predictor
from mtaffect.predict.sources import expand_inputs
from mtaffect.schema import AU_PROB_COLUMNS, CROPPED_DIR, EXPR_PROB_COLUMNS, POSE_COLUMNS

WINDOW = 4
#: Stores hold float16 features and `predict` computes float32 ones: probabilities agree to this.
ATOL = 2e-3

pytestmark = pytest.mark.filterwarnings("ignore:folders of frames carry no frame rate")  # no times asked


@pytest.fixture(scope="module")
def research(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("aligned")
    run("synth", "--out", d / "data", "--videos", "3", "--frames", "14", "--seed", "2")
    root = d / "data" / CROPPED_DIR
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    extract(d / "data", "fer-minixception", d / "store", images=names, workers=0, progress=False)
    (d / "all.txt").write_text("".join(f"{n}\n" for n in names))
    return {
        "dir": d,
        "root": root,
        "names": names,
        "store": d / "store",
        "frame_model": checkpoint(d / "emotinet", "emotinet"),
        "temporal_model": checkpoint(
            d / "lstm", "progressive", WINDOW, gain=3.0, temporal="lstm", dim=32, task_dim=32
        ),
    }


def _by_image(table: pd.DataFrame) -> pd.DataFrame:
    """predict's rows keyed by the s-Aff-Wild2 image key (video, frame), PredictionTable column names
    (predict counts frames from 0: its frame 0 is the image 00001.jpg)."""
    video = [Path(f).name for f in table["file"]]
    out = pd.DataFrame({"video": video, "frame": table["frame"].to_numpy() + 1})
    pairs = [
        *zip(EXPR_P_COLUMNS, EXPR_PROB_COLUMNS, strict=True),
        *zip(AU_P_COLUMNS, AU_PROB_COLUMNS, strict=True),
    ]
    for src, dst in pairs:
        out[dst] = table[src].to_numpy(np.float64)
    out["valence"], out["arousal"] = table["valence"].to_numpy(), table["arousal"].to_numpy()
    return out.set_index(["video", "frame"]).sort_index()


def _pred_by_image(pred: PredictionTable) -> pd.DataFrame:
    video, frame = split_image_names(pred.images)
    cols = [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, "valence", "arousal"]
    out = pred.frame[cols].copy()
    out.index = pd.MultiIndex.from_arrays([video, frame], names=["video", "frame"])
    return out.sort_index()


@pytest.mark.slow
def test_predict_aligned_gives_the_numbers_of_infer(research, tmp_path):
    r = research
    out = tmp_path / "o"
    run(
        "predict", r["root"], "--recursive", "--aligned", "--model", r["frame_model"], "--out", out, "--quiet"
    )
    table = read_table(out / f"{CROPPED_DIR}.csv")
    assert (table["success"] == 1).all() and (table["face_id"] == 0).all()
    assert table["file"].nunique() == 3 and table["confidence"].isna().all()
    run(
        "infer",
        "--model",
        r["frame_model"],
        "--features",
        r["store"],
        "--images",
        r["dir"] / "all.txt",
        "--out",
        tmp_path / "infer.csv",
    )
    ref = _pred_by_image(PredictionTable.read(tmp_path / "infer.csv"))
    got = _by_image(table)[ref.columns]
    assert got.index.equals(ref.index) and len(ref) == len(r["names"])
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), atol=ATOL)


def test_aligned_frames_reach_the_backbone_as_extraction_decodes_them(research):
    """The only difference left is the store's float16: live features rounded to it are the store's."""
    r = research
    p = Predictor(aligned=True)
    store = FeatureStore.open(r["store"])
    (seq, *_) = expand_inputs(r["root"], recursive=True)
    pixels = np.stack([f.image for f in p.open(seq)])
    with torch.inference_mode():
        live = p.backbone(p.backbone.preprocess(pixels)).features.numpy()
    names = [f"{seq.folder.name}/{q.name}" for q in seq.paths]
    np.testing.assert_array_equal(live.astype(np.float16), store.features(store.rows(names)))


@pytest.mark.slow
def test_a_temporal_checkpoint_sees_the_windows_of_predict_store(research):
    r = research
    model = load_model(r["temporal_model"])
    ref = _pred_by_image(model.predict_store(r["store"], r["names"]))
    table = Predictor(model=r["temporal_model"], aligned=True).predict(r["root"], recursive=True)
    got = _by_image(table)[ref.columns]
    assert got.index.equals(ref.index)
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), atol=ATOL)
    # what predict did before: one-frame sequences, no temporal context (clearly other numbers)
    st = FeatureStore.open(r["store"])
    single = model.predict(torch.from_numpy(st.features(st.rows(r["names"])).astype(np.float32)))
    assert np.abs(single.au_probs - ref[list(AU_PROB_COLUMNS)].to_numpy()).max() > 10 * ATOL


@pytest.mark.slow
def test_shifted_last_windows_match_predict_store(research):
    """A model trained with ``data.window_edge: shift`` cuts a track's last window as predict_store does:
    moved back over frames already predicted instead of padded."""
    r = research
    model = load_model(r["temporal_model"])
    padded = _pred_by_image(model.predict_store(r["store"], r["names"]))
    model.window_edge = "shift"
    ref = _pred_by_image(model.predict_store(r["store"], r["names"]))
    assert np.abs(ref.to_numpy() - padded.to_numpy()).max() > 10 * ATOL  # the edge matters on this data
    table = Predictor(model=model, aligned=True).predict(r["root"], recursive=True)
    got = _by_image(table)[ref.columns]
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), atol=ATOL)


@pytest.mark.slow
def test_causal_windows_never_look_ahead(research, tmp_path):
    r = research
    video = sorted(p for p in r["root"].iterdir() if p.is_dir())[0]
    head = tmp_path / video.name
    head.mkdir()
    frames = sorted(video.glob("*.jpg"))
    for p in frames[:6]:
        shutil.copy(p, head / p.name)
    live = Predictor(model=r["temporal_model"], aligned=True, temporal="causal")
    full, part = live.predict(video), live.predict(head)
    cols = [*AU_P_COLUMNS, *EXPR_P_COLUMNS, "valence", "arousal"]
    np.testing.assert_allclose(full[cols].to_numpy()[:6], part[cols].to_numpy(), atol=1e-6)
    centred = Predictor(model=r["temporal_model"], aligned=True).predict(video)
    assert not np.allclose(full[cols].to_numpy(), centred[cols].to_numpy(), atol=1e-4)


@pytest.mark.slow
def test_frame_sequences_are_timed_smoothed_and_plotted_like_videos(research):
    from mtaffect.predict.plots import timeline_pngs

    video = sorted(p for p in research["root"].iterdir() if p.is_dir())[0]
    raw = Predictor(aligned=True).predict(video, fps=30)
    np.testing.assert_allclose(raw["time"], raw["frame"] / 30)
    smooth = Predictor(aligned=True, smoothing="centred").predict(video, fps=30)
    assert (smooth["face_id"] == 0).all()
    assert smooth["Happiness_p"].diff().abs().sum() < raw["Happiness_p"].diff().abs().sum()
    assert list(timeline_pngs(smooth, str(video))) == [0]


@pytest.mark.slow
def test_aligned_stills_get_annotated_pictures_thumbnails_and_landmarker_pose(research, tmp_path):
    """--aligned rows have no box and no five landmarks: the pose is the face landmarker's, measured on
    the crop (NaN where it could not measure the face); the annotated picture and the report's thumbnail
    are the whole crop; stills of two folders with the same file names get distinct outputs."""
    out = tmp_path / "o"
    run(
        "predict",
        research["root"],
        "--recursive",
        "--aligned",
        "--stills",
        "--plot",
        "--report",
        "--out",
        out,
        "--quiet",
    )
    table = read_table(out / f"{CROPPED_DIR}.csv")
    assert len(table) == len(research["names"])
    measured = table["bs_jawOpen"].notna()
    assert measured.mean() > 0.5
    assert (table[list(POSE_COLUMNS)].notna().all(axis=1) == measured).all()
    pictures = sorted(out.glob("*_annotated.jpg"))
    assert len(pictures) == len(research["names"])  # one per still, none overwriting another
    assert (out / "report.html").read_text().count("data:image/jpeg;base64") >= len(research["names"])
