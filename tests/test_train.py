"""Training loop: data joining and windows, stages, schedule, run folder, CLI, DDP (2 CPU processes)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from store_helpers import set_meta, write_store_by_hand
from torch import nn

from mtaffect.data.annotations import LabelTable
from mtaffect.features.store import FeatureStore
from mtaffect.metrics import score
from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.registry import register_model
from mtaffect.schema import AU_NAMES

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


# ---- tiny recipes (registered once per process) --------------------------------------------------------
class TinyModel(MTLModel):
    """One shared layer and three heads."""

    recipe = "tiny-test"
    inputs = ("features",)
    #: Test switches (set by callbacks): ``poison`` makes validation outputs NaN; ``cheat`` predicts the
    #: expression labels perfectly and every AU absent, so P is high while the AU F1 is 0.
    poison = False
    cheat = False

    def __init__(self, feature_dim: int, num_logits: int = 0, token_shape=None, hidden: int = 16) -> None:
        super().__init__()
        self.feature_dim, self.hidden = feature_dim, hidden
        self.trunk = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(0.1))
        self.au = nn.Linear(hidden, 12)
        self.expr = nn.Linear(hidden, 8)
        self.va = nn.Sequential(nn.Linear(hidden, 2), nn.Tanh())

    def config(self) -> dict:
        return {"feature_dim": self.feature_dim, "hidden": self.hidden}

    def forward(self, batch):
        h = self.trunk(batch["features"])
        return self.switches(batch, {"au": self.au(h), "expr": self.expr(h), "va": self.va(h)})

    def switches(self, batch, out):
        if self.poison and not self.training:
            out = {k: v * float("nan") for k, v in out.items()}
        if self.cheat and not self.training:
            out["expr"] = torch.nn.functional.one_hot(batch["expr"], 8).float() * 20
            out["au"] = torch.full_like(out["au"], -20.0)
        return out


class TinyTemporal(TinyModel):
    """Per-step layer plus the window mean: each step sees its window."""

    recipe = "tiny-temporal"
    temporal = True

    def forward(self, batch):
        x = batch["features"]
        h = self.trunk(x)
        if x.ndim == 3:
            h = h + h.mean(1, keepdim=True)
        return {"au": self.au(h), "expr": self.expr(h), "va": self.va(h)}


class TinyTwoStage(TinyModel):
    """AU branch first, then EXPR/VA heads with the trunk frozen."""

    recipe = "tiny-two-stage"

    def stages(self) -> list[Stage]:
        return [Stage("au", ("au",), ("trunk", "au")), Stage("rest", ("expr", "va"), ("expr", "va"))]


class TinyPerTask(TinyModel):
    """One stage per task, each training its own head (the emotinet layout)."""

    recipe = "tiny-per-task"

    def stages(self) -> list[Stage]:
        return [Stage(t, (t,), ("trunk", t) if t == "expr" else (t,)) for t in ("expr", "au", "va")]


def _register() -> None:
    for cls in (TinyModel, TinyTemporal, TinyTwoStage, TinyPerTask):
        with contextlib.suppress(ValueError):  # already registered in this process
            register_model(cls.recipe)(cls)


_register()


# ---- tiny data -------------------------------------------------------------------------------------------
def make_store(
    path: Path, names: list[str], dim: int = 12, logits: int = 0, seed: int = 0, invalid: tuple[int, ...] = ()
) -> np.ndarray:
    """A finished store written as documented; rows in ``invalid`` failed extraction. Returns the features."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(len(names), dim)).astype(np.float16)
    valid = np.ones(len(names), dtype=bool)
    valid[list(invalid)] = False
    feats[~valid] = 0
    lg = rng.normal(size=(len(names), logits)).astype(np.float16) if logits else None
    write_store_by_hand(path, names, feats, logits=lg, valid=valid)
    return feats.astype(np.float32)


def make_labels(names: list[str], feats: np.ndarray, seed: int = 0, missing: float = 0.1) -> LabelTable:
    """Labels that depend on the features (so a model can learn them), with some missing."""
    rng = np.random.default_rng(seed)
    n, d = feats.shape
    w = np.random.default_rng(99).normal(size=(d, 22))
    z = feats @ w
    va = np.tanh(z[:, :2] / 3)
    expr = z[:, 2:10].argmax(1)
    aus = (z[:, 10:22] > 0).astype(int)
    va[rng.random(n) < missing] = -5
    expr[rng.random(n) < missing] = -1
    aus[rng.random(n) < missing] = -1
    df = pd.DataFrame({"image": names, "valence": va[:, 0], "arousal": va[:, 1], "expression": expr})
    for j, au in enumerate(AU_NAMES):
        df[au] = aus[:, j]
    return LabelTable.from_frame(df)


def video_names(videos: int, frames: int, prefix: str = "v") -> list[str]:
    return [f"{prefix}{v}/{f:05d}.jpg" for v in range(videos) for f in range(1, frames + 1)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train_names = video_names(6, 40)
    val_names = video_names(3, 30, prefix="w")
    names = train_names + val_names
    feats = make_store(root / "store", names, invalid=(5, 250))
    labels = make_labels(names, feats)
    train = labels.subset(np.arange(len(train_names)))
    val = labels.subset(np.arange(len(train_names), len(names)))
    return root / "store", train, val


def cfg(recipe: str = "tiny-test", **sections):
    from mtaffect.train.config import config_from_dict

    raw = {
        "model": {"recipe": recipe},
        "trainer": {"epochs": 3, "progress": False, "patience": 0},
        "data": {"batch_size": 32, "window": 8, "stride": 4},
        "optim": {"lr": 0.01},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return config_from_dict(raw)


# ---- data ----------------------------------------------------------------------------------------------
def test_join_excludes_failed_images_and_names_missing_ones(dataset, tmp_path):
    from mtaffect.features.store import StoreError
    from mtaffect.train.data import join_labels

    store_path, train, _ = dataset
    store = FeatureStore.open(store_path)
    arrays, report = join_labels(store, train)
    assert report.excluded_invalid == 1 and report.used == len(arrays) == report.labelled - 1
    assert "v0/00006.jpg" not in set(arrays.images)  # row 5 failed extraction
    np.testing.assert_array_equal(arrays.rows, store.rows(arrays.images))
    assert (
        arrays.va_mask == (np.stack([train.valence, train.arousal], 1)[arrays.rows - 0] != -5)[: len(arrays)]
    ).any()
    other = make_labels(["zz/00001.jpg"], np.zeros((1, 12), np.float32), missing=0)
    with pytest.raises(StoreError, match=r"not in the feature store .*zz/00001.jpg"):
        join_labels(store, other)


def test_rank_shares_are_fixed_disjoint_and_padded_to_equal_steps():
    from mtaffect.train.data import ShardedBatches, rank_shares

    owner = rank_shares(11, world=2, seed=1, block=2)
    shares = [np.flatnonzero(owner == r) for r in range(2)]
    assert set(shares[0]).isdisjoint(shares[1]) and sorted(np.concatenate(shares)) == list(range(11))
    assert np.array_equal(owner, rank_shares(11, world=2, seed=1, block=2))  # fixed for the run
    length = max(len(x) for x in shares)
    samplers = [ShardedBatches(x, 4, shuffle=True, seed=3, length=length) for x in shares]
    for r, sampler in enumerate(samplers):
        epoch0 = np.concatenate(list(sampler))
        sampler.set_epoch(1)
        epoch1 = np.concatenate(list(sampler))
        assert len(epoch0) == length and set(epoch0) == set(epoch1) == set(shares[r])  # only its share
        assert len(sampler) == -(-length // 4)  # every rank runs the same number of steps
    resumed = ShardedBatches(shares[0], 4, shuffle=True, seed=3, length=length, epoch_offset=1)
    assert np.array_equal(np.concatenate(list(resumed)), np.concatenate(list(samplers[0])))  # epoch 1 again


# ---- schedule, stages ----------------------------------------------------------------------------------
def test_warmup_trains_from_the_first_step():
    from mtaffect.train.module import lr_lambda

    f = lr_lambda(warmup_steps=10, total_steps=100, min_ratio=0.01)
    assert f(0) > 0  # a peer's warm-up gave lr 0 for the whole first epoch
    assert f(9) < f(10) == pytest.approx(1.0) and f(99) < 0.05 and f(55) < f(20)


@pytest.mark.slow
def test_first_epoch_changes_the_weights(dataset):
    import lightning as L

    from mtaffect.train.fit import fit

    class Snap(L.Callback):
        def on_train_start(self, trainer, module):
            self.before = module.model.au.weight.detach().clone()

        def on_train_epoch_end(self, trainer, module):
            self.after = module.model.au.weight.detach().clone()
            self.lrs = trainer.optimizers[0].param_groups[0]["lr"]

    snap = Snap()
    fit(
        cfg(trainer={"epochs": 1}, optim={"warmup_epochs": 1.0}),
        dataset[0],
        dataset[1],
        dataset[2],
        callbacks=[snap],
        log=None,
    )
    assert not torch.equal(snap.before, snap.after) and snap.lrs > 0


@pytest.mark.slow
def test_stages_freeze_and_keep_frozen_modules_in_eval(dataset):
    import lightning as L

    from mtaffect.train.fit import fit

    class Watch(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_start(self, trainer, module):
            self.seen.append((module.stage.name, module.model.trunk[0].weight.detach().clone()))

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if module.stage.name == "rest":
                assert not module.model.trunk.training and module.model.expr.training

        def on_train_end(self, trainer, module):
            self.seen.append((module.stage.name, module.model.trunk[0].weight.detach().clone()))

    w = Watch()
    res = fit(cfg("tiny-two-stage"), dataset[0], dataset[1], dataset[2], callbacks=[w], log=None)
    (s1, a), (_, b), (s2, c), (_, d) = w.seen
    assert (s1, s2) == ("au", "rest") and not torch.equal(a, b) and torch.equal(c, d)
    assert {h["stage"] for h in res.history} == {"au", "rest"}


def _without(table: LabelTable, *tasks: str) -> LabelTable:
    frame = table.frame.copy()
    if "expr" in tasks:
        frame["expression"] = -1
    if "va" in tasks:
        frame[["valence", "arousal"]] = -5.0
    if "au" in tasks:
        frame[list(AU_NAMES)] = -1
    return LabelTable(frame)


def test_training_rows_without_any_label_are_a_clear_error(dataset):
    from mtaffect.train.fit import fit

    store, train, val = dataset
    with pytest.raises(ValueError, match=r"the training rows hold no label of any task"):
        fit(cfg("tiny-two-stage"), store, _without(train, "au", "expr", "va"), val, log=None)


@pytest.mark.slow
def test_a_task_absent_from_the_data_is_skipped_and_p_counts_the_present_tasks(dataset, tmp_path):
    """Item 6: CK+-like data (AU + expression, no valence/arousal) trains; the VA stage is skipped."""
    from mtaffect.train.fit import fit

    store, train, val = dataset
    logs: list[str] = []
    res = fit(
        cfg("tiny-per-task", trainer={"epochs": 2}),
        store,
        _without(train, "va"),
        _without(val, "va"),
        tmp_path / "run",
        log=logs.append,
    )
    assert any("stage va skipped" in m and "no va label" in m for m in logs), logs
    assert {h["stage"] for h in res.history} == {"expr", "au"}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == ["au", "expr"] and metrics["absent_tasks"] == ["va"]
    terms = metrics["best"]
    assert res.P == pytest.approx(terms["expr"]["f1"] + terms["au"]["f1"]) == metrics["P_tasks"]
    assert "va absent" in res.summary() and "P[au+expr]" in res.summary()
    # one row of P and its terms for result tables: the run's, a pipeline step's (from metrics.json), none
    from mtaffect.metrics import terms_row
    from mtaffect.train.pipeline import _scores

    row = {
        "P": metrics["P_tasks"],
        "ccc_va": terms["va"]["mean"],
        "f1_expr": terms["expr"]["f1"],
        "f1_au": terms["au"]["f1"],
    }
    assert res.terms() == row and {k: _scores(tmp_path / "run")[k] for k in row} == row
    assert all(np.isnan(v) for v in terms_row({}, ("au",)).values())


@pytest.mark.slow
def test_a_nonfinite_validation_epoch_is_logged_never_selected_and_the_run_ends_cleanly(dataset, tmp_path):
    """Item 1: NaN predictions after the first epoch: logged, not selected, early stopping ends the run."""
    import lightning as L

    from mtaffect.models.loading import load_model
    from mtaffect.train.fit import fit

    store, train, val = dataset
    out = tmp_path / "run"

    class Poison(L.Callback):
        best_on_disk = False

        def on_validation_epoch_start(self, trainer, module):
            module.model.poison = trainer.current_epoch >= 1

        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:  # epoch 0 improved: its weights are already on disk
                self.best_on_disk = (out / "best" / "model.safetensors").is_file()

    poison = Poison()
    logs: list[str] = []
    res = fit(
        cfg(trainer={"epochs": 6, "patience": 2}), store, train, val, out, callbacks=[poison], log=logs.append
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["finite"] for h in metrics["history"]] == [True, False, False]  # patience 2 stopped it
    assert metrics["history"][1]["nonfinite_rows"] == len(val) - 1 and metrics["history"][1]["P"] is None
    assert metrics["best_epoch"] == res.best_epoch == 0 and np.isfinite(res.P)
    assert poison.best_on_disk and (out / "val_predictions.parquet").is_file()
    assert any("non-finite" in m and "not selected" in m for m in logs), logs
    model = load_model(out / "best")
    assert all(torch.isfinite(p).all() for p in model.model.parameters())


@pytest.mark.slow
def test_a_first_stage_without_a_finite_epoch_leaves_the_weights_as_built(dataset, tmp_path):
    """No validation epoch of the first stage is finite: its modules keep the weights the run built (the
    seeded model), the next stage trains on, and the run's model is the next stage's."""
    import lightning as L

    from mtaffect.models.registry import create_model
    from mtaffect.train.fit import fit

    store, train, val = dataset

    class PoisonFirst(L.Callback):
        def on_validation_epoch_start(self, trainer, module):
            module.model.poison = module.stage.name == "au"

    c = cfg("tiny-two-stage", trainer={"epochs": 2})
    logs: list[str] = []
    res = fit(c, store, train, val, tmp_path / "run", callbacks=[PoisonFirst()], log=logs.append)
    assert res.stages[0]["best_epoch"] == -1 and res.stages[0]["note"].startswith("no finite validation")
    assert any("weights left as before the stage" in m for m in logs), logs
    L.seed_everything(c.trainer.seed, workers=True, verbose=False)
    built = create_model("tiny-two-stage", feature_dim=12, num_logits=0, token_shape=None).state_dict()
    state = res.model.state_dict()
    assert all(torch.equal(state[k], built[k]) for k in built if k.startswith(("trunk.", "au.")))
    assert not all(torch.equal(state[k], built[k]) for k in built if k.startswith("expr."))  # rest trained
    assert res.stages[1]["best_epoch"] >= 0 and np.isfinite(res.P)


@pytest.mark.slow
def test_weights_that_become_nonfinite_end_the_stage_at_once(dataset, tmp_path):
    import lightning as L

    from mtaffect.train.fit import TrainingDivergedError, fit

    store, train, val = dataset

    class Blowup(L.Callback):  # what a far too high learning rate does, deterministically
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    module.model.trunk[0].weight.fill_(float("inf"))

    res = fit(cfg(trainer={"epochs": 5}), store, train, val, tmp_path / "run", callbacks=[Blowup()], log=None)
    assert [h["finite"] for h in res.history] == [True, False] and res.stages[0]["diverged"]
    assert res.best_epoch == 0 and all(torch.isfinite(p).all() for p in res.model.parameters())
    with pytest.raises(TrainingDivergedError, match="weights became NaN/inf"):  # no validation: no fallback
        fit(cfg(trainer={"epochs": 5}), store, train, None, tmp_path / "tv", callbacks=[Blowup()], log=None)
    assert json.loads((tmp_path / "tv" / "metrics.json").read_text())["diverged"]
    assert not (tmp_path / "tv" / "best").exists()


@pytest.mark.slow
def test_a_single_task_stage_selects_on_its_own_task(dataset, tmp_path):
    """Item 4: the AU stage picks its epoch on F1_AU, not on a P moved by the other (untrained) heads."""
    import lightning as L
    from safetensors.torch import load_file

    from mtaffect.train.fit import fit

    store, train, val = dataset

    class Cheat(L.Callback):  # epoch 0 of stage "au": perfect expressions, no AU -> high P, F1_AU 0
        def __init__(self):
            self.au = {}

        def on_validation_epoch_start(self, trainer, module):
            module.model.cheat = module.stage.name == "au" and trainer.current_epoch == 0

        def on_validation_epoch_end(self, trainer, module):
            if module.stage.name == "au":
                self.au[trainer.current_epoch] = module.model.au.weight.detach().clone()
            module.model.cheat = False

    cheat = Cheat()
    res = fit(
        cfg("tiny-two-stage", trainer={"epochs": 4}),
        store,
        train,
        val,
        tmp_path / "run",
        callbacks=[cheat],
        log=None,
    )
    au_hist = [h for h in res.history if h["stage"] == "au"]
    assert au_hist[0]["P"] == max(h["P"] for h in au_hist) and au_hist[0]["f1_au"] == 0
    best = max(au_hist, key=lambda h: h["f1_au"])["epoch"]
    assert best != 0
    saved = load_file(str(tmp_path / "run" / "stages" / "0-au" / "model.safetensors"))
    assert torch.equal(saved["au.weight"], cheat.au[best])


@pytest.mark.slow
def test_per_stage_epochs_lr_and_batch_size(dataset, tmp_path):
    import lightning as L

    from mtaffect.train.config import ConfigError
    from mtaffect.train.fit import fit

    store, train, val = dataset

    class Seen(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lr = trainer.optimizers[0].param_groups[0]["initial_lr"]
            self.seen.setdefault(module.stage.name, set()).add((lr, int(batch["index"].shape[0])))

    seen = Seen()
    stages = {"au": {"epochs": 1, "lr": 0.05, "batch_size": 100}, "rest": {"batch_size": 64}}
    res = fit(
        cfg("tiny-two-stage", trainer={"epochs": 2}, stages=stages),
        store,
        train,
        val,
        tmp_path / "run",
        callbacks=[seen],
        log=None,
    )
    assert [h["stage"] for h in res.history] == ["au", "rest", "rest"]
    assert {lr for lr, _ in seen.seen["au"]} == {0.05} and max(b for _, b in seen.seen["au"]) == 100
    assert {lr for lr, _ in seen.seen["rest"]} == {0.01} and max(b for _, b in seen.seen["rest"]) == 64
    assert [(s["name"], s["epochs"], s["lr"], s["batch_size"]) for s in res.stages] == [
        ("au", 1, 0.05, 100),
        ("rest", 2, 0.01, 64),
    ]
    with pytest.raises(ConfigError, match=r"stages \['va'\] are not stages of recipe 'tiny-two-stage'"):
        fit(cfg("tiny-two-stage", stages={"va": {"epochs": 1}}), store, train, val, log=None)


# ---- a run end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_writes_the_run_and_its_metric_matches_the_predictions(dataset, tmp_path):
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.io import OutputExistsError
    from mtaffect.models.loading import load_model
    from mtaffect.train.fit import fit

    store, train, val = dataset
    out = tmp_path / "run"
    c = cfg("tiny-two-stage", trainer={"epochs": 4})
    res = fit(c, store, train, val, out, log=None)
    for name in (
        "best/model.safetensors",
        "best/config.json",
        "metrics.json",
        "val_predictions.parquet",
        "config.yaml",
        "stages/0-au/model.safetensors",
    ):
        assert (out / name).exists(), name
    preds = PredictionTable.read(out / "val_predictions.parquet")
    assert len(preds) == len(val) - 1 and preds.frame["image"].is_unique  # the failed image is excluded
    kept = val.subset(np.isin(val.images, preds.images))
    assert pytest.approx(res.P, abs=1e-9) == score(kept, preds).P
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["P"] == pytest.approx(res.P) and metrics["rows"]["train"]["excluded_invalid"] == 1
    model = load_model(out / "best")
    again = model.predict_store(store, kept.images)
    np.testing.assert_allclose(again.expr_probs, preds.align_to(kept.images).expr_probs, atol=1e-6)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fit(cfg("tiny-two-stage"), store, train, val, out, log=None)
    with pytest.raises(ValueError, match="another config"):
        fit(cfg("tiny-two-stage"), store, train, val, out, resume=True, log=None)
    logs = []
    again = fit(c, store, train, val, out, resume=True, log=logs.append)
    assert "stage au: finished in an earlier session" in logs  # finished stages are not trained again
    assert "stage rest: finished in an earlier session" in logs and again.P == res.P
    # a config.yaml written by an older mtaffect listed only what differed from the defaults: same run
    (out / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"recipe": "tiny-two-stage"},
                "trainer": {"epochs": 4, "progress": False, "patience": 0},
                "data": {"batch_size": 32, "window": 8, "stride": 4},
                "optim": {"lr": 0.01},
            }
        )
    )
    assert fit(c, store, train, val, out, resume=True, log=None).P == res.P
    (out / "config.yaml").write_text(
        yaml.safe_dump({"model": {"recipe": "tiny-two-stage"}, "backbone": {"kwargs": {}}})
    )  # a key this version renamed: refused, saying what to do
    with pytest.raises(ValueError, match=r"renamed.*start over with --overwrite"):
        fit(c, store, train, val, out, resume=True, log=None)


@pytest.mark.slow
def test_temporal_model_predicts_each_frame_once(dataset, tmp_path):
    from mtaffect.train.fit import fit

    store, train, val = dataset
    res = fit(cfg("tiny-temporal"), store, train, val, log=None)
    preds = res.val_predictions
    assert len(preds) == len(val) - 1 and preds.frame["image"].is_unique
    kept = val.subset(np.isin(val.images, preds.images))
    assert pytest.approx(res.P, abs=1e-9) == score(kept, preds).P


# ---- config + CLI --------------------------------------------------------------------------------------
def test_config_overrides_and_unknown_keys(tmp_path):
    from mtaffect.train.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {recipe: tiny-test}\ntrainer: {epochs: 3}\n")
    c = load_config(
        path, ["trainer.epochs=7", "model.hparams.hidden=8", "loss.weights.au=0.5", "optim.lr=1e-2"]
    )
    assert c.trainer.epochs == 7 and c.model.hparams == {"hidden": 8} and c.loss.weights["au"] == 0.5
    assert c.optim.lr == 0.01 and c.loss.weights["va"] == 1.0
    with pytest.raises(
        ConfigError, match=r"unknown key 'epoch' in section 'trainer'; valid keys: .*'epochs'"
    ):
        load_config(path, ["trainer.epoch=3"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path, ["trainr.epochs=3"])
    path.write_text("model: {recipe: tiny-test}\ntrainer: {epochs: many}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: trainer.epochs must be an integer"):
        load_config(path)


@pytest.mark.slow
def test_cli_train_then_infer(dataset, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mtaffect.data.annotations import write_annotations
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.train.cli import register

    store, train, val = dataset
    root = tmp_path / "root"
    write_annotations(train, root / "training_set_annotations.txt")
    write_annotations(val, root / "validation_set_annotations.txt")
    conf = tmp_path / "tiny.yaml"
    conf.write_text("model: {recipe: tiny-test}\ntrainer: {epochs: 2, patience: 0}\ndata: {batch_size: 64}\n")
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    args = [
        "train",
        "--config",
        str(conf),
        "--features",
        str(store),
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--override",
        "trainer.epochs=1",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "P = " in r.output and "CCC_VA" in r.output and "F1_EXPR" in r.output and "F1_AU" in r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, [*args, "--override", "trainer.epoch=2"])
    assert r.exit_code == 2 and "unknown key 'epoch'" in r.output
    test_list = tmp_path / "test.txt"
    test_list.write_text("\n".join(val.images[:10]) + "\n")
    r = runner.invoke(
        app,
        [
            "infer",
            "--model",
            str(tmp_path / "run" / "best"),
            "--features",
            str(store),
            "--images",
            str(test_list),
            "--out",
            str(tmp_path / "pred.parquet"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert PredictionTable.read(tmp_path / "pred.parquet").images.tolist() == list(val.images[:10])
    # Item 5: an image whose extraction failed is an error naming it, or a row with valid = 0 when allowed
    test_list.write_text("\n".join(val.images[:12]) + "\n")  # val.images[10] failed extraction
    infer = [
        "infer",
        "--model",
        str(tmp_path / "run" / "best"),
        "--features",
        str(store),
        "--images",
        str(test_list),
        "--out",
        str(tmp_path / "pred2.parquet"),
    ]
    r = runner.invoke(app, infer)
    assert r.exit_code == 2 and not (tmp_path / "pred2.parquet").exists()
    assert "1 of 12 images failed extraction" in r.output and val.images[10] in r.output, r.output
    assert "--allow-missing" in r.output
    r = runner.invoke(app, [*infer, "--allow-missing"])
    assert r.exit_code == 0, r.output
    table = PredictionTable.read(tmp_path / "pred2.parquet")
    assert table.frame["valid"].tolist() == [1] * 10 + [0, 1] and "1 image(s) failed extraction" in r.output
    # --trainval: train + val for the configured epochs, no validation, no selection
    tv = tmp_path / "trainval"
    r = runner.invoke(
        app, [*args[:7], "--out", str(tv), "--no-progress", "--trainval", "-o", "trainer.epochs=2"]
    )
    assert r.exit_code == 0, r.output
    assert (
        "trained on train + val without selection" in r.output
        and not (tv / "val_predictions.parquet").exists()
    )
    metrics = json.loads((tv / "metrics.json").read_text())
    assert metrics["trainval"] and metrics["rows"]["train"]["used"] == len(train) + len(val) - 2
    assert [h["epoch"] for h in metrics["history"]] == [0, 1] and "P" not in metrics["history"][0]
    assert (tv / "best" / "model.safetensors").is_file()


# ---- DDP: 2 CPU processes (gloo) -----------------------------------------------------------------------
DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import test_train as T
from ddp_helpers import Rows
from mtaffect.data.annotations import LabelTable
import pandas as pd
from mtaffect.train.fit import fit

train = LabelTable(pd.read_parquet({train!r}))
val = LabelTable(pd.read_parquet({val!r}))
c = T.cfg(trainer={{"epochs": 1, "devices": 2, "strategy": "ddp", "accelerator": "cpu"}})
res = fit(c, {store!r}, train, val, os.path.join({out!r}, "run"), callbacks=[Rows({out!r})], log=print)
if res.checkpoint is not None:
    json.dump({{"P": res.P}}, open(os.path.join({out!r}, "result.json"), "w"))
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(dataset, tmp_path):
    from ddp_helpers import run_two_ranks

    from mtaffect.data.predictions import PredictionTable

    store, train, val = dataset
    train.frame.to_parquet(tmp_path / "train.parquet")
    val.frame.to_parquet(tmp_path / "val.parquet")
    script = tmp_path / "ddp.py"
    paths = {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet")}
    script.write_text(
        DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path), store=str(store), **paths)
    )
    info, stdout = run_two_ranks(script, tmp_path, timeout=120)
    r0, r1 = (set(i["rows"]) for i in info)
    assert r0 and r1 and not r0 & r1  # each rank trains on its own fixed share
    assert len(r0 | r1) == len(train) - 1  # together they cover every valid training row
    # each rank holds only its share in memory: its training rows and its half of the validation rows
    assert info[0]["held"] + info[1]["held"] == len(train) - 1 + len(val) - 1
    assert max(i["held"] for i in info) < len(train) - 1
    from mtaffect.train.data import cpus_per_process

    assert [i["threads"] for i in info] == [cpus_per_process(2)] * 2  # torch threads divided per rank
    assert stdout.count("rows: train") == 1  # only rank 0 reports
    p = json.loads((tmp_path / "result.json").read_text())["P"]
    preds = PredictionTable.read(tmp_path / "run" / "val_predictions.parquet")
    kept = val.subset(np.isin(val.images, preds.images))
    assert len(preds) == len(val) - 1  # gathered from both ranks, each row once
    assert pytest.approx(p, abs=1e-9) == score(kept, preds).P  # merged metric == single-process metric


def test_search_ranks_the_grid_by_validation_p(dataset, tmp_path):
    from mtaffect.train.config import ConfigError
    from mtaffect.train.search import search, search_table

    store, train, val = dataset
    c = cfg(trainer={"epochs": 2})
    c.search.grid = [{"hidden": 2}, {"hidden": 32}]
    rows = search(c, store, train, val, tmp_path / "s", log=None)
    assert [r.P for r in rows] == sorted((r.P for r in rows), reverse=True)
    assert {r.variant["hidden"] for r in rows} == {2, 32}
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert [r["P"] for r in saved["ranked"]] == [r.P for r in rows]
    assert (tmp_path / "s" / "run1" / "best" / "config.json").is_file()
    assert search_table(rows).row_count == 2
    c.search.grid = []
    with pytest.raises(ConfigError, match=r"search\.grid is empty"):
        search(c, store, train, val, log=None)


@pytest.mark.slow
def test_search_of_the_frozen_progressive_variant_trains_each_task_model_once(dataset, tmp_path):
    from mtaffect.models.ensemble import EnsembleAffectModel
    from mtaffect.models.loading import load_model
    from mtaffect.train.config import load_config
    from mtaffect.train.search import search

    store, train, val = dataset
    c = cfg(
        "progressive",
        model={"recipe": "progressive", "hparams": {"dim": 8, "task_dim": 8}},
        trainer={"epochs": 1},
    )
    c.search.grid = [
        {"fusion_tasks": ["au", "va"]},
        {"fusion_tasks": ["au", "expr", "va"]},
        {"fusion_tasks": ["va"], "temporal": "lstm"},
    ]
    out = tmp_path / "s"
    rows = search(c, store, train, val, out, log=None)
    shared = json.loads((out / "task_models" / "metrics.json").read_text())
    assert [s["name"] for s in shared["stages"]] == ["task_au", "task_expr", "task_va"]  # trained once
    for i in range(3):
        stages = json.loads((out / f"run{i}" / "metrics.json").read_text())["stages"]
        assert all("reused" in s for s in stages if s["name"].startswith("task_"))  # never retrained
        assert [s["name"] for s in stages if "reused" not in s] == ["joint"]
    va_task = load_model(next((out / "task_models" / "stages").glob("*-task_va"))).model.state_dict()
    in_run = load_model(out / "run2" / "best").model.state_dict()
    assert all(torch.equal(v, in_run[k]) for k, v in va_task.items() if k.startswith("task_va."))
    report = json.loads((out / "search.json").read_text())
    assert report["task_models_reused"] and set(report["per_task"]) == {"au", "expr", "va"}
    assert sorted(t for r in rows for t in (r.chosen_for or [])) == ["au", "expr", "va"]
    assert load_config(out / "chosen.yaml").model.hparams["fusion_tasks"] == rows[0].variant["fusion_tasks"]
    combined = load_model(out / "best")  # each task from the variant that scored best on it
    assert isinstance(combined, EnsembleAffectModel)
    names = [str(n) for n in val.images[:40]]
    assert len(combined.predict_store(store, names, allow_missing=True)) == 40


@pytest.mark.slow
def test_named_stores_feed_features_at_name_and_resume_checks_them(dataset, tmp_path):
    from cli_helpers import run as cli

    from mtaffect.data.annotations import write_annotations
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.features.reader import StoreSet
    from mtaffect.features.store import FeatureStore, StoreError

    store, train, val = dataset
    names = list(FeatureStore.open(store).images)
    make_store(tmp_path / "au", names, dim=6, seed=3)
    make_store(tmp_path / "au2", names, dim=6, seed=4)
    set_meta(tmp_path / "au2", fingerprint="other")  # other weights
    make_store(tmp_path / "other", names[:-1], dim=6)
    with pytest.raises(StoreError, match="list different images"):
        StoreSet.open({"": store, "au": tmp_path / "other"})
    data = tmp_path / "data"
    data.mkdir()
    write_annotations(train, data / "training_set_annotations.txt")
    val_file = data / "validation_set_annotations.txt"
    write_annotations(val, val_file)
    conf = tmp_path / "published.yaml"
    hparams = {"variant": "published", "fusion_tasks": ["au"], "dim": 8}
    conf.write_text(
        yaml.safe_dump(
            {
                "model": {"recipe": "progressive", "hparams": hparams},
                "trainer": {"epochs": 2, "progress": False, "patience": 0},
                "data": {"batch_size": 64},
            }
        )
    )
    run, best, pred = tmp_path / "run", tmp_path / "run" / "best", tmp_path / "val.parquet"
    train_args = ("train", "--config", conf, "--data", data, "--out", run, "--features", store)
    cli(*train_args, "--features", f"au={tmp_path / 'au'}")
    run_json = json.loads((run / "run.json").read_text())
    assert set(run_json["store"]["stores"]) == {"au"}  # recorded: resume checks every store
    ck = json.loads((best / "config.json").read_text())
    assert ck["inputs"] == ["features", "features@au"] and ck["input_stores"]["au"]["fingerprint"] == "abc123"
    cli(
        "infer",
        "--model",
        best,
        "--images",
        val_file,
        "--out",
        pred,
        "--features",
        store,
        "--features",
        f"au={tmp_path / 'au'}",
        "--allow-missing",
    )
    saved = PredictionTable.read(run / "val_predictions.parquet")
    got = PredictionTable.read(pred).align_to(list(saved.images))
    np.testing.assert_allclose(got.expr_probs, saved.expr_probs, atol=1e-5)
    assert "store 'au'" in cli(*train_args, "--features", f"au={tmp_path / 'au2'}", "--resume", code=2)
    output = cli(
        "infer",
        "--model",
        best,
        "--images",
        val_file,
        "--out",
        pred,
        "--features",
        store,
        "--overwrite",
        code=2,
    )
    assert "au=STORE" in output
    from mtaffect.models.checkpoint import CheckpointError
    from mtaffect.models.ensemble import save_ensemble

    with pytest.raises(CheckpointError, match=r"reads the features of \['au'\]"):  # no source computes them
        save_ensemble(tmp_path / "ensemble", {"m": best}, {"au": "m", "expr": "m", "va": "m"})


# ---- issue 20 item 10: validation labels with nothing to score ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("content", ["header", "cr-header", "no-label"])
def test_a_validation_file_with_no_row_to_score_is_an_error_unless_asked(dataset, tmp_path, content):
    """A header-only (or CR-only header, or all-labels-missing) validation file used to train without
    selection, exit 0 and best/ with best_epoch -1: now exit 2 naming the file, best/ never written;
    --no-validation trains without it on purpose."""
    from typer.testing import CliRunner

    from mtaffect.cli import app
    from mtaffect.data.annotations import write_annotations
    from mtaffect.schema import OFFICIAL_HEADER

    store, train, val = dataset
    root = tmp_path / "root"
    write_annotations(train, root / "training_set_annotations.txt")
    val_file = root / "validation_set_annotations.txt"
    if content == "header":
        val_file.write_text(OFFICIAL_HEADER + "\n")
    elif content == "cr-header":
        val_file.write_bytes((OFFICIAL_HEADER + "\r").encode())
    else:
        frame = val.frame.copy()
        frame[["valence", "arousal"]] = -5
        frame["expression"] = -1
        frame[[c for c in frame.columns if c.startswith("AU")]] = -1
        write_annotations(LabelTable.from_frame(frame), val_file)
    conf = tmp_path / "tiny.yaml"
    conf.write_text("model: {recipe: tiny-test}\ntrainer: {epochs: 1, patience: 0}\ndata: {batch_size: 64}\n")
    args = [
        "train",
        "--config",
        conf,
        "--features",
        store,
        "--data",
        root,
        "--out",
        tmp_path / "run",
        "--no-progress",
    ]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert str(val_file) in r.output and "no validation row to score" in r.output
    assert "--no-validation" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "metrics.json").exists()
    r = CliRunner().invoke(app, [str(a) for a in [*args, "--no-validation"]])
    assert r.exit_code == 0, r.output
    assert "trained without validation, as asked" in r.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["trainval"] is False and metrics["rows"]["val"] is None
    r = CliRunner().invoke(app, [str(a) for a in [*args, "--no-validation", "--trainval", "--overwrite"]])
    assert r.exit_code == 2 and "drop --no-validation" in r.output


@pytest.mark.slow
def test_validation_rows_whose_every_image_failed_extraction_are_an_error(dataset):
    from mtaffect.train.fit import NoValidationError, fit

    store, train, val = dataset
    failed = val.subset(np.array([250 - len(train)]))  # the one val row whose extraction failed
    with pytest.raises(NoValidationError, match="image of every one failed extraction"):
        fit(cfg(), store, train, failed, log=None)


_CLI_MODULES = """
import contextlib, io, sys
import mtaffect.cli
for argv in (["--help"], ["train", "--help"], ["cv", "--help"], ["search", "--help"], ["infer", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        mtaffect.cli.main(argv)
print(sorted(m for m in ("torch", "lightning", "torchmetrics") if m in sys.modules))
"""


def test_the_cli_and_its_training_commands_help_start_without_torch_or_lightning():
    """Start-up is fast by structure: Lightning (and torch) are imported when a training starts, not by
    `mtaffect --help` or a command's help."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CLI_MODULES], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
