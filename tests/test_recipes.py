"""The four recipes honour the model contract: shapes, configs that rebuild them, stages that train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mtaffect.models.base import TASKS, MTLModel, Stage
from mtaffect.models.recipe3_progressive import ProgressiveMTL, search_space
from mtaffect.models.registry import create_model, list_models
from mtaffect.schema import NUM_AUS, NUM_EXPR

D, K, N, C = 16, 7, 9, 24  # tiny feature, logit and token sizes
TOK = {"token_shape": (N, C), "dim": 32, "heads": 4}

CASES = {
    "queries-gcn": ("queries-gcn", {**TOK, "ffn_dim": 64}),
    "queries-gcn-mean": ("queries-gcn", {**TOK, "node_selection": "mean"}),
    "au-graph": ("au-graph", {"num_logits": K, "node_dim": 16, "hidden": 32}),
    "au-graph-nologits": ("au-graph", {"node_dim": 16, "hidden": 32}),
    "au-graph-joint": ("au-graph", {"num_logits": K, "node_dim": 16, "hidden": 32, "joint": True}),
    "progressive": ("progressive", {"dim": 32, "task_dim": 24}),
    "progressive-av-transformer": (
        "progressive",
        {"dim": 32, "fusion_tasks": ["au", "va"], "temporal": "transformer"},
    ),
    "progressive-lstm": ("progressive", {"dim": 32, "temporal": "lstm"}),
    "progressive-endtoend": ("progressive", {"dim": 32, "task_dim": 24, "progressive": False}),
    "progressive-tcn-expr": ("progressive", {"dim": 32, "fusion_tasks": ["expr"], "temporal": "tcn"}),
    "progressive-published": (
        "progressive",
        {
            "dim": 32,
            "variant": "published",
            "fusion_tasks": ["au", "va"],
            "temporal": "lstm",
            "input_dims": {"features@au": D, "features@va": 24},
        },
    ),
    "progressive-task-model": ("progressive", {"dim": 32, "variant": "published", "fusion_tasks": []}),
    "emotinet": ("emotinet", {"num_logits": K}),
    "emotinet-nologits": ("emotinet", {}),
}


def build(case: str, seed: int = 0) -> MTLModel:
    torch.manual_seed(seed)
    name, kw = CASES[case]
    return create_model(name, feature_dim=D, **kw)


def make_batch(model: MTLModel, b: int = 6, t: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = (b, t) if model.temporal else (b,)
    shapes = {"features": (D,), "logits": (K,), "tokens": (N, C)}
    shapes.update({k: (d,) for k, d in getattr(model, "input_dims", {}).items()})  # features@<store>
    return {k: torch.randn(*lead, *shapes[k], generator=g) for k in model.inputs}


def apply_stage(model: MTLModel, stage: Stage) -> None:
    """Freeze as the Stage contract says: only ``train_modules`` train, everything else is eval."""
    model.train()
    if stage.train_modules == ("*",):
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for name, module in model.named_children():
        if name not in stage.train_modules:
            module.eval()
    for name in stage.train_modules:
        getattr(model, name).requires_grad_(True)


def stage_loss(out: dict[str, torch.Tensor], tasks: tuple[str, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    lead = out["au"].shape[:-1]
    au = torch.randint(0, 2, (*lead, NUM_AUS), generator=g).float()
    expr = torch.randint(0, NUM_EXPR, (lead.numel(),), generator=g)
    va = torch.rand(*lead, 2, generator=g) * 2 - 1
    losses = {
        "au": lambda: F.binary_cross_entropy_with_logits(out["au"], au),
        "expr": lambda: F.cross_entropy(out["expr"].reshape(-1, NUM_EXPR), expr),
        "va": lambda: F.mse_loss(out["va"], va),
    }
    return sum(losses[t]() for t in tasks)


def test_all_four_recipes_are_registered():
    assert {"queries-gcn", "au-graph", "progressive", "emotinet"} <= set(list_models())


@pytest.mark.parametrize("case", CASES)
def test_output_shapes_and_ranges(case):
    model = build(case).eval()
    batch = make_batch(model)
    lead = (6, 5) if model.temporal else (6,)
    with torch.no_grad():
        out = model(batch)
    assert set(out) == set(TASKS)
    assert out["au"].shape == (*lead, NUM_AUS) and out["expr"].shape == (*lead, NUM_EXPR)
    assert out["va"].shape == (*lead, 2) and out["va"].abs().max() <= 1
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("case", ["queries-gcn", "au-graph", "emotinet"])
def test_per_frame_recipes_also_accept_windows(case):
    model = build(case).eval()
    rows = make_batch(model, b=6)
    windows = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in rows.items()}
    with torch.no_grad():
        a, b = model(rows), model(windows)
    for task in TASKS:
        torch.testing.assert_close(b[task].reshape(a[task].shape), a[task])


@pytest.mark.parametrize("case", CASES)
def test_config_rebuilds_an_identical_model(case):
    model = build(case).eval()
    config = model.config()
    config = yaml.safe_load(yaml.safe_dump(config))  # configs travel as YAML in checkpoints
    rebuilt = create_model(model.recipe, **config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert rebuilt.config() == model.config() and rebuilt.inputs == model.inputs
    assert rebuilt.temporal == model.temporal
    batch = make_batch(model)
    with torch.no_grad():
        a, b = model(batch), rebuilt(batch)
    for task in TASKS:
        torch.testing.assert_close(a[task], b[task])


@pytest.mark.parametrize("case", CASES)
def test_stages_name_existing_modules_and_cover_every_parameter(case):
    model = build(case)
    stages = model.stages()
    assert stages and len({s.name for s in stages}) == len(stages)
    covered: set[str] = set()
    for stage in stages:
        assert stage.tasks and set(stage.tasks) <= set(TASKS)
        if stage.train_modules == ("*",):
            covered |= {n for n, _ in model.named_parameters()}
            continue
        for name in stage.train_modules:
            assert isinstance(getattr(model, name, None), nn.Module), f"{stage.name}: no module {name!r}"
            covered |= {f"{name}.{n}" for n, _ in getattr(model, name).named_parameters()}
    assert covered == {n for n, _ in model.named_parameters()}  # no parameter is left untrained


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_exactly_what_each_stage_trains(case):
    model = build(case)
    for stage in model.stages():
        apply_stage(model, stage)
        model.zero_grad(set_to_none=True)
        stage_loss(model(make_batch(model)), stage.tasks).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{stage.name}: {name} gets no gradient"
            else:
                assert p.grad is None, f"{stage.name}: frozen {name} got a gradient"


def test_recipe1_requires_tokens():
    with pytest.raises(ValueError, match="reads patch tokens"):
        create_model("queries-gcn", feature_dim=D)


@pytest.mark.parametrize("case", ["queries-gcn", "queries-gcn-mean"])
def test_recipe1_outputs_of_a_sample_do_not_depend_on_the_batch(case):
    model = build(case).eval()
    batch = make_batch(model, b=7)
    with torch.no_grad():
        full = model(batch)
        alone = model({k: v[3:4] for k, v in batch.items()})
        part = model({k: v[2:5] for k, v in batch.items()})
    for task in TASKS:
        torch.testing.assert_close(alone[task][0], full[task][3])
        torch.testing.assert_close(part[task][1], full[task][3])


def test_recipe1_node_selection_is_learned():
    model = build("queries-gcn")
    before = model.select.weights().detach().clone()
    torch.testing.assert_close(before, torch.full((NUM_EXPR + 2, NUM_AUS), 1 / NUM_AUS))  # starts as the mean
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stage_loss(model(make_batch(model)), ("expr", "va")).backward()
    assert model.select.logits.grad is not None and model.select.logits.grad.abs().sum() > 0
    opt.step()
    after = model.select.weights().detach()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.sum(-1), torch.ones(NUM_EXPR + 2))
    assert build("queries-gcn-mean").select.logits is None  # the documented fixed alternative


def test_recipe2_au_logits_are_scaled_cosines_and_logits_are_optional():
    model = build("au-graph").eval()
    with torch.no_grad():
        au = model(make_batch(model))["au"]
        scale = model.au_branch.log_scale.exp()
    assert torch.all((au - model.au_branch.bias).abs() <= scale + 1e-5)
    assert build("au-graph-nologits").inputs == ("features",)
    with pytest.raises(KeyError, match="reads 'logits'"):
        model({"features": torch.zeros(2, D)})


def test_recipe2_task_sequential_training_leaves_the_au_branch_untouched():
    model = build("au-graph")
    assert [s.name for s in model.stages()] == ["au", "expr_va"]
    assert [s.name for s in build("au-graph-joint").stages()] == ["joint"]
    stage = model.stages()[1]
    apply_stage(model, stage)
    batch = make_batch(model)
    state = {k: v.clone() for k, v in model.au_branch.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        stage_loss(model(batch), stage.tasks).backward()
        opt.step()
    for k, v in model.au_branch.state_dict().items():
        torch.testing.assert_close(v, state[k])  # weights and BN statistics unchanged


def test_recipe3_temporal_is_an_instance_property():
    assert build("progressive-lstm").temporal is True
    assert build("progressive").temporal is False and ProgressiveMTL.temporal is False
    model = build("progressive-lstm").eval()
    with torch.no_grad():  # (N, D) rows are windows of one frame
        out = model({"features": torch.randn(4, D)})
    assert out["au"].shape == (4, NUM_AUS) and out["va"].shape == (4, 2)


def test_recipe3_stage1_outputs_are_the_task_models_and_stage2_the_joint_model():
    model = build("progressive-av-transformer")
    stages = model.stages()
    assert [s.name for s in stages] == ["task_au", "task_va", "joint"]
    batch = make_batch(model)
    apply_stage(model, stages[0])
    model.eval()
    with torch.no_grad():
        out = model(batch)
        torch.testing.assert_close(out["au"], model.task_au(batch["features"])[1])
        torch.testing.assert_close(out["va"], model.task_va(batch["features"])[1])
        assert torch.all(out["expr"] == 0)  # no EXPR task model in this combination
    apply_stage(model, stages[-1])
    model.eval()
    with torch.no_grad():
        joint = model(batch)
    assert not torch.allclose(joint["au"], out["au"])
    model.requires_grad_(True)  # inference after training: the joint model answers
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["au"], joint["au"])


def test_recipe3_published_variant_fuses_the_named_task_features():
    m = build("progressive-published").eval()
    assert m.inputs == ("features", "features@au", "features@va") and m.stages() == [Stage("joint")]
    batch = make_batch(m)
    out = m(batch)
    changed = m({**batch, "features@va": batch["features@va"] + 1.0})  # the task feature reaches every head
    assert not torch.allclose(out["expr"], changed["expr"])
    assert isinstance(m.proj["au"], nn.Identity) and isinstance(m.proj["va"], nn.Linear)  # 24 -> D only
    assert isinstance(m.fusion[-1], nn.LeakyReLU) and m.fusion[-1].negative_slope == 0.1
    assert m.temporal_net.lstm.hidden_size == 32 and m.temporal_net.lstm.num_layers == 2
    with pytest.raises(ValueError, match="features@au"):
        create_model("progressive", feature_dim=D, variant="published", fusion_tasks=["au"])
    frozen = build("progressive")  # the cheap variant keeps its name and its checkpoints' config
    assert frozen.variant == "frozen" and "variant" not in frozen.config()


def test_recipe3_search_space_covers_task_subsets_and_temporal_modules():
    space = search_space()
    assert len(space) == 7 * 4
    assert {"fusion_tasks": ["au", "expr", "va"], "temporal": "lstm"} in space
    assert len({yaml.safe_dump(s) for s in space}) == len(space)
    for overrides in space[::5]:
        model = create_model("progressive", feature_dim=D, dim=16, task_dim=8, **overrides)
        assert model.temporal == (overrides["temporal"] != "none")
    assert len(search_space(temporal=("none",), min_tasks=0)) == 8
    with pytest.raises(ValueError, match="unknown temporal"):
        search_space(temporal=("gru",))
    with pytest.raises(ValueError, match="fusion_tasks"):
        create_model("progressive", feature_dim=D, fusion_tasks=["au", "pose"])


def test_recipe4_va_sees_only_the_logits_and_the_heads_are_separate():
    model = build("emotinet").eval()
    batch = make_batch(model)
    other = dict(batch, features=torch.randn_like(batch["features"]))
    new_logits = dict(batch, logits=torch.randn_like(batch["logits"]))
    with torch.no_grad():
        a, b, c = model(batch), model(other), model(new_logits)
    torch.testing.assert_close(a["va"], b["va"])
    # as published, the EXPR and AU heads read the features and the logits together
    assert model.expr_au_input == "features+logits" and model.expr_head.in_features == D + K
    assert not torch.allclose(a["expr"], c["expr"]) and not torch.allclose(a["au"], c["au"])
    assert [s.train_modules for s in model.stages()] == [("expr_head",), ("au_head",), ("va_head",)]
    assert isinstance(model.expr_head, nn.Linear)  # EXPR is one linear layer
    features_only = create_model("emotinet", feature_dim=D, num_logits=K, head_input="features").eval()
    with torch.no_grad():
        a, c = features_only(batch), features_only(new_logits)
    torch.testing.assert_close(a["expr"], c["expr"])
    torch.testing.assert_close(a["au"], c["au"])
    fallback = build("emotinet-nologits")
    assert fallback.inputs == ("features",) and fallback.va_input == fallback.expr_au_input == "features"
    with pytest.raises(ValueError, match="head_input must be one of"):
        create_model("emotinet", feature_dim=D, num_logits=K, head_input="logits")


def test_wrong_feature_size_is_a_clear_error():
    model = build("emotinet")
    with pytest.raises(ValueError, match="built for another backbone"):
        model({"features": torch.zeros(2, D + 1), "logits": torch.zeros(2, K)})


@pytest.mark.parametrize("case", ["queries-gcn", "au-graph", "progressive-lstm", "emotinet"])
def test_a_seed_builds_the_same_model_and_another_seed_another(case):
    a, b, c = (build(case, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


@pytest.mark.parametrize("case", ["queries-gcn", "au-graph-joint", "progressive-lstm", "emotinet"])
def test_each_recipe_overfits_a_tiny_batch(case, torch_one_thread):
    """Every recipe learns: at most 40 Adam steps on one batch halve its summed AU + EXPR + VA loss
    (dropout off, so the loss is a deterministic function of the weights)."""
    model = build(case).eval()
    model.requires_grad_(True)
    batch = make_batch(model, b=4, t=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses: list[float] = []
    while len(losses) < 40 and (not losses or losses[-1] >= 0.5 * losses[0]):
        opt.zero_grad()
        loss = stage_loss(model(batch), TASKS)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
