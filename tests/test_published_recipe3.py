"""Recipe 3 as the peer published it (YenanLiu/ABAW7th), and the generic training keys its variant and
the other recipes' published variants use: ``optim.schedule``, ``optim.decay_all`` and
``trainer.checkpoint_per_task``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from store_helpers import write_store_by_hand

from mtaffect.data.annotations import LabelTable
from mtaffect.schema import AU_NAMES

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "configs" / "progressive_published.yaml"
pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- optim.schedule --------------------------------------------------------------------------------------
def test_schedules_give_the_lr_multiplier_at_each_step():
    from mtaffect.train.module import lr_lambda

    cosine = lr_lambda(4, 20, 0.1)  # the default: warm-up from above 0, then cosine to min_ratio
    assert cosine(0) == pytest.approx(1 / 5) and cosine(3) == pytest.approx(4 / 5)
    assert cosine(4) == pytest.approx(1.0) and cosine(12) == pytest.approx(0.55) and cosine(20) == 0.1
    const = lr_lambda(4, 20, 0.1, "constant")  # the recipe-3 peer: lr from the first step to the last
    assert [const(s) for s in (0, 3, 4, 12, 20, 1000)] == [1.0] * 6
    warm = lr_lambda(4, 20, 0.1, "warmup_constant")  # the recipe-1 peer: warm-up that never decays
    assert warm(0) == pytest.approx(1 / 5) and warm(3) == pytest.approx(4 / 5)
    assert [warm(s) for s in (4, 12, 20, 1000)] == [1.0] * 4
    with pytest.raises(ValueError, match="valid values: cosine, constant, warmup_constant"):
        lr_lambda(0, 1, 0.1, "linear")


def test_the_module_steps_its_scheduler_with_the_configured_schedule():
    from mtaffect.models.base import MTLModel, Stage
    from mtaffect.models.losses import LossConfig, MTLLoss
    from mtaffect.train.module import MTLModule

    class Lin(MTLModel):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    lrs = {}
    for schedule in ("cosine", "constant", "warmup_constant"):
        module = MTLModule(
            Lin(),
            MTLLoss(LossConfig()),
            Stage("joint"),
            lr=0.1,
            warmup_steps=2,
            total_steps=10,
            min_lr_ratio=0.0,
            schedule=schedule,
        )
        conf = module.configure_optimizers()
        opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        seen = []
        for _ in range(10):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs[schedule] = seen
    assert lrs["constant"] == pytest.approx([0.1] * 10)
    assert lrs["warmup_constant"] == pytest.approx([0.1 / 3, 0.2 / 3] + [0.1] * 8)
    assert lrs["cosine"][:2] == pytest.approx([0.1 / 3, 0.2 / 3]) and lrs["cosine"][-1] < 0.01


# ---- optim.decay_all -------------------------------------------------------------------------------------
def _decay_by_param(model, decay_all: bool) -> dict[str, float]:
    model.decay_all = decay_all
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g["weight_decay"] for g in model.param_groups(1e-3, 0.05) for p in g["params"]}


def test_decay_all_puts_weight_decay_on_norms_biases_and_position_embeddings(vit_folder):
    from mtaffect.features.registry import create_backbone
    from mtaffect.models.image_model import ImageMTLModel
    from mtaffect.models.registry import create_model

    backbone = create_backbone(f"hf:{vit_folder}", image_size=32)
    head = create_model(
        "progressive", feature_dim=backbone.spec.feature_dim, variant="published", fusion_tasks=[], dim=8
    )
    model = ImageMTLModel(backbone, head, mode="finetune", weight_decay=0.05)
    spared = [n for n, wd in _decay_by_param(model, False).items() if wd == 0.0]  # today's grouping
    assert any(n.endswith("position_embeddings") for n in spared) and any("bias" in n for n in spared)
    assert any("layernorm" in n.lower() for n in spared) and not any(n.startswith("head.") for n in spared)
    everything = _decay_by_param(model, True)
    assert set(everything) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(everything.values()) == {0.05}  # every parameter decays, the spared ones included


def test_decay_all_is_read_from_the_config_and_written_with_every_setting():
    from mtaffect.train.config import config_from_dict

    base = {"model": {"recipe": "emotinet"}}
    assert config_from_dict(base).to_dict()["optim"]["decay_all"] is False  # a run's config.yaml is complete
    cfg = config_from_dict(
        {
            **base,
            "optim": {"decay_all": True, "schedule": "constant"},
            "trainer": {"checkpoint_per_task": True},
        }
    )
    d = cfg.to_dict()
    assert d["optim"]["decay_all"] is True and d["optim"]["schedule"] == "constant"
    assert d["trainer"]["checkpoint_per_task"] is True


# ---- trainer.checkpoint_per_task -------------------------------------------------------------------------
def _store_and_labels(root: Path) -> tuple[Path, LabelTable, LabelTable]:
    """A 12-d feature store whose labels depend on the features (so epochs differ per task)."""
    names = [f"{p}{v}/{f:05d}.jpg" for p, n in (("v", 4), ("w", 2)) for v in range(n) for f in range(30)]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(names), 12)).astype(np.float32)
    write_store_by_hand(root / "store", names, feats)
    z = feats @ np.random.default_rng(9).normal(size=(12, 22))
    df = pd.DataFrame(
        {
            "image": names,
            "valence": np.tanh(z[:, 0] / 3),
            "arousal": np.tanh(z[:, 1] / 3),
            "expression": z[:, 2:10].argmax(1),
        }
    )
    for j, au in enumerate(AU_NAMES):
        df[au] = (z[:, 10 + j] > 0).astype(int)
    labels = LabelTable.from_frame(df)
    n_train = 4 * 30
    return root / "store", labels.subset(np.arange(n_train)), labels.subset(np.arange(n_train, len(names)))


@pytest.mark.slow
def test_checkpoint_per_task_makes_best_an_ensemble_of_each_tasks_best_epoch(tmp_path):
    from mtaffect.models.ensemble import EnsembleAffectModel
    from mtaffect.models.loading import load_model
    from mtaffect.train.config import config_from_dict
    from mtaffect.train.fit import fit

    store, train, val = _store_and_labels(tmp_path)
    cfg = config_from_dict(
        {
            "model": {"recipe": "emotinet", "hparams": {"joint": True}},
            "optim": {"lr": 0.05, "warmup_epochs": 0},
            "data": {"batch_size": 16},
            "trainer": {"epochs": 6, "patience": 0, "progress": False, "checkpoint_per_task": True},
        }
    )
    out = tmp_path / "run"
    result = fit(cfg, store, train, val, out, log=None)
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["stages"][-1]["name"]  # the final stage's epochs answer the tasks
    history = [h for h in metrics["history"] if h["stage"] == final and h.get("finite")]
    assert len(history) == 6
    terms = {"au": "f1_au", "expr": "f1_expr", "va": "ccc_va"}
    chosen = metrics["checkpoint_per_task"]
    for task, key in terms.items():  # each task's epoch is the best on its own term
        best = max(history, key=lambda h: h[key])
        assert chosen[task]["epoch"] == best["epoch"] and chosen[task]["score"] == pytest.approx(best[key])
    assert len({c["epoch"] for c in chosen.values()}) > 1  # the test tells epochs apart
    model = load_model(out / "best")
    assert isinstance(model, EnsembleAffectModel)
    ens = json.loads((out / "best" / "ensemble.json").read_text())
    assert ens["tasks"] == {t: f"epoch_{chosen[t]['epoch']}" for t in terms}
    for task in terms:  # each member is that epoch's checkpoint (its own metrics)
        member = json.loads((out / "best" / ens["members"][ens["tasks"][task]] / "config.json").read_text())
        term = {
            "au": member["metrics"]["au"]["f1"],
            "expr": member["metrics"]["expr"]["f1"],
            "va": member["metrics"]["va"]["mean"],
        }[task]
        assert term == pytest.approx(chosen[task]["score"])
    combined = sum(c["score"] for c in chosen.values())
    assert metrics["best"]["P"] == pytest.approx(combined) == pytest.approx(result.metrics["P"])
    assert combined >= max(h["P"] for h in history) - 1e-9  # per task never worse than one epoch
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.metrics import score

    preds = PredictionTable.read(out / "val_predictions.parquet")
    assert pytest.approx(combined, abs=1e-4) == score(val, preds).P  # the ensemble's own predictions


@pytest.mark.slow
def test_patience_zero_never_stops_early(tmp_path):
    """The published recipe-3 variant trains every epoch: patience 0 is no early stopping (patience 1
    on the same run stops, so the run does have epochs without improvement)."""
    from mtaffect.train.config import config_from_dict
    from mtaffect.train.fit import fit

    store, train, val = _store_and_labels(tmp_path)
    runs = {}
    for patience in (0, 1):
        cfg = config_from_dict(
            {
                "model": {"recipe": "emotinet", "hparams": {"joint": True}},
                "data": {"batch_size": 60},
                "optim": {"lr": 5.0, "warmup_epochs": 0},
                "trainer": {"epochs": 6, "patience": patience, "progress": False},
            }
        )
        runs[patience] = fit(cfg, store, train, val, None, log=None)
    assert len(runs[0].history) == 6 and not runs[0].stages[-1]["stopped_early"]
    assert len(runs[1].history) < 6 and runs[1].stages[-1]["stopped_early"]
    assert math.isfinite(runs[0].P)


# ---- recipe 3 as the peer built it ------------------------------------------------------------------------
def test_selection_sums_single_cccs_as_the_peer_did():
    from mtaffect.train.config import config_from_dict
    from mtaffect.train.module import select_score
    from mtaffect.train.stages import select_tasks

    class Result:
        ccc_v, ccc_a = 0.5, 0.1

        def P_of(self, tasks):
            return sum({"au": 0.4, "expr": 0.3, "va": 0.3}[t] for t in tasks)

    assert select_score(Result(), ("au", "valence")) == pytest.approx(0.9)  # AU F1 + CCC_V
    assert select_score(Result(), ("au", "expr", "valence", "arousal")) == pytest.approx(1.3)
    cfg = config_from_dict({"model": {"recipe": "emotinet"}, "trainer": {"select": ["au", "valence"]}})
    assert select_tasks(cfg, ("au", "va")) == ("au", "valence")
    assert select_tasks(cfg, ("expr",)) == ("expr",)  # a stage without VA ignores its CCCs


def test_peer_layers_linear_task_heads_activation_only_before_a_temporal_module_and_a_bare_lstm():
    from mtaffect.models.blocks import PlainLSTM
    from mtaffect.models.registry import create_model

    def build(**kw):
        return create_model(
            "progressive",
            feature_dim=8,
            variant="published",
            peer=True,
            dim=8,
            input_dims={"features@au": 8},
            **kw,
        )

    task = build(fusion_tasks=[])  # a task model: linear heads on the backbone feature
    assert isinstance(task.fusion, torch.nn.Identity) and isinstance(task.act, torch.nn.Identity)
    assert isinstance(task.heads["au"], torch.nn.Linear) and task.heads["au"].in_features == 8
    frame = build(fusion_tasks=["au"])  # fused, no temporal module: no LeakyReLU
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in frame.modules())
    assert isinstance(frame.fusion, torch.nn.Sequential) and len(frame.fusion) == 4
    va = build(fusion_tasks=["au"], temporal="lstm")  # LeakyReLU, then the bare 2-layer LSTM
    assert isinstance(va.act, torch.nn.LeakyReLU) and isinstance(va.temporal_net, PlainLSTM)
    lstm = va.temporal_net.lstm
    assert lstm.num_layers == 2 and lstm.hidden_size == 8 and lstm.dropout == 0
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(va.temporal_net(x), lstm(x)[0])  # no residual, no projection
    expr = build(fusion_tasks=["au"], windowed=True)  # windows for batching, no temporal module
    assert expr.temporal and isinstance(expr.temporal_net, torch.nn.Identity)
    batch = {"features": torch.randn(2, 5, 8), "features@au": torch.randn(2, 5, 8)}
    expr.eval()
    out = expr(batch)
    rows = expr({k: v.reshape(10, 8) for k, v in batch.items()})  # each frame scored alone
    torch.testing.assert_close(out["expr"].reshape(10, 8), rows["expr"])
    assert build(fusion_tasks=[]).config()["peer"] is True
    assert (
        "peer"
        not in create_model(
            "progressive", feature_dim=8, variant="published", fusion_tasks=[], dim=8
        ).config()
    )  # saved checkpoints read as before
    with pytest.raises(ValueError, match="peer and windowed apply to variant published"):
        create_model("progressive", feature_dim=8, peer=True)


def test_per_frame_augmentation_draws_each_frames_transform_on_its_own():
    pytest.importorskip("kornia")
    from mtaffect.train.images.augment import Augmenter

    x = torch.rand(2, 3, 3, 16, 16).expand(2, 3, 3, 16, 16).clone()
    x[:, 1:] = x[:, :1]  # every frame of a window the same image
    ops = {"rotation": {"degrees": 40.0}}
    same = Augmenter.from_config("none", ops, 16, 3)(x, seed=5)
    own = Augmenter.from_config("none", ops, 16, 3, per_frame=True)(x, seed=5)
    assert same.shape == own.shape == x.shape
    torch.testing.assert_close(same[:, 0], same[:, 2])  # one transform per window
    assert not torch.allclose(own[:, 0], own[:, 2])  # one per frame
    rows = Augmenter.from_config("none", ops, 16, 3, per_frame=True)(x[:, 0], seed=5)
    assert rows.shape == x[:, 0].shape


@pytest.fixture(scope="module")
def published_config(vit_folder, tmp_path_factory) -> Path:
    """configs/progressive_published.yaml as shipped, shrunk only where a CPU test must be: a tiny
    random-init ViT (hf:<folder>) at 32 px, width 16, 1 epoch, 8-image batches, windows of 3 frames."""
    cfg = yaml.safe_load(PUBLISHED.read_text())
    cfg["backbone"].update(name=f"hf:{vit_folder}", image_size=32)
    cfg["model"]["hparams"]["dim"] = 16
    cfg["data"].update(batch_size=8, eval_batch_size=64, workers=0)
    cfg["trainer"].update(epochs=1, progress=False)
    p = cfg["pipeline"]
    p["export"] = {"batch_size": 64, "workers": 0}
    p["enhanced"]["au"]["trainer"]["epochs"] = 1
    p["enhanced"]["va"]["trainer"]["epochs"] = 1
    p["enhanced"]["expr"]["data"].update(window=3, stride=3, batch_size=6)  # 2 windows of 3 frames
    p["enhanced"]["va"]["data"].update(window=3, stride=3, batch_size=6)
    path = tmp_path_factory.mktemp("published3") / "published.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


STEPS = ("task_au", "task_expr", "task_va", "enhanced_au", "enhanced_expr", "enhanced_va", "enhanced_all")


@pytest.fixture(scope="module")
def published_run(published_config, data, tmp_path_factory) -> Path:
    """`mtaffect train` of the shrunk published pipeline, once for the tests below: the run folder."""
    from cli_helpers import run

    out = tmp_path_factory.mktemp("published3_run") / "published"
    run("train", "--config", published_config, "--data", data, "--out", out)
    return out


def _resolved(out: Path, step: str) -> dict:
    return yaml.safe_load((out / step / "config.yaml").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_every_step_trains_with_the_peers_optimiser_and_an_unweighted_loss(published_run, step):
    c = _resolved(published_run, step)
    assert c["optim"]["schedule"] == "constant" and c["optim"]["decay_all"] is True
    assert c["optim"]["lr"] == c["backbone"]["lr"] == 1e-5
    assert c["optim"]["weight_decay"] == c["backbone"]["weight_decay"] == 0.05
    assert all(g == {"lr": 1e-5, "weight_decay": 0.05} for g in c["optim"]["groups"].values())
    assert c["trainer"]["patience"] == 0 and c["augment"]["per_frame"] is True
    assert c["loss"]["weights"] == {"au": 1.0, "expr": 1.0, "va": 1.0}  # unweighted sum
    assert c["model"]["hparams"]["peer"] is True


def test_the_shipped_config_keeps_the_peers_epochs_batches_and_windows():
    from mtaffect.train.config import load_config

    resolved = load_config(PUBLISHED)  # a value the config leaves to its default counts too
    assert resolved.trainer.epochs == 20 and resolved.data.batch_size == 50  # ALL; AU batch 50
    p = yaml.safe_load(PUBLISHED.read_text())["pipeline"]
    assert p["enhanced"]["au"]["trainer"]["epochs"] == p["enhanced"]["va"]["trainer"]["epochs"] == 30
    assert p["enhanced"]["expr"]["data"]["batch_size"] // p["enhanced"]["expr"]["data"]["window"] == 8  # 8x5
    assert (p["enhanced"]["va"]["data"]["window"], p["enhanced"]["va"]["data"]["batch_size"]) == (30, 300)


@pytest.mark.slow
def test_each_enhanced_model_selects_on_the_sum_of_the_terms_it_trains(published_run):
    au, expr, every = (_resolved(published_run, f"enhanced_{n}")["trainer"] for n in ("au", "expr", "all"))
    assert au["tasks"] == ["au", "va"] and au["select"] == ["au", "valence"]  # AU + valence
    assert expr["select"] == ["au", "expr", "valence"]
    assert every["select"] == ["au", "expr", "valence", "arousal"]
    assert _resolved(published_run, "enhanced_expr")["model"]["hparams"]["temporal"] == "none"


@pytest.mark.slow
def test_the_trained_models_have_the_peers_layers(published_run):
    from mtaffect.models.blocks import PlainLSTM
    from mtaffect.models.checkpoint import load_mtl_model

    task, _ = load_mtl_model(published_run / "task_expr" / "best")  # linear heads on the backbone feature
    assert isinstance(task.fusion, torch.nn.Identity) and isinstance(task.heads["expr"], torch.nn.Linear)
    va_model, _ = load_mtl_model(published_run / "enhanced_va" / "best")
    assert isinstance(va_model.temporal_net, PlainLSTM) and isinstance(va_model.act, torch.nn.LeakyReLU)
    expr_model, _ = load_mtl_model(published_run / "enhanced_expr" / "best")
    assert expr_model.windowed and isinstance(expr_model.temporal_net, torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in expr_model.modules())


@pytest.mark.slow
def test_best_is_the_combined_model_scored_on_validation(published_run, data):
    from mtaffect.data.annotations import load_split
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.metrics import score
    from mtaffect.models.ensemble import EnsembleAffectModel
    from mtaffect.models.loading import load_model

    assert isinstance(load_model(published_run / "best"), EnsembleAffectModel)
    saved = PredictionTable.read(published_run / "val_predictions.parquet")
    metrics = json.loads((published_run / "metrics.json").read_text())
    assert metrics["P_tasks"] == pytest.approx(score(load_split(data, "val"), saved).P, abs=1e-9)
