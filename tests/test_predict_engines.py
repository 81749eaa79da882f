"""One pipeline, two engines: `predict --engine onnxruntime` gives the torch engine's table (same faces,
same ids, probabilities and VA to 1e-4), temporal checkpoints over face tracks included, and runs in a
process where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from model_helpers import lstm_checkpoint
from no_torch import BLOCK_TORCH
from PIL import Image

pytest.importorskip("onnxscript")
pytest.importorskip("skimage")  # the public-domain test face

from mtaffect.predict import demo_media
from mtaffect.predict.job import predict_to_file
from mtaffect.predict.outputs import read_table
from mtaffect.predict.pipeline import Predictor
from mtaffect.predict.sources import expand_inputs
from mtaffect.schema import AU_PROB_COLUMNS, BOX_COLUMNS, EXPR_PROB_COLUMNS, POSE_COLUMNS, VA_NAMES

PROBS = [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, *VA_NAMES]
SETTINGS = {"detect_every": 5}
pytestmark = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.filterwarnings("ignore:folders of frames carry no frame rate"),  # frames: no times asked
]


@pytest.fixture(scope="module")
def video(away_video) -> Path:
    return away_video  # two faces; the first is out of view 1.2 s (longer than tracking by position)


@pytest.fixture(scope="module")
def ort_table(default_export, video) -> pd.DataFrame:
    folder, _ = default_export
    return Predictor(model=folder, engine="onnxruntime", precision="float32", **SETTINGS).predict(video)


@pytest.mark.slow
def test_both_engines_give_one_table(ort_table, away_torch_table):
    ref = away_torch_table  # Predictor(**SETTINGS) on the video (conftest)
    got = ort_table
    keys = ["frame", "face_id", "success"]
    pd.testing.assert_frame_equal(got[keys], ref[keys])  # the same faces, with the same ids
    assert sorted(ref.loc[ref.success == 1, "face_id"].unique()) == [0, 1]  # re-identified, both engines
    ok = ref["success"] == 1
    assert np.abs(got.loc[ok, PROBS].to_numpy() - ref.loc[ok, PROBS].to_numpy()).max() <= 1e-4
    np.testing.assert_allclose(got.loc[ok, list(BOX_COLUMNS)], ref.loc[ok, list(BOX_COLUMNS)], atol=0.05)
    np.testing.assert_allclose(got.loc[ok, list(POSE_COLUMNS)], ref.loc[ok, list(POSE_COLUMNS)], atol=1e-3)
    assert (got["expression"] == ref["expression"]).all()


NO_TORCH = BLOCK_TORCH + textwrap.dedent(
    """
    import json
    export, video, out = sys.argv[1:4]
    from mtaffect.predict.pipeline import Predictor

    p = Predictor(model=export, engine="onnxruntime", precision="float32", detect_every=5)
    p.predict(video).to_csv(out + "/api.csv", index=False)
    from mtaffect.cli import app

    sys.argv = ["mtaffect", "predict", video, "--engine", "onnxruntime", "--model", export, "--precision",
                "float32", "--detect-every", "5", "--out", out + "/cli", "--report", "--quiet"]
    try:
        app()
    except SystemExit as e:
        code = e.code
    print(json.dumps({"exit": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
    """
)


@pytest.mark.slow
def test_predict_runs_where_torch_cannot_be_imported(default_export, video, ort_table, tmp_path):
    """The Python API and the CLI (a resumable job, report included) with torch unimportable."""
    folder, _ = default_export
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(video), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["exit"] == 0 and "torch" not in got["modules"] and "lightning" not in got["modules"]
    api = pd.read_csv(tmp_path / "api.csv")
    np.testing.assert_allclose(api[PROBS].to_numpy(), ort_table[PROBS].to_numpy(), atol=1e-6)
    cli = read_table(tmp_path / "cli" / f"{video.stem}.csv")
    np.testing.assert_allclose(cli[PROBS].to_numpy(), ort_table[PROBS].to_numpy(), atol=1e-5)
    assert (cli["face_id"].to_numpy() == ort_table["face_id"].to_numpy()).all()
    assert "onnxruntime (float32)" in (tmp_path / "cli" / "report.html").read_text()


def _aligned_sequence(folder: Path, n: int = 11) -> Path:
    """A numbered-frame folder of aligned faces whose AUs drift (one face track)."""
    from mtaffect.data.synth_faces import FaceIdentity, render_face

    rng = np.random.default_rng(4)
    ident = FaceIdentity.sample(rng, size=112)
    start, end = rng.uniform(0, 1, (2, 12))
    folder.mkdir()
    for i, t in enumerate(np.linspace(0, 1, n)):
        Image.fromarray(render_face(start + (end - start) * t, ident, rng)).save(folder / f"{i + 1:05d}.png")
    return folder


@pytest.mark.slow
def test_a_temporal_checkpoint_runs_its_windows_with_onnxruntime(tmp_path):
    """A checkpoint given to the onnxruntime engine is exported first (here without MTCNN: aligned
    faces), and its track windows, centred and causal, give the torch engine's numbers."""
    ckpt = lstm_checkpoint(tmp_path / "lstm", window=4, gain=3.0)
    seq = _aligned_sequence(tmp_path / "clip")
    ort = Predictor(model=ckpt, engine="onnxruntime", aligned=True)
    assert ort.window == 4 and ort.engine.manifest.get("detector") is None
    for mode in ("centred", "causal"):
        ref = Predictor(model=ckpt, aligned=True, temporal=mode).predict(seq)
        ort.temporal = mode
        got = ort.predict(seq)
        assert len(got) == 11 and np.abs(got[PROBS].to_numpy() - ref[PROBS].to_numpy()).max() <= 1e-4
    # a fixed-window export (--window T) gets single faces in groups of T: the same backbone arrays
    (item,) = expand_inputs(seq)
    faces = np.stack([f.image for f in ort.open(item)])
    free = ort.engine.embed(faces)["features"]
    ort.engine.model.window = 3  # as a --window 3 export declares it (the graph itself takes any)
    np.testing.assert_allclose(ort.engine.embed(faces)["features"], free, atol=1e-5)
    folder = ort.engine.folder
    del ort
    import gc

    gc.collect()
    assert not folder.exists()  # the temporary export goes with its engine


def test_engine_choices_are_checked_and_jobs_keep_engines_apart(default_export, video, tmp_path):
    from typer.testing import CliRunner

    from mtaffect.cli import app

    folder, manifest = default_export
    with pytest.raises(ValueError, match="engine must be one of"):
        Predictor(engine="tensorrt")
    with pytest.raises(ValueError, match="--engine onnxruntime"):
        Predictor(model=folder)  # an export folder given to the torch engine
    with pytest.raises(ValueError, match="precision"):
        Predictor(precision="int8")
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        Predictor(model=folder, engine="onnxruntime", device="mps")
    res = CliRunner().invoke(
        app,
        [
            "predict",
            str(video),
            "--engine",
            "onnxruntime",
            "--model",
            str(folder),
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
    )
    assert res.exit_code == 2 and "error:" in res.output and "CUDAExecutionProvider" in res.output
    # float32 unless int8 is asked for (smaller, not faster on CPU); a job's signature names the engine
    assert Predictor(model=folder, engine="onnxruntime").engine.runtime.precision == "float32"
    int8 = Predictor(model=folder, engine="onnxruntime", precision="int8")
    assert int8.engine.runtime.precision == "int8" and "int8" in int8.engine.card()["engine"]
    assert int8.settings() != Predictor().settings()
    assert int8.settings()["face_model_sha256"] == manifest["files"]["face_model.int8.onnx"]["sha256"]
    still = tmp_path / "still.png"
    Image.fromarray(next(demo_media.frames(1, faces=1))).save(still)
    (r,) = predict_to_file(int8, still, tmp_path / "still.csv")
    assert r.ok and (read_table(tmp_path / "still.csv")["success"] == 1).sum() == 1
