"""One resolver for every model name, and each model loaded only for a role it can serve."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from no_torch import BLOCK_TORCH
from test_train import TinyModel

import mtaffect
from mtaffect.models.base import AffectPredictor, FaceAffectModel
from mtaffect.models.checkpoint import save_checkpoint
from mtaffect.models.default import DefaultAffectModel
from mtaffect.models.ensemble import EnsembleAffectModel, save_ensemble
from mtaffect.models.loading import (
    ModelRoleError,
    backbone_of,
    load_face_model,
    load_predictor,
    resolve_backbone,
)
from mtaffect.models.names import parse_model_name
from mtaffect.models.trained import TrainedAffectModel

BACKBONE = {"name": "hand-made", "spec": {"name": "hand-made"}, "fingerprint": "abc123"}
TASKS = {"au": "m", "expr": "m", "va": "m"}


@pytest.fixture
def folders(tmp_path):
    """A checkpoint, a run holding it as best/, an ensemble of it, an export folder (its marker only)."""
    ck = save_checkpoint(tmp_path / "run" / "best", TinyModel(12), backbone=BACKBONE, feature_dim=12)
    ens = save_ensemble(tmp_path / "ens", {"m": ck}, TASKS)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "export.json").write_text("{}")
    return {"checkpoint": ck, "run": tmp_path / "run", "ensemble": ens, "export": tmp_path / "exp"}


def test_every_name_resolves_to_its_kind(folders):
    assert parse_model_name(None).kind == parse_model_name("default").kind == "default"
    ref = parse_model_name("emotiefflib:enet_b0_8_va_mtl")
    assert (ref.kind, ref.location) == ("emotiefflib", "enet_b0_8_va_mtl")
    for kind in ("checkpoint", "ensemble", "export"):
        assert parse_model_name(folders[kind]).kind == kind
    for name in (folders["run"], f"run:{folders['run']}", f"run:{folders['checkpoint']}"):
        ref = parse_model_name(name)  # a run folder means the model it selected
        assert ref.kind == "checkpoint" and ref.path == folders["checkpoint"]


def test_names_that_mean_no_model_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: model not found"):
        parse_model_name(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="notes is not a model folder"):
        parse_model_name(tmp_path / "notes")
    for name in ("emotiefflib:", "run:"):
        with pytest.raises(ValueError, match="name"):
            parse_model_name(name)


def test_the_application_gets_face_models_only(folders):
    assert isinstance(load_face_model(None), DefaultAffectModel)
    for name in (folders["checkpoint"], folders["run"]):
        model = load_face_model(name)
        assert isinstance(model, TrainedAffectModel) and isinstance(model, FaceAffectModel)
    with pytest.raises(ModelRoleError, match=r"ens \(an ensemble folder.*several backbones"):
        load_face_model(folders["ensemble"])
    with pytest.raises(ModelRoleError, match="several backbones"):  # a loaded ensemble too
        load_face_model(load_predictor(folders["ensemble"]))
    with pytest.raises(ModelRoleError, match="--engine onnxruntime"):
        load_face_model(folders["export"])


def test_a_model_fusing_other_models_features_is_no_face_model(tmp_path):
    ck = save_checkpoint(tmp_path / "ck", TinyModel(12), backbone=BACKBONE, feature_dim=12)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["inputs"] = ["features", "features@au"]
    (ck / "config.json").write_text(json.dumps(cfg))
    assert load_predictor(ck).store_inputs == ("features@au",)  # research code gives it the stores
    with pytest.raises(ModelRoleError, match=r"reads the features of other models \(features@au\)"):
        load_face_model(ck)


def test_research_code_gets_checkpoints_and_ensembles(folders):
    ens = load_predictor(folders["ensemble"])
    assert isinstance(ens, EnsembleAffectModel) and isinstance(ens, AffectPredictor)
    assert not isinstance(ens, FaceAffectModel)  # never presented as what it is not
    assert isinstance(mtaffect.load_model(folders["run"]), TrainedAffectModel)  # the README's name
    x = torch.randn(3, 12)
    np.testing.assert_allclose(
        load_predictor(folders["run"]).predict(x).va, load_face_model(folders["checkpoint"]).predict(x).va
    )
    with pytest.raises(ModelRoleError, match="the embedded default model is not a trained model"):
        load_predictor("default")
    with pytest.raises(ModelRoleError, match="give the checkpoint it was exported from"):
        load_predictor(folders["export"])


def test_extract_backbones_resolve_names_and_runs(tmp_path):
    from mtaffect.features.registry import create_backbone
    from mtaffect.models.registry import create_model

    assert resolve_backbone("fer-minixception", {"x": 1}) == "fer-minixception"  # built by extraction
    spec = create_backbone("fer-minixception").spec
    recipe = create_model("emotinet", feature_dim=spec.feature_dim, num_logits=spec.num_logits)
    backbone = {"name": spec.name, "spec": {"name": spec.name}, "fingerprint": spec.fingerprint()}
    save_checkpoint(
        tmp_path / "run" / "best",
        recipe,
        backbone=backbone,
        feature_dim=spec.feature_dim,
        num_logits=spec.num_logits,
    )
    bb = resolve_backbone(f"run:{tmp_path / 'run'}")
    assert bb.spec.fingerprint() == spec.fingerprint() == backbone_of(tmp_path / "run").spec.fingerprint()
    with pytest.raises(ValueError, match="--backbone-arg does not apply to run:RUN"):
        resolve_backbone(f"run:{tmp_path / 'run'}", {"image_size": 64})


def test_names_resolve_without_torch(folders):
    """The onnxruntime engine decides between an export folder and a model to export without torch."""
    names = [str(folders["export"]), str(folders["run"])]
    script = BLOCK_TORCH + (
        "from mtaffect.models.names import parse_model_name\n"
        f"print(*(parse_model_name(n).kind for n in {names!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["export", "checkpoint"]
