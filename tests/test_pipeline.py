"""Recipe 3 as published, end to end through the CLI on a synthetic set with a tiny random-init ViT:
task models -> export -> per-task enhanced models -> combined model -> infer / evaluate / submit, a
search over enhanced-model variants that trains the task models once, and steps that resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("kornia")

from cli_helpers import invoke, run  # noqa: E402

import mtaffect.train.pipeline as pipeline_module  # noqa: E402
from mtaffect.data.annotations import load_split  # noqa: E402
from mtaffect.data.predictions import PredictionTable  # noqa: E402
from mtaffect.features.extract import collect_images  # noqa: E402
from mtaffect.features.store import FeatureStore  # noqa: E402
from mtaffect.metrics import score  # noqa: E402
from mtaffect.models.checkpoint import load_model  # noqa: E402
from mtaffect.models.ensemble import EnsembleAffectModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def config(vit_folder, tmp_path_factory) -> Path:
    """configs/progressive_published.yaml as shipped, shrunk only where a CPU test must be small: a tiny
    random-init ViT saved to a folder (hf:<folder>), 1 epoch, small windows (4 for EXPR, 6 for VA)."""
    vit = vit_folder
    folder = tmp_path_factory.mktemp("published")
    cfg = yaml.safe_load((REPO / "configs" / "progressive_published.yaml").read_text())
    cfg["backbone"].update(name=f"hf:{vit}", image_size=32, lr=1e-3)
    cfg["model"]["hparams"]["dim"] = 16
    cfg["optim"].update(lr=1e-3, warmup_epochs=0)
    cfg["data"].update(batch_size=16, eval_batch_size=64, workers=0)
    cfg["trainer"].update(epochs=1, patience=0, progress=False)
    cfg["pipeline"]["export"] = {"batch_size": 64, "workers": 0}
    enh = cfg["pipeline"]["enhanced"]
    enh["expr"]["data"].update(window=4, stride=4, batch_size=16)
    enh["va"]["data"].update(window=6, stride=6, batch_size=24)
    for step in ("au", "va"):  # steps that set their own epochs (the peer's 30)
        enh[step]["trainer"]["epochs"] = 1
    path = folder / "published.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Trainings:
    """Counts the trainings the pipeline starts, by run folder name."""

    def __init__(self, monkeypatch) -> None:
        self.count: Counter = Counter()
        real = pipeline_module.fit

        def counted(cfg, root, train, val, out, **kw):
            self.count[Path(out).name] += 1
            return real(cfg, root, train, val, out, **kw)

        monkeypatch.setattr(pipeline_module, "fit", counted)


@pytest.fixture(scope="module")
def published(data, config, tmp_path_factory):
    """One run of the whole published pipeline through `mtaffect train`."""
    out = tmp_path_factory.mktemp("runs") / "published"
    mp = pytest.MonkeyPatch()
    trainings = Trainings(mp)
    log = run("train", "--config", config, "--data", data, "--out", out)
    mp.undo()
    return out, trainings.count, log


def test_published_structure_trains_end_to_end_and_predicts_each_task_from_its_model(
    published, data, tmp_path
):
    out, trained, _ = published
    steps = ["task_au", "task_expr", "task_va", "enhanced_au", "enhanced_expr", "enhanced_va", "enhanced_all"]
    assert trained == Counter({s: 1 for s in steps})  # each training once
    for t in ("au", "expr", "va"):  # task models: their task only, fine-tuned backbone in the checkpoint
        m = json.loads((out / f"task_{t}" / "metrics.json").read_text())
        assert m["tasks"] == [t] and m["not_trained"] == [x for x in ("au", "expr", "va") if x != t]
        assert (out / f"task_{t}" / "best" / "backbone" / "model.safetensors").is_file()
        assert len(FeatureStore.open(out / "stores" / t)) == len(collect_images(data))  # every image
    expr = load_model(out / "enhanced_expr" / "best")  # 4-frame windows (the peer pads), fused stores
    assert expr.window == 4 and expr.window_edge == "pad" and expr.temporal
    assert expr.store_inputs == ("features@au", "features@expr", "features@va")
    cfg = json.loads((out / "enhanced_expr" / "best" / "config.json").read_text())["train_config"]
    assert cfg["loss"]["weights"].get("expr", 1.0) == 1.0 and cfg["loss"]["va_weights"]["arousal"] == 0.0
    assert cfg["trainer"]["select"] == ["au", "expr", "valence"] and not cfg["loss"]["expr_class_weights"]
    assert json.loads((out / "enhanced_va" / "metrics.json").read_text())["tasks"] == ["va"]

    # the combined model: one model per task; infer from the images reproduces the validation predictions
    model = load_model(out / "best")
    assert isinstance(model, EnsembleAffectModel) and model.tasks == {"au": "au", "expr": "expr", "va": "va"}
    val = load_split(data, "val")
    pred = tmp_path / "val.parquet"
    run("infer", "--model", out / "best", "--images", data / "validation_set_annotations.txt", "--data", data,
        "--out", pred, "--workers", "0")  # fmt: skip
    table = PredictionTable.read(pred)
    names = list(dict.fromkeys(map(str, val.images)))
    assert sorted(map(str, table.images)) == sorted(names)  # every annotated row predicted exactly once
    saved = PredictionTable.read(out / "val_predictions.parquet").align_to(names)
    np.testing.assert_allclose(table.align_to(names).expr_probs, saved.expr_probs, atol=2e-3)
    np.testing.assert_allclose(table.align_to(names).valence, saved.valence, atol=2e-3)
    va_member = PredictionTable.read(out / "enhanced_va" / "val_predictions.parquet").align_to(names)
    np.testing.assert_allclose(saved.arousal, va_member.arousal, atol=1e-6)  # VA from the VA model

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["P_tasks"] == pytest.approx(score(val, saved).P, abs=1e-9)
    shown = run("evaluate", "--gt", data / "validation_set_annotations.txt", "--pred", pred)
    assert f"P = {score(val, table).P:.4f}" in shown
    post = tmp_path / "post.yaml"  # blending the combined model with another run, tuned as usual
    other = out / "enhanced_all" / "val_predictions.parquet"
    run("tune", "--gt", data / "validation_set_annotations.txt", "--pred", pred, other, "--out", post,
        "--widths", "2", "--kinds", "box", "--no-nested")  # fmt: skip
    gt = data / "validation_set_annotations.txt"
    assert "P = " in run("evaluate", "--gt", gt, "--pred", pred, "--pred", other, "--post", post)
    sub = tmp_path / "sub.txt"
    test_list = data / "MTL.txt"
    test_pred = tmp_path / "test.parquet"
    run("infer", "--model", out / "best", "--images", test_list, "--data", data, "--out", test_pred,
        "--workers", "0")  # fmt: skip
    assert "validated" in run("submit", "--pred", test_pred, "--test-list", test_list, "--out", sub)

    # the export step is `mtaffect extract --backbone run:<task run>`
    again = tmp_path / "au_store"
    run("extract", "--data", data, "--out", again, "--backbone", f"run:{out / 'task_au'}", "--workers", "0",
        "--split", "train,val")  # fmt: skip
    a, b = FeatureStore.open(again), FeatureStore.open(out / "stores" / "au")
    np.testing.assert_allclose(
        a.features(b.rows(list(a.images))), b.features(b.rows(list(a.images))), atol=1e-3
    )


def test_a_finished_pipeline_is_kept_and_an_interrupted_step_resumes(
    published, data, config, tmp_path, monkeypatch
):
    out, _, _ = published
    trainings = Trainings(monkeypatch)
    log = run("train", "--config", config, "--data", data, "--out", out)
    assert not trainings.count and "finished earlier, kept" in log  # nothing redone

    # a step killed after its first epoch continues from there with --resume
    import lightning as L

    class Killed(Exception):
        pass

    class Stop(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise Killed

    real = pipeline_module.fit
    monkeypatch.setattr(pipeline_module, "fit", lambda *a, **kw: real(*a, callbacks=[Stop()], **kw))
    fresh = tmp_path / "steps"
    args = ("train", "--config", config, "--data", data, "--out", fresh, "-o", "trainer.epochs=2")
    assert isinstance(invoke(*args, "--step", "task_va").exception, Killed)
    monkeypatch.setattr(pipeline_module, "fit", real)
    assert "--resume" in run(*args, "--step", "task_va", code=2)
    assert "needs step task_va" in run(*args, "--step", "export_va", code=2)
    log = run(*args, "--step", "task_va", "--resume")
    assert "resuming at epoch 1 of 2" in log
    history = json.loads((fresh / "task_va" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]


def test_search_trains_the_task_models_once_and_writes_the_chosen_combination(
    data, config, tmp_path, monkeypatch
):
    trainings = Trainings(monkeypatch)
    cfg = yaml.safe_load(config.read_text())
    cfg["pipeline"]["enhanced"].pop("all")  # three enhanced models per variant
    cfg["search"]["grid"] = [{"fusion_tasks": ["au", "expr", "va"]}, {"fusion_tasks": ["au", "va"]},
                             {"fusion_tasks": ["expr"], "temporal": "tcn"}]  # fmt: skip
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "search"
    shown = run("search", "--config", path, "--data", data, "--out", out)
    tasks = {k: v for k, v in trainings.count.items() if k.startswith("task_")}
    assert tasks == {"task_au": 1, "task_expr": 1, "task_va": 1}  # once, for all three variants
    assert sum(v for k, v in trainings.count.items() if k.startswith("enhanced_")) == 9
    assert all(v == 1 for v in trainings.count.values())
    report = json.loads((out / "search.json").read_text())
    assert len(report["ranked"]) == 3 and set(report["per_task"]) == {"au", "expr", "va"}
    for task, ranking in report["per_task"].items():  # each task ranked on its own term
        term = {"au": "f1_au", "expr": "f1_expr", "va": "ccc_va"}[task]
        values = [r[term] for r in ranking]
        assert values == sorted(values, reverse=True)
        assert report["chosen"][task]["variant"] == ranking[0]["variant"]
    assert "chosen" in shown.split("strategy search (ranked")[-1]  # the per-task choice column
    # the choice is a runnable config: it reuses every trained model and rebuilds the combined one
    trainings.count.clear()
    log = run("train", "--config", out / "chosen.yaml", "--data", data, "--out", out)
    assert not trainings.count and "combined P" in log
    assert isinstance(load_model(out / "best"), EnsembleAffectModel)


def test_overwrite_removes_only_what_the_pipeline_wrote(published, data, config, tmp_path):
    """Issue 20 case 3: `train --overwrite` of a pipeline deleted all of RUN/stores/, folders it never made
    included. Everything is checked before anything goes; then only the pipeline's own entries go."""
    from mtaffect.train.config import load_config
    from mtaffect.train.pipeline import Pipeline

    copy = tmp_path / "run"
    shutil.copytree(published[0], copy)
    made = sorted(p.name for p in copy.iterdir())
    (copy / "stores" / "mine").mkdir()
    (copy / "stores" / "mine" / "notes.txt").write_text("keep")
    result = invoke("train", "--config", config, "--data", data, "--out", copy, "--overwrite")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "stores/mine is not a feature store this pipeline extracted" in said
    assert sorted(p.name for p in copy.iterdir()) == made  # nothing was removed
    shutil.rmtree(copy / "stores" / "mine")
    (copy / "notes.txt").write_text("a user's file beside the run")
    (copy / "task_au" / "mine.txt").write_text("a user's file inside a step's run")
    pipe = Pipeline(load_config(config), data, copy, overwrite=True, log=None)
    pipe._remove_previous(copy / "pipeline.json")
    assert sorted(p.name for p in copy.iterdir()) == ["notes.txt", "task_au"]
    assert sorted(p.name for p in (copy / "task_au").iterdir()) == ["mine.txt"]


def edited_dataset(data: Path, folder: Path, name: str, edit) -> Path:
    """A dataset root in ``folder`` that links to ``data`` except its annotation file ``name``, whose
    lines are ``edit(lines)`` (the header included)."""
    folder.mkdir()
    for entry in data.iterdir():
        if entry.name != name:
            (folder / entry.name).symlink_to(entry)
    lines = (data / name).read_text().splitlines(keepends=True)
    (folder / name).write_text("".join(edit(lines)))
    return folder


def test_combine_on_other_validation_labels_says_so(published, data, config, tmp_path):
    """`--step combine` with another --data said its (non-empty) validation file "holds no data rows"."""
    copy = tmp_path / "run"
    shutil.copytree(published[0], copy)
    val_file = "validation_set_annotations.txt"
    other = edited_dataset(data, tmp_path / "other", val_file, lambda lines: lines[: len(lines) // 2])
    result = invoke("train", "--config", config, "--data", other, "--out", copy, "--step", "combine")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds no data rows" not in said, said
    assert "was validated on" in said and "validation_set_annotations.txt" in said, said
