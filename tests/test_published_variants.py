"""The peers' published heads (``variant: published``) of recipes 1 and 2: their structure, not only
their shapes, and their configs (configs/*_published.yaml) training through the CLI on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from cli_helpers import run
from store_helpers import write_store_by_hand
from torch import nn

from mtaffect.models.blocks import sine_1d, token_positions, topk_adjacency_with_self
from mtaffect.models.recipe1_queries_gcn import QueriesGCN
from mtaffect.models.recipe2_au_graph import AUGraphMTL
from mtaffect.models.registry import create_model
from mtaffect.schema import AU_NAMES, NUM_AUS, NUM_EXPR

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N, C, DIM = 16, 24, 32  # 16 tokens: a square grid, where our variant's 2-D positions differ from 1-D
D, K = 16, 8  # recipe 2: features and the backbone's 8 scores


def recipe1(**kw) -> QueriesGCN:
    torch.manual_seed(0)
    hp = {"token_shape": (N, C), "dim": DIM, "heads": 4, "ffn_dim": 64, "variant": "published", **kw}
    return create_model("queries-gcn", feature_dim=D, **hp)  # type: ignore[return-value]


def recipe2(**kw) -> AUGraphMTL:
    torch.manual_seed(0)
    return create_model("au-graph", feature_dim=D, num_logits=K, variant="published", **kw)  # type: ignore


def tokens(b: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"tokens": torch.randn(b, N, C, generator=torch.Generator().manual_seed(seed))}


def features(b: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(b, D, generator=g), "logits": torch.randn(b, K, generator=g)}


class Capture:
    """Forward hooks that keep each named module's positional inputs and output."""

    def __init__(self, **modules: nn.Module) -> None:
        self.inputs: dict[str, tuple] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, out):
            self.inputs[name], self.outputs[name] = args, out

        return hook


# ---- recipe 1 -----------------------------------------------------------------------------------------
def test_recipe1_queries_start_from_zero_content_with_22_position_embeddings_and_1d_sine_positions():
    model = recipe1().eval()
    cap = Capture(first=model.decoder[0], second=model.decoder[1])
    with torch.no_grad():
        model(tokens())
    x, _, query_pos, memory_pos = cap.inputs["first"]
    assert model.queries.weight.shape == (NUM_AUS + NUM_EXPR + 2, DIM)  # 12 AU + 10 shared EXPR/VA
    assert x.shape == (6, 22, DIM) and torch.count_nonzero(x) == 0  # content starts at zero
    torch.testing.assert_close(query_pos[0], model.queries.weight)  # the embedding is the position only
    assert cap.inputs["second"][0].abs().sum() > 0  # the decoder fills the content
    one_d = sine_1d(torch.arange(N).float(), DIM)
    torch.testing.assert_close(memory_pos[0], one_d)
    assert not torch.allclose(one_d, token_positions(N, DIM))  # ours: 2-D on the 4x4 grid


def test_recipe1_gcn_runs_over_the_10_nodes_left_after_dropping_two_and_feeds_one_mean_to_expr_and_va():
    model = recipe1(dropped_aus=[3, 7]).eval()
    head = model.graph_head
    assert head.kept.tolist() == [i for i in range(NUM_AUS) if i not in (3, 7)]
    assert len(head.node_graph) == 2 and head.maps.shape == (10, DIM, DIM)
    assert not any("bias" in n for n, _ in head.named_parameters() if n.startswith("maps"))
    assert not hasattr(model, "select") and not hasattr(model, "query_linear")  # our routing is absent
    cap = Capture(
        au=head.au_graph,
        g1=head.node_graph[0],
        g2=head.node_graph[1],
        expr=model.expr_head,
        va=model.va_head,
        last=model.decoder[-1],
    )
    with torch.no_grad():
        out = model(tokens())
    assert cap.outputs["au"].shape == (6, 12, DIM)
    torch.testing.assert_close(cap.inputs["g1"][0], cap.outputs["au"][:, head.kept])  # 10 nodes, in order
    assert cap.inputs["g1"][1].shape == (6, 10, 10) and cap.inputs["g2"][0].shape == (6, 10, DIM)
    # residual with the 10 shared query outputs, one bias-free map per node, the mean to both heads
    shared = cap.outputs["last"][:, NUM_AUS:]
    h = torch.einsum("bni,nio->bno", cap.outputs["g2"] + shared, head.maps).mean(1)
    torch.testing.assert_close(cap.inputs["expr"][0], h)
    torch.testing.assert_close(cap.inputs["va"][0], h)
    torch.testing.assert_close(out["expr"], model.expr_head(h))


def test_recipe1_va_is_not_squashed_by_tanh_and_predictions_are_clamped():
    model = recipe1()
    with torch.no_grad():
        model.va_head.bias.fill_(3.0)
    cap = Capture(va=model.va_head)
    model.train()
    out = model(tokens())
    torch.testing.assert_close(out["va"], cap.outputs["va"])  # the linear head's output as is
    assert out["va"].min() > 1.0  # no tanh: the CCC loss sees values beyond 1
    out["va"].sum().backward()
    assert model.va_head.bias.grad is not None and (model.va_head.bias.grad == 6).all()  # d/dbias = batch
    model.eval()
    with torch.no_grad():
        assert (model(tokens())["va"] == 1.0).all()


def test_recipe1_dropped_nodes_are_a_model_property_independent_of_the_batch():
    """The peer's bug kept out: its drop mask had a row per batch position and never got a gradient."""
    model = recipe1().eval()
    assert len(model.dropped_aus or []) == 2 and set(model.dropped_aus or []) <= set(range(NUM_AUS))
    head = model.graph_head
    cap = Capture(au=head.au_graph, g1=head.node_graph[0])
    batch = tokens(b=6)
    with torch.no_grad():
        full = model(batch)
        perm = torch.tensor([5, 2, 0, 4, 1, 3])
        permuted = model({"tokens": batch["tokens"][perm]})
        for task in full:  # a sample's outputs do not depend on its place in the batch
            torch.testing.assert_close(permuted[task], full[task][perm])
        for b in (1, 3, 6):  # the same two nodes leave every sample, whatever the batch size
            model(tokens(b=b, seed=b))
            torch.testing.assert_close(cap.inputs["g1"][0], cap.outputs["au"][:, head.kept])
    assert not any(p.shape[0] == 6 for p in model.parameters())  # nothing sized by the batch
    # every parameter of the published head trains (the peer's mask did not)
    model.train()
    out = model(tokens())
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_recipe1_config_rebuilds_the_published_model_and_ours_reads_as_before():
    model = recipe1().eval()
    config = yaml.safe_load(yaml.safe_dump(model.config()))
    assert config["variant"] == "published" and len(config["dropped_aus"]) == 2
    rebuilt = create_model("queries-gcn", **config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        a, b = model(tokens()), rebuilt(tokens())
    for task in a:
        torch.testing.assert_close(a[task], b[task])
    ours = create_model("queries-gcn", feature_dim=D, token_shape=(N, C), dim=DIM, heads=4)
    assert "variant" not in ours.config() and "dropped_aus" not in ours.config()
    for bad in ([1], [2, 2], [0, 12]):
        with pytest.raises(ValueError, match="dropped_aus"):
            recipe1(dropped_aus=bad)
    with pytest.raises(ValueError, match="variant"):
        recipe1(variant="peer")


def test_recipe1_published_adjacency_picks_the_top_k_with_the_node_itself_a_candidate():
    nodes = torch.tensor([[[3.0, 0.0], [2.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    adj = topk_adjacency_with_self(nodes, 2)
    links = adj[0] > 0
    assert links.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]
    torch.testing.assert_close(adj[0][links], torch.full((8,), 0.5))  # D^-1/2 A D^-1/2, degree 2


# ---- recipe 2 -----------------------------------------------------------------------------------------
def test_recipe2_au_nodes_are_dense_layers_as_wide_as_the_input_with_batchnorm_over_the_nodes():
    model = recipe2()
    branch = model.au_branch
    in_dim = D + K
    assert branch.weight.shape == (NUM_AUS, in_dim, in_dim) and branch.drop.p == 0.5
    assert branch.node_norm.num_features == NUM_AUS * in_dim  # one BatchNorm per node's Dense
    assert branch.graph_norm.num_features == NUM_AUS  # the graph layer's BatchNorm runs over the nodes
    assert branch.U.bias is not None and branch.V.bias is not None
    assert not hasattr(model, "expr_va")  # our trunk is absent
    # dropout: an independent mask per node (the peer's 12 Dense modules each drop their own input)
    model.train()
    torch.manual_seed(3)
    x = torch.ones(4, in_dim)
    seen: dict[str, torch.Tensor] = {}
    branch.drop.register_forward_hook(lambda m, a, o: seen.setdefault("dropped", o))
    branch(x)
    masks = seen["dropped"] != 0
    assert masks.shape == (4, NUM_AUS, in_dim) and not (masks[:, :1] == masks).all()


def test_recipe2_cosine_is_the_au_probability():
    model = recipe2().eval()
    batch = features()
    with torch.no_grad():
        out = model(batch)
        x = torch.cat([batch["features"], batch["logits"]], -1)
        cos = model.au_branch(x)
    assert ((cos >= 0) & (cos <= 1)).all()  # ReLU-ed nodes and class vectors: a cosine in [0, 1]
    prob = torch.sigmoid(out["au"])
    torch.testing.assert_close(prob, cos, atol=1e-5, rtol=0)
    # by hand: the cosine of each graph node with its ReLU-ed class vector, as the probability
    branch = model.au_branch
    cap = Capture(dense=branch.node_norm, graph=branch.graph_norm)
    with torch.no_grad():
        model(batch)
        nodes = F.relu(cap.outputs["dense"].reshape(6, NUM_AUS, D + K))  # Dense: linear, BN, ReLU
        nodes = F.relu(nodes + cap.outputs["graph"])  # relu(x + BN_nodes(A V(x) + U(x)))
        cls = F.relu(branch.class_vectors)
        by_hand = (nodes * cls).sum(-1) / (nodes.norm(dim=-1) * cls.norm(dim=-1))
    torch.testing.assert_close(prob, by_hand, atol=1e-5, rtol=0)
    # training: WAL on sigmoid(logit) is WAL on the cosine (as the peer's loss on its probabilities)
    model.train()
    torch.manual_seed(0)
    logit = model(batch)["au"]
    torch.manual_seed(0)
    c = model.au_branch(x)
    torch.testing.assert_close(F.logsigmoid(logit), torch.log(c.clamp(1e-6, 1 - 1e-6)), atol=1e-5, rtol=0)


def test_recipe2_expr_attention_is_keyed_by_the_8_expr_logits_and_queried_by_the_au_cosines():
    model = recipe2().eval()
    branch = model.expr_branch
    assert branch.Wq.in_features == NUM_AUS and branch.Wk.in_features == 1  # one scalar key per class
    assert branch.Wq.bias is None and branch.Wk.bias is None and branch.w.bias is None
    batch = features()
    x = torch.cat([batch["features"], batch["logits"]], -1)
    with torch.no_grad():
        out = model(batch)
        e = branch.head(x)
        alpha = out["expr"] / e
        torch.testing.assert_close(alpha.sum(-1), torch.ones(6))  # softmax weights times the logits
        assert (alpha > 0).all()
        cos = model.au_branch(x)
        # the weights depend on the AU cosines (the query) and on the logits (the keys)
        other = branch(x, 1 - cos) / e
        assert not torch.allclose(other, alpha)
        scores = branch.w(torch.tanh(branch.Wq(cos).unsqueeze(1) + branch.Wk(e.unsqueeze(-1)))).squeeze(-1)
        torch.testing.assert_close(alpha, scores.softmax(-1))


def test_recipe2_expr_branch_is_the_shared_attention_block_with_the_published_parameters():
    """The branch reuses models.blocks.AdditiveAttention without moving a published parameter: the same
    names and sizes (checkpoints load strictly), the same draws from a seed, the block's formula."""
    from mtaffect.models.blocks import AdditiveAttention
    from mtaffect.models.recipe2_au_graph import PublishedExprBranch

    in_dim, attn_dim = D + K, 5
    torch.manual_seed(7)
    branch = PublishedExprBranch(in_dim, attn_dim)
    assert isinstance(branch, AdditiveAttention)
    shapes = {n: tuple(p.shape) for n, p in branch.named_parameters()}
    assert shapes == {
        "head.weight": (NUM_EXPR, in_dim),
        "head.bias": (NUM_EXPR,),
        "Wq.weight": (attn_dim, 12),
        "Wk.weight": (attn_dim, 1),
        "w.weight": (1, attn_dim),
    }
    torch.manual_seed(7)  # the layers drawn in the published order: head first, then Wq, Wk, w
    head = nn.Linear(in_dim, NUM_EXPR)
    nn.init.normal_(head.weight, 0.0, (1.0 / NUM_EXPR) ** 0.5)
    wq = nn.Linear(NUM_AUS, attn_dim, bias=False)
    wk = nn.Linear(1, attn_dim, bias=False)
    w = nn.Linear(attn_dim, 1, bias=False)
    drawn = {
        "head.weight": head.weight,
        "head.bias": head.bias,
        "Wq.weight": wq.weight,
        "Wk.weight": wk.weight,
        "w.weight": w.weight,
    }
    for name, value in branch.state_dict().items():
        torch.testing.assert_close(value, drawn[name], rtol=0, atol=0)
    other = PublishedExprBranch(in_dim, attn_dim)
    other.load_state_dict({k: v.detach() for k, v in drawn.items()}, strict=True)
    x, au = torch.randn(4, in_dim), torch.rand(4, NUM_AUS)
    with torch.no_grad():
        e = head(x)
        alpha = (w(torch.tanh(wq(au).unsqueeze(1) + wk(e.unsqueeze(-1))))).squeeze(-1).softmax(-1)
        torch.testing.assert_close(other(x, au), alpha * e, rtol=0, atol=1e-7)
    assert sum(p.numel() for p in recipe2().parameters()) == 10438  # the published model, D=16, K=8


def test_recipe2_va_is_tanh_of_batchnorm_and_trains_as_three_task_stages():
    model = recipe2().eval()
    batch = features()
    x = torch.cat([batch["features"], batch["logits"]], -1)
    with torch.no_grad():
        va = model(batch)["va"]
        torch.testing.assert_close(va, torch.tanh(model.va_branch.norm(model.va_branch.head(x))))
    stages = model.stages()
    assert [(s.name, s.tasks, s.train_modules) for s in stages] == [
        ("au", ("au",), ("au_branch",)),
        ("expr", ("expr",), ("expr_branch",)),
        ("va", ("va",), ("va_branch",)),
    ]
    covered = {
        f"{m}.{n}" for s in stages for m in s.train_modules for n, _ in getattr(model, m).named_parameters()
    }
    assert covered == {n for n, _ in model.named_parameters()}  # every parameter trains in one stage
    assert [s.name for s in recipe2(joint=True).stages()] == ["joint"]
    config = yaml.safe_load(yaml.safe_dump(model.config()))
    rebuilt = create_model("au-graph", **config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(batch)["expr"], model(batch)["expr"])
    assert "variant" not in create_model("au-graph", feature_dim=D).config()  # ours reads as before


# ---- the published configs through the CLI ------------------------------------------------------------
def _labels(names: list[str], rng: np.random.Generator) -> pd.DataFrame:
    n = len(names)
    df = pd.DataFrame(
        {
            "image": names,
            "valence": rng.uniform(-1, 1, n),
            "arousal": rng.uniform(-1, 1, n),
            "expression": rng.integers(0, NUM_EXPR, n),
        }
    )
    aus = rng.integers(0, 2, (n, NUM_AUS))
    aus[0] = 1  # every AU positive at least once, every class present
    df["expression"] = np.arange(n) % NUM_EXPR
    for j, au in enumerate(AU_NAMES):
        df[au] = aus[:, j]
    return df


@pytest.mark.slow
def test_au_graph_published_config_trains_its_three_task_stages_through_the_cli(tmp_path: Path):
    from mtaffect.data.annotations import LabelTable, write_annotations

    rng = np.random.default_rng(0)
    train = [f"v{v}/{f:05d}.jpg" for v in range(3) for f in range(1, 25)]
    val = [f"w{v}/{f:05d}.jpg" for v in range(2) for f in range(1, 17)]
    names = train + val
    write_store_by_hand(
        tmp_path / "store", names, rng.normal(size=(len(names), D)), logits=rng.normal(size=(len(names), K))
    )
    root = tmp_path / "root"
    write_annotations(LabelTable.from_frame(_labels(train, rng)), root / "training_set_annotations.txt")
    write_annotations(LabelTable.from_frame(_labels(val, rng)), root / "validation_set_annotations.txt")
    out = run(
        "train",
        "--config",
        CONFIGS / "au_graph_published.yaml",
        "--features",
        tmp_path / "store",
        "--data",
        root,
        "--out",
        tmp_path / "run",
        "--no-progress",
        "-o",
        "trainer.epochs=1",
        "-o",
        "data.batch_size=16",
    )
    assert "P = " in out
    stages = sorted(p.name for p in (tmp_path / "run" / "stages").iterdir())
    assert stages == ["0-au", "1-expr", "2-va"], stages
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["model_config"]
    assert saved["variant"] == "published" and saved["dropout"] == 0.5
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["optim"]["schedule"] == "constant" and resolved["optim"]["decay_all"] is True
    assert resolved["optim"]["weight_decay"] == 1 / 256 and resolved["trainer"]["patience"] == 0
    stages = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]
    assert [(s["name"], s["tasks"]) for s in stages] == [("au", ["au"]), ("expr", ["expr"]), ("va", ["va"])]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("published")
    run("synth", "--out", tmp / "data", "--videos", "4", "--frames", "12", "--seed", "2")
    return tmp / "data"


@pytest.mark.slow
def test_queries_gcn_published_config_trains_from_images_through_the_cli(synth_data: Path, tmp_path: Path):
    tiny = [
        "backbone.weights=null",
        "backbone.image_size=56",
        "model.hparams.dim=16",
        "model.hparams.blocks=2",
        "model.hparams.heads=2",
        "model.hparams.ffn_dim=32",
        "model.hparams.dropped_aus=[0, 5]",
        "backbone.options.config={hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,"
        " mlp_ratio: 2, patch_size: 14, image_size: 518}",
        "trainer.epochs=1",
        "data.workers=0",
        "data.batch_size=16",
    ]
    overrides = [x for o in tiny for x in ("--override", o)]
    out = run(
        "train",
        "--config",
        CONFIGS / "queries_gcn_published.yaml",
        "--data",
        synth_data,
        "--out",
        tmp_path / "run",
        "--no-progress",
        *overrides,
    )
    assert "P = " in out
    run_dir = tmp_path / "run"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["optim"]["schedule"] == "warmup_constant" and resolved["optim"]["weight_decay"] == 0
    assert resolved["trainer"]["patience"] == 0 and resolved["trainer"]["checkpoint_per_task"] is True
    for task in ("au", "expr", "va"):  # each task's own best epoch, as the peer's epoch_{au,expr,va}
        saved = json.loads((run_dir / "per_task" / task / "config.json").read_text())["model_config"]
        assert saved["variant"] == "published" and saved["dropped_aus"] == [0, 5]
    assert json.loads((run_dir / "metrics.json").read_text())["checkpoint_per_task"]
