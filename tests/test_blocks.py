"""Shared model blocks: the AU graph, attention, decoder blocks and temporal modules behave as documented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtaffect.models.blocks import (
    TEMPORAL_KINDS,
    AdditiveAttention,
    DecoderBlock,
    GraphConv,
    NodeLinear,
    ResidualGraphConv,
    create_temporal,
    flatten_leading,
    require_input,
    token_positions,
    topk_adjacency,
    unflatten_leading,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_topk_adjacency_rows_are_normalised_and_follow_the_topk_neighbours():
    nodes = torch.randn(3, 12, 8)
    adj = topk_adjacency(nodes, k=4)
    assert adj.shape == (3, 12, 12)
    torch.testing.assert_close(adj.sum(-1), torch.ones(3, 12))
    sim = nodes @ nodes.transpose(1, 2)
    for b in range(3):
        for i in range(12):
            others = [j for j in range(12) if j != i]
            expected = {others[j] for j in sim[b, i, others].topk(4).indices.tolist()} | {i}
            linked = set(torch.nonzero(adj[b, i]).flatten().tolist())
            assert linked == expected  # the 4 most similar other nodes, plus the self loop
            torch.testing.assert_close(adj[b, i, sorted(linked)], torch.full((5,), 0.2))  # D^-1/2 A D^-1/2


def test_topk_adjacency_without_self_loop_and_bad_k():
    adj = topk_adjacency(torch.randn(2, 6, 4), k=2, self_loop=False)
    assert torch.all((adj > 0).sum(-1) == 2) and torch.all(adj.diagonal(dim1=1, dim2=2) == 0)
    with pytest.raises(ValueError, match="0 < k < number of nodes"):
        topk_adjacency(torch.randn(1, 4, 3), k=4)


def test_topk_adjacency_is_per_sample():
    nodes = torch.randn(5, 12, 8)
    torch.testing.assert_close(topk_adjacency(nodes[2:3], 4)[0], topk_adjacency(nodes, 4)[2])


def test_graph_layers_keep_node_shapes_and_use_the_adjacency():
    x = torch.randn(4, 12, 16)
    adj = topk_adjacency(x, 4)
    for layer in (GraphConv(16), ResidualGraphConv(16)):
        layer.eval()
        out = layer(x, adj)
        assert out.shape == (4, 12, 16) and torch.all(out >= 0)  # ends in a ReLU
        other = topk_adjacency(torch.randn(4, 12, 16), 4)
        assert not torch.allclose(out, layer(x, other))  # messages follow the graph
    assert GraphConv(16, 8)(x, adj).shape == (4, 12, 8)


def test_node_linear_is_one_linear_layer_per_node():
    layer = NodeLinear(3, 5, 2)
    x = torch.randn(4, 3, 5)
    out = layer(x)
    for n in range(3):
        torch.testing.assert_close(out[:, n], x[:, n] @ layer.weight[n] + layer.bias[n])
    shared = NodeLinear(3, 5, 2, shared_input=True)
    v = torch.randn(4, 5)
    torch.testing.assert_close(shared(v)[:, 1], v @ shared.weight[1] + shared.bias[1])


def test_additive_attention_weights_sum_to_one_over_the_classes_and_follow_the_formula():
    attn = AdditiveAttention(query_dim=12, key_dim=6, attn_dim=10)
    q, k = torch.rand(4, 12), torch.randn(4, 8, 6)
    w = attn(q, k)
    assert w.shape == (4, 8) and torch.all(w > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    scores = torch.stack([attn.w(torch.tanh(attn.Wq(q) + attn.Wk(k[:, c]))).squeeze(-1) for c in range(8)], 1)
    torch.testing.assert_close(w, scores.softmax(-1))
    assert not torch.allclose(w, attn(torch.rand(4, 12), k))  # the query changes the weights


def test_token_positions_are_2d_on_a_square_grid_and_distinct():
    pos = token_positions(289, 128)  # DINOv2 at 238 px: 17 x 17
    assert pos.shape == (289, 128)
    torch.testing.assert_close(pos[0, :64], pos[16, :64])  # same row -> same row half
    torch.testing.assert_close(pos[0, 64:], pos[17, 64:])  # same column -> same column half
    assert torch.unique(pos, dim=0).shape[0] == 289
    assert token_positions(10, 6).shape == (10, 6)  # not a square: 1-D positions, any dimension


def test_decoder_block_shapes_and_first_block_has_no_self_attention():
    first, later = DecoderBlock(32, 4, 64, 0.1, False), DecoderBlock(32, 4, 64, 0.1, True)
    assert first.self_attn is None and later.self_attn is not None
    q, mem = torch.randn(2, 22, 32), torch.randn(2, 9, 32)
    qpos, mpos = torch.randn(1, 22, 32), token_positions(9, 32).unsqueeze(0)
    for block in (first, later):
        assert block(q, mem, qpos, mpos).shape == (2, 22, 32)


@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
def test_temporal_modules_keep_window_shapes(kind):
    module = create_temporal(kind, 16, **({"heads": 4} if kind == "transformer" else {}))
    x = torch.randn(3, 7, 16)
    assert module.eval()(x).shape == (3, 7, 16)
    if kind == "none":
        assert isinstance(module, nn.Identity)


@pytest.mark.parametrize(
    ("kind", "kw"), [("lstm", {}), ("tcn", {}), ("tcn", {"levels": 3}), ("transformer", {"causal": True})]
)
def test_causal_temporal_modules_never_look_ahead(kind, kw):
    module = create_temporal(kind, 16, **kw).eval()
    assert module.causal
    x = torch.randn(2, 10, 16)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 16)  # change the future only
    torch.testing.assert_close(module(x)[:, :6], module(y)[:, :6])
    assert not torch.allclose(module(x)[:, 6:], module(y)[:, 6:])


@pytest.mark.parametrize(("kind", "kw"), [("transformer", {}), ("tcn", {"causal": False})])
def test_non_causal_temporal_modules_see_the_whole_window(kind, kw):
    module = create_temporal(kind, 16, **kw).eval()
    x = torch.randn(2, 10, 16)
    y = x.clone()
    y[:, 6:] += 1.0
    assert not torch.allclose(module(x)[:, :6], module(y)[:, :6])


def test_create_temporal_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="unknown temporal module 'gru'"):
        create_temporal("gru", 8)


def test_flatten_leading_roundtrip():
    x = torch.randn(2, 3, 5, 4)
    flat, lead = flatten_leading(x, 2)
    assert flat.shape == (6, 5, 4) and lead == (2, 3)
    torch.testing.assert_close(unflatten_leading(flat, lead), x)


def test_require_input_names_the_missing_array_and_the_wrong_shape():
    with pytest.raises(KeyError, match="reads 'logits'"):
        require_input({"features": torch.zeros(2, 4)}, "logits", "emotinet", (7,))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 8\)"):
        require_input({"features": torch.zeros(2, 4)}, "features", "emotinet", (8,))


@pytest.mark.parametrize("layer_kind", [GraphConv, ResidualGraphConv])
def test_graph_layers_pass_messages_only_along_the_edges(layer_kind):
    layer = layer_kind(8).eval()  # BatchNorm on its running statistics: rows do not mix through the batch
    x = torch.randn(2, 6, 8)
    adj = torch.eye(6).expand(2, 6, 6).clone()
    adj[:, 0, 0], adj[:, 0, 4] = 0.5, 0.5  # node 0 hears node 4 and no other
    out = layer(x, adj)
    for other, heard in ((3, False), (4, True)):
        y = x.clone()
        y[:, other] += 1.0
        changed = layer(y, adj)
        torch.testing.assert_close(changed[:, [1, 2, 5]], out[:, [1, 2, 5]])  # no edge from `other`
        assert not torch.allclose(changed[:, other], out[:, other])
        assert torch.allclose(changed[:, 0], out[:, 0]) != heard


@pytest.mark.parametrize("self_attention", [False, True])
def test_decoder_blocks_treat_queries_as_a_set(self_attention):
    block = DecoderBlock(16, 2, 32, 0.1, self_attention).eval()
    q, mem = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    qpos, mpos = torch.randn(1, 5, 16), token_positions(9, 16).unsqueeze(0)
    out = block(q, mem, qpos, mpos)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(block(q[:, perm], mem, qpos[:, perm], mpos), out[:, perm])  # equivariant
    other = q.clone()
    other[:, 0] += 1.0
    changed = block(other, mem, qpos, mpos)
    # without self-attention a query reads the memory alone; with it, the other queries too
    assert torch.allclose(changed[:, 1:], out[:, 1:], atol=1e-6) == (not self_attention)
    assert not torch.allclose(block(q, mem + 1.0, qpos, mpos), out)  # the memory is read


@pytest.mark.parametrize("kind", TEMPORAL_KINDS)
def test_temporal_modules_run_each_window_on_its_own_and_see_frame_order(kind):
    module = create_temporal(kind, 16, **({"heads": 4} if kind == "transformer" else {})).eval()
    x = torch.randn(3, 7, 16)
    out = module(x)
    torch.testing.assert_close(module(x[1:2])[0], out[1], atol=1e-5, rtol=1e-5)  # no mixing across windows
    reversed_back = module(x.flip(1)).flip(1)
    # per-frame (none) is blind to the order; every temporal module is not
    assert torch.allclose(reversed_back, out, atol=1e-6) == (kind == "none")
