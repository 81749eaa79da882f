"""Recipe 3 as published, end to end through the CLI on a synthetic set with a tiny random-init ViT:
task models -> export -> per-task enhanced models -> combined model -> infer / evaluate / submit, a
search over enhanced-model variants that trains the task models once, and steps that resume."""

from __future__ import annotations

import json
import re
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
from mtaffect.models.ensemble import EnsembleAffectModel  # noqa: E402
from mtaffect.models.loading import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]  # every test trains


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


STEPS = ("task_au", "task_expr", "task_va", "enhanced_au", "enhanced_expr", "enhanced_va", "enhanced_all")


def _said(output: str) -> str:
    """The output with rich's line wrapping undone (long paths wrap at 80 columns)."""
    return " ".join(output.split())


@pytest.fixture(scope="module")
def val_names(data) -> list[str]:
    return list(dict.fromkeys(map(str, load_split(data, "val").images)))


@pytest.fixture(scope="module")
def val_inferred(published, data, tmp_path_factory) -> Path:
    """`mtaffect infer` of the combined model on the validation images, once: the table's path."""
    pred = tmp_path_factory.mktemp("val_infer") / "val.parquet"
    run(
        "infer",
        "--model",
        published[0] / "best",
        "--images",
        data / "validation_set_annotations.txt",
        "--data",
        data,
        "--out",
        pred,
        "--workers",
        "0",
    )
    return pred


def test_the_pipeline_trains_each_of_its_seven_models_once(published):
    _, trained, log = published
    assert trained == Counter({s: 1 for s in STEPS})
    assert "Traceback" not in log


@pytest.mark.parametrize("task", ["au", "expr", "va"])
def test_a_task_model_trains_its_task_only_and_exports_every_image_with_its_finetuned_backbone(
    published, data, task
):
    out = published[0]
    m = json.loads((out / f"task_{task}" / "metrics.json").read_text())
    assert m["tasks"] == [task] and m["not_trained"] == [x for x in ("au", "expr", "va") if x != task]
    assert (out / f"task_{task}" / "best" / "backbone" / "model.safetensors").is_file()
    store = FeatureStore.open(out / "stores" / task)
    assert sorted(store.images) == sorted(collect_images(data))  # every image, each once


def test_the_enhanced_expr_model_reads_the_fused_stores_over_padded_windows_with_its_own_loss(published):
    out = published[0]
    expr = load_model(out / "enhanced_expr" / "best")  # 4-frame windows (the peer pads), fused stores
    assert expr.window == 4 and expr.window_edge == "pad" and expr.temporal
    assert expr.store_inputs == ("features@au", "features@expr", "features@va")
    cfg = json.loads((out / "enhanced_expr" / "best" / "config.json").read_text())["train_config"]
    assert cfg["loss"]["weights"].get("expr", 1.0) == 1.0 and cfg["loss"]["va_weights"]["arousal"] == 0.0
    assert cfg["trainer"]["select"] == ["au", "expr", "valence"] and not cfg["loss"]["expr_class_weights"]
    assert json.loads((out / "enhanced_va" / "metrics.json").read_text())["tasks"] == ["va"]


def test_the_combined_model_answers_each_task_from_its_own_model(published, val_names):
    out = published[0]
    model = load_model(out / "best")
    assert isinstance(model, EnsembleAffectModel) and model.tasks == {"au": "au", "expr": "expr", "va": "va"}
    saved = PredictionTable.read(out / "val_predictions.parquet").align_to(val_names)
    for task, columns in {"au": ["au_probs"], "expr": ["expr_probs"], "va": ["valence", "arousal"]}.items():
        member = PredictionTable.read(out / f"enhanced_{task}" / "val_predictions.parquet")
        member = member.align_to(val_names)
        for column in columns:
            np.testing.assert_allclose(getattr(saved, column), getattr(member, column), atol=1e-6)


def test_infer_from_the_images_reproduces_the_pipelines_validation_predictions(
    published, val_inferred, val_names
):
    table = PredictionTable.read(val_inferred)
    assert sorted(map(str, table.images)) == sorted(val_names)  # every annotated row predicted exactly once
    saved = PredictionTable.read(published[0] / "val_predictions.parquet").align_to(val_names)
    got = table.align_to(val_names)
    for column in ("expr_probs", "au_probs", "valence", "arousal"):
        np.testing.assert_allclose(getattr(got, column), getattr(saved, column), atol=2e-3, err_msg=column)


def test_the_pipelines_P_and_evaluates_P_are_the_metric_of_the_predictions(published, data, val_inferred):
    out = published[0]
    val = load_split(data, "val")
    metrics = json.loads((out / "metrics.json").read_text())
    saved = PredictionTable.read(out / "val_predictions.parquet")
    assert metrics["P_tasks"] == pytest.approx(score(val, saved).P, abs=1e-9)
    shown = run("evaluate", "--gt", data / "validation_set_annotations.txt", "--pred", val_inferred)
    expected = score(val, PredictionTable.read(val_inferred)).P
    assert re.search(rf"^P = {expected:.4f} +\({len(val)} rows;", shown, re.MULTILINE), shown


def test_the_combined_model_blends_with_another_run_through_a_tuned_post_config(
    published, data, val_inferred, tmp_path
):
    from mtaffect.post.config import PostConfig

    gt = data / "validation_set_annotations.txt"
    other = published[0] / "enhanced_all" / "val_predictions.parquet"
    post = tmp_path / "post.yaml"
    run(
        "tune",
        "--gt",
        gt,
        "--pred",
        val_inferred,
        other,
        "--out",
        post,
        "--widths",
        "2",
        "--kinds",
        "box",
        "--no-nested",
    )
    shown = run("evaluate", "--gt", gt, "--pred", val_inferred, "--pred", other, "--post", post)
    config = PostConfig.load(post)
    tables = [PredictionTable.read(val_inferred), PredictionTable.read(other)]
    expected = score(load_split(data, "val"), config.apply(tables), au_thresholds=config.au_thresholds).P
    assert re.search(rf"^P = {expected:.4f} ", shown, re.MULTILINE), shown


def test_the_combined_models_test_predictions_make_a_valid_submission(published, data, tmp_path):
    from mtaffect.data.submission import read_test_list, validate_submission

    test_list = data / "MTL.txt"
    test_pred = tmp_path / "test.parquet"
    run(
        "infer",
        "--model",
        published[0] / "best",
        "--images",
        test_list,
        "--data",
        data,
        "--out",
        test_pred,
        "--workers",
        "0",
    )
    sub = tmp_path / "sub.txt"
    shown = _said(run("submit", "--pred", test_pred, "--test-list", test_list, "--out", sub))
    names = read_test_list(test_list)
    assert shown == f"wrote {sub} ({len(names)} lines, validated against {test_list})", shown
    assert validate_submission(sub, names) == []


def test_the_export_step_is_extract_of_the_task_runs_backbone(published, data, tmp_path):
    out = published[0]
    again = tmp_path / "au_store"
    run(
        "extract",
        "--data",
        data,
        "--out",
        again,
        "--backbone",
        f"run:{out / 'task_au'}",
        "--workers",
        "0",
        "--split",
        "train,val",
    )
    a, b = FeatureStore.open(again), FeatureStore.open(out / "stores" / "au")
    assert set(a.images) <= set(b.images) and len(a) > 0
    rows = b.rows(list(a.images))
    np.testing.assert_allclose(a.features(a.rows(list(a.images))), b.features(rows), atol=1e-3)


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
    cfg["search"]["grid"] = [
        {"fusion_tasks": ["au", "expr", "va"]},
        {"fusion_tasks": ["au", "va"]},
        {"fusion_tasks": ["expr"], "temporal": "tcn"},
    ]
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
