"""Issue 19 part 1: `mtaffect cv` of a pipeline config runs the whole pipeline inside each fold (it used to
train the base model only, silently), refuses --features (stores trained on other rows leak labels), keeps
finished folds and steps, and `train --fold K` trains on the very split cv uses for its foldK/."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("kornia")

from cli_helpers import invoke, run
from test_pipeline import config, edited_dataset  # noqa: F401  (config: the shrunk published config, a fixture)

import mtaffect.train.pipeline as pipeline_module
from mtaffect.data.annotations import LabelTable, load_split
from mtaffect.data.submission import read_test_list
from mtaffect.models.ensemble import EnsembleAffectModel
from mtaffect.models.loading import load_model
from mtaffect.schema import CROPPED_DIR
from mtaffect.train.cv import fold_split
from mtaffect.train.state import labels_digest

pytestmark = pytest.mark.usefixtures("torch_one_thread")
STEPS = ("task_au", "task_expr", "task_va", "enhanced_au", "enhanced_expr", "enhanced_va")


class Trainings:
    """Counts the trainings pipelines start, by (fold folder, step)."""

    def __init__(self, monkeypatch) -> None:
        self.count: Counter = Counter()
        real = pipeline_module.fit

        def counted(cfg, root, train, val, out, **kw):
            self.count[(Path(out).parent.name, Path(out).name)] += 1
            return real(cfg, root, train, val, out, **kw)

        monkeypatch.setattr(pipeline_module, "fit", counted)


@pytest.fixture(scope="module")
def small(config, tmp_path_factory) -> Path:  # noqa: F811
    """The shrunk published pipeline without its scored-only `all` model: three enhanced models, every
    step one epoch whatever the shipped config sets per step."""
    cfg = yaml.safe_load(config.read_text())
    cfg["pipeline"]["enhanced"].pop("all")
    for step in (cfg["pipeline"].get("task_defaults") or {}, *cfg["pipeline"]["enhanced"].values()):
        if "trainer" in step:
            step["trainer"]["epochs"] = 1
    path = tmp_path_factory.mktemp("cvpipe") / "published.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def folds(data, small, tmp_path_factory):
    """`mtaffect cv --folds 2` of the pipeline once: (out folder, trainings, log)."""
    out = tmp_path_factory.mktemp("cv") / "cv"
    mp = pytest.MonkeyPatch()
    trainings = Trainings(mp)
    log = run("cv", "--config", small, "--data", data, "--out", out, "--folds", "2")
    mp.undo()
    return out, trainings.count, log


def _labels(data: Path) -> LabelTable:
    return LabelTable.concat([load_split(data, "train"), load_split(data, "val")])


@pytest.mark.slow
def test_cv_trains_every_pipeline_step_once_in_each_fold_and_no_base_model(folds):
    assert folds[1] == Counter({(f"fold{i}", s): 1 for i in range(2) for s in STEPS})


@pytest.mark.slow
def test_the_cv_report_records_each_folds_steps_and_its_combined_models_score(folds):
    out = folds[0]
    report = json.loads((out / "cv.json").read_text())
    assert report["pipeline"] is True and report["k"] == 2 and len(report["folds"]) == 2
    for i, fold in enumerate(report["folds"]):
        assert json.loads((out / f"fold{i}" / "pipeline.json").read_text())["steps"]["combine"]["status"]
        assert fold["steps"] == {
            **{s: "trained" for s in STEPS},
            **{f"export_{t}": "exported" for t in ("au", "expr", "va")},
            "combine": "combined",
        }
        scored = json.loads((out / f"fold{i}" / "metrics.json").read_text())["P_tasks"]
        assert fold["P"] == pytest.approx(scored)
        assert isinstance(load_model(out / f"fold{i}" / "best"), EnsembleAffectModel)


@pytest.mark.slow
def test_the_cv_summary_is_over_folds_that_validate_on_every_video_once(folds, data):
    report = json.loads((folds[0] / "cv.json").read_text())
    for term in ("P", "ccc_va", "f1_expr", "f1_au"):
        values = [f[term] for f in report["folds"]]
        assert report["mean"][term] == pytest.approx(np.mean(values))
        assert report["std"][term] == pytest.approx(np.std(values))
    assert sorted(v for f in report["folds"] for v in f["val_videos"]) == _labels(data).videos


@pytest.mark.slow
def test_the_cv_test_predictions_are_the_mean_of_the_folds_combined_models(folds, data):
    from mtaffect.data.predictions import PredictionTable

    out = folds[0]
    images = list(dict.fromkeys(read_test_list(data / "MTL.txt")))
    preds = [load_model(out / f"fold{i}" / "best").predict_images(data / CROPPED_DIR, images) for i in (0, 1)]
    written = PredictionTable.read(out / "test_predictions.parquet").align_to(images)
    for column in ("au_probs", "expr_probs", "valence", "arousal"):
        want = np.mean([getattr(p, column) for p in preds], 0)
        np.testing.assert_allclose(getattr(written, column), want, atol=1e-5, err_msg=column)


@pytest.mark.slow
def test_each_folds_models_trained_on_its_training_videos_only_by_their_run_records(folds, data, small):
    out, _, _ = folds
    from mtaffect.train.config import load_config

    labels = _labels(data)
    for i in range(2):
        train, val = fold_split(labels, 2, i, load_config(small).trainer.seed)
        assert set(train.videos).isdisjoint(val.videos)
        for step in STEPS:
            rec = json.loads((out / f"fold{i}" / step / "run.json").read_text())
            assert rec["train"]["content_sha256"] == labels_digest(train), (i, step)
            assert rec["val"]["content_sha256"] == labels_digest(val), (i, step)
            assert rec["train"]["rows"] == len(train) and f"fold {i} of 2" in rec["train"]["source"]
            for store in (rec["store"].get("stores") or {}).values():  # fused stores: this fold's own
                assert Path(store["path"]).parent == out / f"fold{i}" / "stores", (i, step)
        for t in ("au", "expr", "va"):  # each fold exported its stores with its own task models
            assert (out / f"fold{i}" / "stores" / t / "meta.json").is_file()


@pytest.mark.slow
def test_a_rerun_on_other_annotations_than_the_folds_were_trained_on_is_refused_naming_both(
    folds, data, small, tmp_path
):
    other = edited_dataset(data, tmp_path / "other", "training_set_annotations.txt", lambda x: x[:-1])
    output = run("cv", "--config", small, "--data", other, "--out", folds[0], "--folds", "2", code=2)
    assert "Traceback" not in output and [ln for ln in output.splitlines() if ln.startswith("error: ")]
    said = " ".join(output.split())
    assert "content sha256 differ" in said and "fold 0 of 2" in said, said


@pytest.mark.slow
def test_a_rerun_keeps_every_finished_fold_and_resume_continues_an_interrupted_step(
    folds, data, small, monkeypatch
):
    out = folds[0]  # in place (a copy elsewhere is another task-model path, hence another backbone)
    before = json.loads((out / "cv.json").read_text())
    trainings = Trainings(monkeypatch)
    log = run("cv", "--config", small, "--data", data, "--out", out, "--folds", "2")
    assert not trainings.count and "finished earlier, kept" in log
    again = json.loads((out / "cv.json").read_text())
    assert again["mean"]["P"] == pytest.approx(before["mean"]["P"])
    assert {s for f in again["folds"] for s in f["steps"].values()} <= {"kept", "combined"}
    (out / "fold1" / "enhanced_va" / "metrics.json").unlink()  # an interrupted step
    assert "--resume" in run("cv", "--config", small, "--data", data, "--out", out, "--folds", "2", code=2)
    run("cv", "--config", small, "--data", data, "--out", out, "--folds", "2", "--resume")
    assert (out / "fold1" / "enhanced_va" / "metrics.json").is_file()
    assert sum(trainings.count.values()) == 1 and trainings.count[("fold1", "enhanced_va")] == 1


def test_cv_and_train_refuse_feature_stores_for_a_pipeline_with_one_message(data, small, tmp_path):
    store = tmp_path / "stores" / "au"
    said = []
    for cmd in ("cv", "train"):
        for given in (["--features", f"au={store}"], ["--features", str(store)]):
            result = invoke(cmd, "--config", small, "--data", data, "--out", tmp_path / cmd, *given)
            assert result.exit_code == 2, result.output
            said.append(" ".join(result.output.split()))
    assert all("is a pipeline" in s and "drop --features" in s for s in said), said
    assert not (tmp_path / "cv").exists() and not (tmp_path / "train").exists()  # nothing trained
    from mtaffect.train.config import load_config
    from mtaffect.train.cv import cross_validate

    with pytest.raises(ValueError, match=r"is a pipeline.*drop --features"):
        cross_validate(load_config(small), data, _labels(data), 2, tmp_path / "api", stores={"au": store})


@pytest.mark.slow
def test_train_fold_trains_a_pipeline_on_the_split_cv_uses(folds, data, small, tmp_path):
    out = tmp_path / "fold1"
    run(
        "train",
        "--config",
        small,
        "--data",
        data,
        "--out",
        out,
        "--fold",
        "1",
        "--folds",
        "2",
        "--step",
        "task_au",
    )
    mine = json.loads((out / "task_au" / "run.json").read_text())
    cvs = json.loads((folds[0] / "fold1" / "task_au" / "run.json").read_text())
    for split in ("train", "val"):
        assert mine[split]["content_sha256"] == cvs[split]["content_sha256"]


def test_train_fold_passes_the_cv_split_to_a_single_run(data, tmp_path, monkeypatch):
    """Without a pipeline, `train --fold K` hands fit fold K's rows: the videos of cv's fold K."""
    import mtaffect.train.fit as fit_module
    from mtaffect.train.config import load_config
    from mtaffect.train.cv import video_folds

    cfg = tmp_path / "single.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"recipe": "emotinet"}, "trainer": {"seed": 3}}))
    got = {}

    def fake_fit(cfg, store, train, val, out, **kw):
        got.update(train=train, val=val)
        return SimpleNamespace(rank=1)  # not rank 0: the command reports nothing

    monkeypatch.setattr(fit_module, "fit", fake_fit)
    store = tmp_path / "store"
    for k in (0, 1):
        run(
            "train",
            "--config",
            cfg,
            "--data",
            data,
            "--features",
            store,
            "--out",
            tmp_path / "o",
            "--fold",
            str(k),
            "--folds",
            "2",
            "--split-seed",
            "5",
        )
        labels = _labels(data)
        val_rows = video_folds(labels, 2, 5)[k]
        assert got["val"].videos == labels.subset(val_rows).videos
        assert set(got["train"].videos) == set(labels.videos) - set(got["val"].videos)
        assert len(got["train"]) + len(got["val"]) == len(labels)
    run(
        "train",
        "--config",
        cfg,
        "--data",
        data,
        "--features",
        store,
        "--out",
        tmp_path / "o",
        "--fold",
        "0",
        "--folds",
        "2",
    )
    labels = _labels(data)
    assert got["val"].videos == labels.subset(video_folds(labels, 2, 3)[0]).videos  # split seed: trainer.seed
    assert load_config(cfg).trainer.seed == 3
    bad = {
        ("--fold", "2", "--folds", "2"): "fold 2 does not exist",
        ("--folds", "3"): "give --fold too",
        ("--fold", "0", "--trainval"): "drop --trainval",
    }
    for args, message in bad.items():
        said = " ".join(
            run(
                "train",
                "--config",
                cfg,
                "--data",
                data,
                "--features",
                store,
                "--out",
                tmp_path / "o",
                *args,
                code=2,
            ).split()
        )
        assert message in said, said
