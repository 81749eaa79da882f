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
from store_helpers import write_store_by_hand
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
        return {"au": self.au(h), "expr": self.expr(h), "va": self.va(h)}


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


def _register() -> None:
    for cls in (TinyModel, TinyTemporal, TinyTwoStage):
        with contextlib.suppress(ValueError):  # already registered in this process
            register_model(cls.recipe)(cls)


_register()


# ---- tiny data -------------------------------------------------------------------------------------------
def make_store(path: Path, names: list[str], dim: int = 12, logits: int = 0, seed: int = 0,
               invalid: tuple[int, ...] = ()) -> np.ndarray:  # fmt: skip
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

    raw = {"model": {"recipe": recipe}, "trainer": {"epochs": 3, "progress": False, "patience": 0},
           "data": {"batch_size": 32, "window": 8, "stride": 4}, "optim": {"lr": 0.01}}  # fmt: skip
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


def test_sharded_batches_are_disjoint_across_ranks():
    from mtaffect.train.data import ShardedBatches

    seen = [np.concatenate(list(ShardedBatches(10, 3, shuffle=False, rank=r, world=2, pad=False)))
            for r in range(2)]  # fmt: skip
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(np.concatenate(seen)) == list(range(10))
    train = [
        np.concatenate(list(ShardedBatches(10, 4, shuffle=True, seed=1, rank=r, world=2))) for r in range(2)
    ]
    assert len(train[0]) == len(train[1]) == 5 and set(train[0]).isdisjoint(train[1])


# ---- schedule, stages ----------------------------------------------------------------------------------
def test_warmup_trains_from_the_first_step():
    from mtaffect.train.module import lr_lambda

    f = lr_lambda(warmup_steps=10, total_steps=100, min_ratio=0.01)
    assert f(0) > 0  # a peer's warm-up gave lr 0 for the whole first epoch
    assert f(9) < f(10) == pytest.approx(1.0) and f(99) < 0.05 and f(55) < f(20)


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
    fit(cfg(trainer={"epochs": 1}, optim={"warmup_epochs": 1.0}), dataset[0], dataset[1], dataset[2],
        callbacks=[snap], log=None)  # fmt: skip
    assert not torch.equal(snap.before, snap.after) and snap.lrs > 0


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


def test_a_stage_without_labels_errors_clearly(dataset):
    from mtaffect.train.fit import fit

    _, train, val = dataset
    frame = train.frame.copy()
    frame["expression"] = -1
    frame[["valence", "arousal"]] = -5.0
    with pytest.raises(ValueError, match=r"stage 'rest' trains expr, va but the training rows hold no valid"):
        fit(cfg("tiny-two-stage"), dataset[0], LabelTable(frame), val, log=None)


# ---- a run end to end ----------------------------------------------------------------------------------
def test_fit_writes_the_run_and_its_metric_matches_the_predictions(dataset, tmp_path):
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.io import OutputExistsError
    from mtaffect.models.checkpoint import load_model
    from mtaffect.train.fit import fit

    store, train, val = dataset
    out = tmp_path / "run"
    c = cfg("tiny-two-stage", trainer={"epochs": 4})
    res = fit(c, store, train, val, out, log=None)
    for name in ("best/model.safetensors", "best/config.json", "metrics.json", "val_predictions.parquet",
                 "config.yaml", "stages/0-au/model.safetensors"):  # fmt: skip
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
    fit(c, store, train, val, out, resume=True, log=logs.append)
    assert any("stage au: resumed" in m for m in logs)  # the finished stage is not trained again


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
    args = ["train", "--config", str(conf), "--features", str(store), "--data", str(root),
            "--out", str(tmp_path / "run"), "--no-progress", "--override", "trainer.epochs=1"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "P = " in r.output and "CCC_VA" in r.output and "F1_EXPR" in r.output and "F1_AU" in r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, [*args, "--override", "trainer.epoch=2"])
    assert r.exit_code == 2 and "unknown key 'epoch'" in r.output
    test_list = tmp_path / "test.txt"
    test_list.write_text("\n".join(val.images[:10]) + "\n")
    r = runner.invoke(app, ["infer", "--model", str(tmp_path / "run" / "best"), "--features", str(store),
                            "--images", str(test_list), "--out", str(tmp_path / "pred.parquet")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert PredictionTable.read(tmp_path / "pred.parquet").images.tolist() == list(val.images[:10])


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
res = fit(c, {store!r}, train, val, os.path.join({out!r}, "run"), callbacks=[Rows({out!r})], log=None)
if res.checkpoint is not None:
    json.dump({{"P": res.P}}, open(os.path.join({out!r}, "result.json"), "w"))
"""


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
    r0, r1 = run_two_ranks(script, tmp_path, timeout=120)
    # each rank trains on its own share; DistributedSampler pads the odd row count (239) with one repeat
    assert r0 and r1 and len(r0 & r1) <= (len(train) - 1) % 2
    assert len(r0 | r1) == len(train) - 1  # together they cover every valid training row
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
