"""The embedded default model: fer -> 8 classes with the Other rule, AU/VA priors, real-face accuracy."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mtaffect.features.fer_minixception import FER_CLASS_NAMES, FER_TO_EXPR
from mtaffect.models.base import FaceAffectModel
from mtaffect.models.default import DefaultAffectModel, default_priors_path, fer_to_abaw
from mtaffect.schema import AU_NAMES, EXPR_NAMES

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OTHER = EXPR_NAMES.index("Other")


@pytest.fixture(scope="module")
def model() -> DefaultAffectModel:
    return DefaultAffectModel()


def test_implements_the_application_contract(model):
    assert isinstance(model, FaceAffectModel)
    assert model.backbone == "fer-minixception"
    assert model.au_thresholds.shape == (len(AU_NAMES),)


def test_outputs_are_probabilities_and_in_range(model):
    logits = torch.randn(200, len(FER_CLASS_NAMES), generator=torch.Generator().manual_seed(0)) * 3
    out = model.predict(torch.zeros(200, 128), logits)
    assert out.expr_probs.shape == (200, 8) and out.au_probs.shape == (200, 12) and out.va.shape == (200, 2)
    np.testing.assert_allclose(out.expr_probs.sum(1), 1.0, atol=1e-5)
    assert (out.expr_probs >= 0).all() and (out.au_probs >= 0).all() and (out.au_probs <= 1).all()
    assert np.abs(out.va).max() <= 1.0
    # AU and VA are the expression-weighted mixtures of the priors.
    np.testing.assert_allclose(out.au_probs, out.expr_probs @ model.p_au, atol=1e-5)
    np.testing.assert_allclose(out.va, out.expr_probs @ model.va_means, atol=1e-5)


def test_fer_classes_land_on_the_right_abaw_classes():
    tau = 0.4
    for k, name in enumerate(FER_CLASS_NAMES):
        one_hot = np.zeros((1, 7))
        one_hot[0, k] = 1.0
        p = fer_to_abaw(one_hot, tau)[0]
        assert p[FER_TO_EXPR[k]] == pytest.approx(1.0), name
        assert p[OTHER] == 0.0  # a confident face never goes to Other
    assert EXPR_NAMES[FER_TO_EXPR[FER_CLASS_NAMES.index("happy")]] == "Happiness"


def test_other_takes_mass_from_ambiguous_faces():
    tau = 0.4
    uniform = fer_to_abaw(np.full((1, 7), 1 / 7), tau)[0]
    assert uniform[OTHER] == pytest.approx((tau - 1 / 7) / tau)
    assert uniform.sum() == pytest.approx(1.0)
    mild = np.array([[0.35, 0.05, 0.1, 0.2, 0.1, 0.1, 0.1]])
    assert fer_to_abaw(mild, tau)[0, OTHER] == pytest.approx((tau - 0.35) / tau)
    assert fer_to_abaw(mild, 0.0)[0, OTHER] == 0.0  # tau=0 disables Other


def test_happy_face_gets_smile_aus_and_positive_valence(model):
    logits = torch.full((1, 7), -5.0)
    logits[0, FER_CLASS_NAMES.index("happy")] = 5.0
    out = model.predict(torch.zeros(1, 128), logits)
    au = dict(zip(AU_NAMES, out.au_probs[0], strict=True))
    assert au["AU12"] > 0.9 and au["AU6"] > 0.85 and au["AU4"] < 0.1
    assert out.va[0, 0] > 0.4
    sad = torch.full((1, 7), -5.0)
    sad[0, FER_CLASS_NAMES.index("sad")] = 5.0
    assert model.predict(torch.zeros(1, 128), sad).va[0, 0] < -0.5


def test_rejects_a_backbone_without_fer_logits(model):
    with pytest.raises(ValueError, match="7 logits"):
        model.predict(torch.zeros(2, 128), None)


def test_priors_file_names_its_sources_and_matches_the_schema():
    data = json.loads(default_priors_path().read_text())
    assert data["expr_names"] == list(EXPR_NAMES) and data["au_names"] == list(AU_NAMES)
    assert "CK+" in data["sources"]["ckplus"] and "Apache-2.0" in data["sources"]["ckplus"]
    assert "YenanLiu/ABAW7th" in data["sources"]["abaw"]


def test_build_script_reproduces_the_embedded_priors():
    ck = SHARED / "ckplus_facs_netfacs" / "ckplus_facs_emotion.csv"
    if not ck.is_file():
        pytest.skip("../shared/data/ckplus_facs_netfacs is absent")
    spec = importlib.util.spec_from_file_location(
        "build_default_priors", ROOT / "scripts" / "build_default_priors.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build(ck) == json.loads(default_priors_path().read_text())


def _smile_subset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageFile

    d = SHARED / "smilesmiled"
    with open(d / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pick = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    imgs, labels = [], []
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with tarfile.open(d / "smilesmiled_images.tar") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for i in pick:
                with Image.open(io.BytesIO(tar.extractfile(members[rows[i]["path"]]).read())) as im:
                    imgs.append(np.asarray(im.convert("L").resize((64, 64))))
                labels.append(int(rows[i]["smile"]))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return np.stack(imgs), np.array(labels)


def test_ranks_real_smiles_on_smilesmiled(model):
    if not (SHARED / "smilesmiled" / "smilesmiled_images.tar").is_file():
        pytest.skip("../shared/data/smilesmiled is absent")
    from sklearn.metrics import roc_auc_score

    from mtaffect.features.registry import create_backbone

    imgs, y = _smile_subset(800)
    bb = create_backbone("fer-minixception")
    with torch.inference_mode():
        o = bb(bb.preprocess(imgs))
    out = model.predict(o.features, o.logits)
    happy = roc_auc_score(y, out.expr_probs[:, EXPR_NAMES.index("Happiness")])
    au12 = roc_auc_score(y, out.au_probs[:, AU_NAMES.index("AU12")])
    assert happy > 0.9 and au12 > 0.9  # full set: see docs/model_card.md
