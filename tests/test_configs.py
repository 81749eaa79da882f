"""Every shipped recipe config trains end to end through the CLI on a synthetic set with features from
the embedded backbone, saves a checkpoint that reloads, and predicts a PredictionTable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtaffect.cli import app
from mtaffect.data.predictions import PredictionTable
from mtaffect.data.submission import read_test_list
from mtaffect.models.checkpoint import load_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
runner = CliRunner()


def run(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("configs")
    run("synth", "--out", tmp / "data", "--videos", "8", "--frames", "40", "--seed", "1")
    # --tokens: recipe 1 reads patch tokens (the mini-Xception last-block map, 4x4x128)
    run("extract", "--data", tmp / "data", "--out", tmp / "fer", "--workers", "0", "--tokens")
    return tmp / "data", tmp / "fer"


def test_one_config_per_recipe():
    assert {c.stem for c in CONFIGS} == {"queries_gcn", "au_graph", "progressive", "emotinet"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_trains_saves_reloads_and_predicts(config: Path, synth_store, tmp_path: Path):
    data, store = synth_store
    out = run(
        "train", "--config", config, "--features", store, "--data", data, "--out", tmp_path / "run",
        "--no-progress", "--override", "trainer.epochs=1",
    )  # fmt: skip
    assert "P = " in out
    model = load_model(tmp_path / "run" / "best")
    assert model.backbone == "fer-minixception"
    pred_path = tmp_path / "test.parquet"
    run("infer", "--model", tmp_path / "run" / "best", "--features", store, "--images", data / "MTL.txt",
        "--out", pred_path)  # fmt: skip
    pred = PredictionTable.read(pred_path)
    assert pred.images.tolist() == list(dict.fromkeys(read_test_list(data / "MTL.txt")))
    np.testing.assert_allclose(pred.expr_probs.sum(1), 1.0, atol=1e-5)
    assert ((pred.au_probs >= 0) & (pred.au_probs <= 1)).all()
    assert (np.abs(pred.frame[["valence", "arousal"]].to_numpy()) <= 1).all()
