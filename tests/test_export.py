"""`mtaffect export`: the folder and its manifest, onnxruntime == PyTorch for the default model, every
recipe (temporal ones over windows) and MTCNN on a real photo, int8 quantisation, refusals that leave
nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import torch_path
from typer.testing import CliRunner

pytest.importorskip("onnxscript")
pytest.importorskip("skimage")  # the public-domain test photos

from skimage import data as skimage_data

from mtaffect.cli import app
from mtaffect.export.exporter import DEFAULT_OPSET, ExportCheckError, export_model, synthetic_faces
from mtaffect.faces import MTCNN
from mtaffect.faces.align import align_faces_fast
from mtaffect.features.decode import resize_array
from mtaffect.features.registry import create_backbone
from mtaffect.io import OutputExistsError
from mtaffect.models.default import DefaultAffectModel
from mtaffect.runtime import ExportError, Runtime, read_manifest
from mtaffect.runtime.manifest import sha256_file

TOL = 1e-4
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _assert_close(got, want, tol: float = TOL) -> None:
    for name in ("expr_probs", "au_probs", "va"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() <= tol, (name, float(np.abs(a - b).max()))


# ---- the default model and MTCNN ------------------------------------------------------------------------


def test_folder_lists_every_file_with_its_hash_and_how_to_feed_it(default_export):
    out, manifest = default_export
    assert not (out / "stale.onnx").exists()  # --overwrite replaced the old export as a whole
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert set(manifest["files"]) == {
        "face_model.onnx",
        "face_model.int8.onnx",
        "mtcnn_pnet.onnx",
        "mtcnn_rnet.onnx",
        "mtcnn_onet.onnx",
    }
    for name, record in manifest["files"].items():
        assert record["sha256"] == sha256_file(out / name)
        assert record["bytes"] == (out / name).stat().st_size
    assert read_manifest(out) == json.loads((out / "export.json").read_text())
    import onnx

    assert manifest["opset"] == DEFAULT_OPSET
    opsets = {o.domain: o.version for o in onnx.load(str(out / "face_model.onnx")).opset_import}
    assert opsets[""] == DEFAULT_OPSET
    face = manifest["face_model"]
    assert face["inputs"]["pixels"] == {"dtype": "uint8", "shape": ["batch", 64, 64, 1]}
    assert list(face["outputs"])[:3] == ["expr_probs", "au_probs", "va"]
    pre = manifest["preprocessing"]
    assert pre["resize"]["size"] == 64 and pre["colour"] == "L" and pre["normalise"]["mean"] == [0.5]
    assert "BILINEAR" in pre["resize"]["filter"] and len(pre["align"]["template"]) == 5
    np.testing.assert_allclose(
        manifest["postprocessing"]["au_thresholds"], DefaultAffectModel().au_thresholds
    )
    checks = manifest["checks"]
    assert max(checks["face_model"]["max_abs_diff"].values()) <= TOL
    assert max(checks["mtcnn"]["max_abs_diff"].values()) <= TOL


def test_default_model_on_a_real_face_matches_torch(default_export):
    out, _ = default_export
    img = skimage_data.astronaut()
    (det,) = MTCNN().detect(img)
    faces = np.stack([resize_array(f, 64, "L") for f in align_faces_fast(img, det.landmarks)])[..., None]
    want, backbone_out = torch_path(DefaultAffectModel(), faces)
    rt = Runtime(out, precision="float32")
    got, arrays = rt.model.run(faces)
    _assert_close(got, want)
    np.testing.assert_allclose(arrays["features"], backbone_out.features.numpy(), atol=TOL)
    # the same through the runtime's own detector and alignment
    found, probs = rt.analyse(img)
    assert len(found) == 1
    _assert_close(probs, want)
    assert probs.expr_probs[0].argmax() == 4  # a broad smile: Happiness


def test_mtcnn_onnxruntime_detections_match_torch_on_real_photos(default_export):
    out, _ = default_export
    img = skimage_data.astronaut()
    photos = [
        img,
        np.ascontiguousarray(img[:, ::-1]),
        np.ascontiguousarray(img[:, 210:]),
        skimage_data.coffee(),
    ]
    want = MTCNN().detect(photos)
    got = Runtime(out).detector().detect(photos)
    assert [len(d) for d in got] == [len(d) for d in want]
    assert len(got[0]) == 1
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    moved = want[0].boxes + 3.0  # O-Net tracking step between detections
    a, b = Runtime(out).detector().refine(img, moved), MTCNN().refine(img, moved)
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


#: The int8 graph's error against the float32 one, bounded with margin over what was measured (CPU,
#: onnxruntime 1.x): the export's own check on its 16 synthetic faces measured max |diff| 0.095 (EXPR),
#: 0.061 (AU), 0.046 (VA), EXPR argmax agreement 0.875, AU decisions 1.0; 64 synthetic faces of seeds
#: 4-6 measured max |diff| <= 0.199 and mean |diff| <= 0.016 for every output, agreement >= 0.92;
#: the astronaut's real face max |diff| 1.0e-4 and the same expression.
INT8_CHECK_MAX_DIFF = 0.2
INT8_MAX_DIFF, INT8_MEAN_DIFF, INT8_AGREEMENT = 0.3, 0.03, 0.85
INT8_REAL_FACE_MAX_DIFF = 2e-3


def test_int8_model_is_smaller_reported_and_chosen_by_default(default_export):
    out, manifest = default_export
    files = manifest["files"]
    assert files["face_model.int8.onnx"]["bytes"] < 0.6 * files["face_model.onnx"]["bytes"]
    report = manifest["checks"]["int8"]
    assert report["faces"] == 16
    assert set(report["max_abs_diff"]) == {"expr_probs", "au_probs", "va"}
    assert max(report["max_abs_diff"].values()) <= INT8_CHECK_MAX_DIFF, report
    assert report["expression_agreement"] >= 0.75 and report["au_decision_agreement"] >= 0.9, report
    rt = Runtime(out)
    assert rt.precision == "int8"
    faces = synthetic_faces(3, 64, "L", seed=4)
    default, _ = rt.model.run(faces)
    int8, _ = Runtime(out, precision="int8").model.run(faces)
    float32, _ = Runtime(out, precision="float32").model.run(faces)
    np.testing.assert_array_equal(default.expr_probs, int8.expr_probs)  # the int8 graph is what runs
    assert np.abs(default.expr_probs - float32.expr_probs).max() > 1e-5  # ... and not the float one


@pytest.mark.slow
def test_int8_error_against_the_float_model_is_bounded(default_export):
    out, _ = default_export
    faces = synthetic_faces(64, 64, "L", seed=4)
    int8, _ = Runtime(out, precision="int8").model.run(faces)
    float32, _ = Runtime(out, precision="float32").model.run(faces)
    for name in ("expr_probs", "au_probs", "va"):
        diff = np.abs(getattr(int8, name) - getattr(float32, name))
        assert diff.max() <= INT8_MAX_DIFF and diff.mean() <= INT8_MEAN_DIFF, (name, diff.max(), diff.mean())
    agreement = (int8.expr_probs.argmax(1) == float32.expr_probs.argmax(1)).mean()
    assert agreement >= INT8_AGREEMENT, agreement
    img = skimage_data.astronaut()  # a real face: far closer than the synthetic noise above
    (det,) = MTCNN().detect(img)
    real = np.stack([resize_array(f, 64, "L") for f in align_faces_fast(img, det.landmarks)])[..., None]
    int8, _ = Runtime(out, precision="int8").model.run(real)
    float32, _ = Runtime(out, precision="float32").model.run(real)
    _assert_close(int8, float32, tol=INT8_REAL_FACE_MAX_DIFF)
    assert int8.expr_probs[0].argmax() == float32.expr_probs[0].argmax() == 4  # Happiness


def test_a_damaged_or_incomplete_export_is_refused(default_export, tmp_path):
    src, _ = default_export
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    blob = bytearray((bad / "face_model.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "face_model.onnx").write_bytes(bytes(blob))
    with pytest.raises(ExportError, match=r"face_model\.onnx does not match the sha256"):
        Runtime(bad)
    (bad / "mtcnn_onet.onnx").unlink()
    with pytest.raises(ExportError, match=r"mtcnn_onet\.onnx is missing"):
        Runtime(bad, verify=False)
    with pytest.raises(ExportError, match="not an mtaffect export"):
        Runtime(tmp_path)
    plain = tmp_path / "plain"  # as exported without --quantize
    shutil.copytree(src, plain)
    manifest = json.loads((plain / "export.json").read_text())
    manifest["face_model"]["int8_file"] = None
    del manifest["files"]["face_model.int8.onnx"]
    (plain / "export.json").write_text(json.dumps(manifest))
    assert Runtime(plain).precision == "float32"
    with pytest.raises(ValueError, match="no int8 face model"):
        Runtime(plain, precision="int8")


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(tmp_path):
    """Issue 20 case 2: `export --out e --no-detector --overwrite` deleted a user's notes."""
    out = tmp_path / "e"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["export", "--out", str(out), "--no-detector", "--overwrite"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith("error:") and "e is not a export written by mtaffect (it holds notes.txt)" in said
    assert (out / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def _manifest_edit(src: Path, folder: Path, edit) -> Path:
    shutil.copytree(src, folder)
    manifest = json.loads((folder / "export.json").read_text())
    edit(manifest)
    (folder / "export.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["files"].update({"../o2/face_model.onnx": m["files"]["face_model.onnx"]}),
            r"files\['../o2/face_model.onnx'\] must be a plain file name inside the export folder",
        ),
        (
            lambda m: m["files"].update({"/tmp/x.onnx": m["files"]["face_model.onnx"]}),
            r"files\['/tmp/x.onnx'\] must be a plain file name",
        ),
        (
            lambda m: m["detector"]["files"].update(pnet="../x.onnx"),
            r"detector.files.pnet must name a file listed in files, got '../x.onnx'",
        ),
        (
            lambda m: m["face_model"].update(file="elsewhere.onnx"),
            r"face_model.file must name a file listed in files, got 'elsewhere.onnx'",
        ),
        (
            lambda m: m["files"].pop("face_model.onnx"),
            r"face_model.file must name a file listed in files, got 'face_model.onnx'",
        ),
        (
            lambda m: m["postprocessing"].update(au_thresholds=[float("nan")] * 12),
            r"postprocessing.au_thresholds must be 12 numbers between 0 and 1",
        ),
        (lambda m: m["face_model"].update(window=0), r"face_model.window must be null or a positive integer"),
        (lambda m: m["preprocessing"]["resize"].update(size="112"), r"preprocessing.resize.size must be"),
        (lambda m: m.update(format_version=2), r"export format version 2 is newer .* up to 1\); upgrade"),
    ],
)
def test_a_manifest_naming_files_outside_its_folder_or_bad_values_is_refused(
    default_export, tmp_path, edit, message
):
    """Issue 20 case 14 (and the raw `error: face_model.onnx` of a missing entry)."""
    folder = _manifest_edit(default_export[0], tmp_path / "exp", edit)
    with pytest.raises(ExportError, match=rf"export.json: {message}"):
        Runtime(folder, verify=False)


def test_existing_output_is_kept_and_bad_options_refused_before_any_work(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="overwrite"):
        export_model("default", out)
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="for temporal models"):
        export_model("default", tmp_path / "w", window=5)
    with pytest.raises(ValueError, match="opset"):
        export_model("default", tmp_path / "o", opset=9)
    result = runner.invoke(app, ["export", "--out", str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    refusal = rf"error: {re.escape(str(out))} is not an? export written by mtaffect \(it holds mine\.txt\); "
    assert re.match(refusal + "refusing to replace it", said), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_without_the_export_extra_the_error_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    without = lambda name, *a, **kw: None if name == "onnxscript" else real(name, *a, **kw)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(ValueError, match=r'needs onnxscript.*pip install "mtaffect\[export\]"'):
        export_model("default", tmp_path / "exp")
    result = runner.invoke(app, ["export", "--out", str(tmp_path / "exp")])
    assert result.exit_code == 2 and "error: exporting to ONNX needs onnxscript" in result.output
    assert 'pip install "mtaffect[export]"' in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_disagreeing_export_is_refused_and_leaves_nothing(default_export, tmp_path, monkeypatch):
    """The check compares onnxruntime with PyTorch for real; here PyTorch's answer is shifted by 1e-3."""
    import mtaffect.export.exporter as exporter

    src, _ = default_export
    real = exporter.torch_reference

    def shifted(*args):
        probs, arrays = real(*args)
        probs.va = probs.va + 1e-3
        return probs, arrays

    def reuse(module, args, path, *rest):  # the session's graph of the same model: no re-export
        shutil.copy(src / "face_model.onnx", path)

    monkeypatch.setattr(exporter, "torch_reference", shifted)
    monkeypatch.setattr(exporter, "onnx_export", reuse)
    with pytest.raises(ExportCheckError, match=r"differs from PyTorch by more than 0\.0001 \(va 1\.0"):
        export_model("default", tmp_path / "exp", detector=False)
    assert list(tmp_path.iterdir()) == []


# ---- trained recipes -----------------------------------------------------------------------------------

#: Tiny versions of the shipped configs (one decoder block, one transformer layer: every layer kind
#: that matters for export, at a fraction of the export time).
TINY = {
    "queries_gcn_cached": [
        "model.hparams.dim=16",
        "model.hparams.blocks=1",
        "model.hparams.heads=2",
        "model.hparams.ffn_dim=32",
    ],
    "au_graph": [
        "model.hparams.node_dim=8",
        "model.hparams.hidden=16",
        "model.hparams.key_dim=8",
        "model.hparams.attn_dim=8",
    ],
    "progressive": ["model.hparams.dim=16", "model.hparams.task_dim=16", "data.window=6", "data.stride=3"],
    "emotinet": ["model.hparams.au_hidden=16"],
}
#: One checkpoint per recipe (recipe 3 with its published LSTM), and recipe 3 with a transformer for the
#: fixed-window export.
RUNS = {
    "queries_gcn": ("queries_gcn_cached", []),  # the heads on cached tokens (the shipped config runs ViT-g)
    "au_graph": ("au_graph", []),
    "emotinet": ("emotinet", []),
    "progressive": ("progressive", ["model.hparams.temporal=lstm"]),
    "progressive-transformer": (
        "progressive",
        ["model.hparams.temporal=transformer", "model.hparams.temporal_kwargs={layers: 1}"],
    ),
}
RECIPES = ["queries_gcn", "au_graph", "emotinet", "progressive"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per run of RUNS, each trained one epoch on a small synthetic store."""
    from mtaffect.data.synth import SynthConfig, generate
    from mtaffect.features.extract import extract
    from mtaffect.train.config import load_config
    from mtaffect.train.fit import fit_from_root

    root = tmp_path_factory.mktemp("recipes")
    generate(root / "data", SynthConfig(videos=4, frames=20, seed=1))
    extract(root / "data", "fer-minixception", root / "fer", workers=0, tokens=True)
    configs = Path(__file__).resolve().parents[1] / "configs"
    out = {}
    for run, (recipe, extra) in RUNS.items():
        cfg = load_config(configs / f"{recipe}.yaml", [*TINY[recipe], *extra, "trainer.epochs=1"])
        cfg.trainer.progress = False
        fit_from_root(cfg, root / "fer", root / "data", root / run, log=None)
        out[run] = root / run / "best"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", RECIPES)
def test_trained_checkpoint_exports_with_parity(trained, run, tmp_path):
    from mtaffect.models.loading import load_model

    model = load_model(trained[run])
    export_model(trained[run], tmp_path / "exp", detector=False)
    rt = Runtime(tmp_path / "exp")
    faces = synthetic_faces(5, 64, "L", seed=11)
    want, _ = torch_path(model, faces)
    got, arrays = rt.model.run(faces)  # temporal models: each face a sequence of one frame, as in torch
    _assert_close(got, want)
    assert set(arrays) == {"features", *model.inputs}
    if not model.temporal:
        return
    assert (tmp_path / "exp" / "head.onnx").is_file()
    windows = synthetic_faces(3, 64, "L", window=9, seed=12)  # a window length never exported
    got_w, arrays_w = rt.model.run(windows)
    for i in range(len(windows)):
        _, out = torch_path(model, windows[i])
        seq = model.predict(out.features[None])  # one sequence (1, T, D)
        _assert_close(type(got_w)(got_w.va[i], got_w.expr_probs[i], got_w.au_probs[i]), seq)
        _assert_close(rt.model.predict(arrays_w["features"][i : i + 1]), seq)  # the heads alone
    _assert_close(rt.model.predict(arrays["features"]), want)  # N rows: N one-frame sequences


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A checkpoint as a fine-tuning run saves it: emotinet heads and, in backbone/, fer-minixception
    weights moved away from the vendored ones."""
    from mtaffect.models.checkpoint import save_checkpoint
    from mtaffect.models.registry import create_model

    torch.manual_seed(0)
    bb = create_backbone("fer-minixception")
    bb.prepare_finetune()  # unfused, trainable: what training saves
    with torch.no_grad():
        for p in bb.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    spec = bb.spec
    model = create_model("emotinet", feature_dim=spec.feature_dim, num_logits=spec.num_logits, au_hidden=16)
    backbone = {"name": spec.name, "spec": {"name": spec.name}, "fingerprint": spec.fingerprint()}
    return save_checkpoint(
        tmp_path_factory.mktemp("finetuned") / "best",
        model.eval(),
        backbone=backbone,
        feature_dim=spec.feature_dim,
        num_logits=spec.num_logits,
        backbone_weights=bb.eval(),
    )


@pytest.mark.slow
def test_a_finetuned_checkpoint_exports_its_own_backbone(finetuned, tmp_path):
    from mtaffect.models.loading import load_model

    model = load_model(finetuned)
    assert model.backbone_weights == "backbone"
    export_model(finetuned, tmp_path / "exp", detector=False)
    faces = synthetic_faces(5, 64, "L", seed=11)
    got, arrays = Runtime(tmp_path / "exp", precision="float32").model.run(faces)
    want, out = torch_path(model, faces)  # through the fine-tuned backbone
    _assert_close(got, want)
    np.testing.assert_allclose(arrays["features"], out.features.numpy(), atol=TOL)
    vendored, _ = torch_path(model, faces, create_backbone(model.backbone, **model.backbone_kwargs))
    assert np.abs(vendored.expr_probs - want.expr_probs).max() > 100 * TOL  # the weights matter


@pytest.mark.slow
def test_a_fixed_window_is_exported_and_enforced(trained, tmp_path):
    from mtaffect.models.loading import load_model

    run = trained["progressive-transformer"]
    export_model(run, tmp_path / "exp", detector=False, window=4)
    manifest = read_manifest(tmp_path / "exp")
    assert manifest["face_model"]["inputs"]["pixels"]["shape"][:2] == ["batch", 4]
    rt = Runtime(tmp_path / "exp")
    windows = synthetic_faces(2, 64, "L", window=4, seed=13)
    got, arrays = rt.model.run(windows)
    model = load_model(run)
    for i in range(len(windows)):
        _, out = torch_path(model, windows[i])
        want = model.predict(out.features[None])
        _assert_close(type(got)(got.va[i], got.expr_probs[i], got.au_probs[i]), want)
        _assert_close(rt.model.predict(arrays["features"][i : i + 1]), want)
    with pytest.raises(ValueError, match="fixed window of 4"):
        rt.model.run(synthetic_faces(2, 64, "L", window=5, seed=13))


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 2])
def test_a_fixed_window_export_is_quantised_over_windows_of_its_length(window, tmp_path):
    """--window T --quantize checks the int8 graph on T-frame windows (T=1: windows of one frame)."""
    from model_helpers import lstm_checkpoint

    ck = lstm_checkpoint(tmp_path / "ck", window=window)
    manifest = export_model(ck, tmp_path / "exp", detector=False, window=window, quantize=True)
    check = manifest["checks"]["int8"]
    assert check["faces"] == 16 * window
    # measured max |int8 - float32| <= 0.031 on every output (windows of 1 and 2, seeds 3 and 4): bar 0.08
    assert max(check["max_abs_diff"].values()) <= 0.08, check
    rt = Runtime(tmp_path / "exp")
    assert rt.precision == "int8"
    faces = synthetic_faces(2, 64, "L", window=window, seed=3)
    got, _ = rt.model.run(faces)
    assert got.expr_probs.shape == (2, window, 8)
    float32, _ = Runtime(tmp_path / "exp", precision="float32").model.run(faces)
    _assert_close(got, float32, tol=0.08)
    assert np.abs(got.au_probs - float32.au_probs).max() > 1e-5  # the int8 graph ran
