"""Recipe 1: task-adaptive queries + AU-assisted GCN over patch tokens (Li, Du, Yang; ABAW7).

Patch tokens (DINOv2 ViT-g at 238 px: 289 x 1536) are reduced to ``dim`` channels; 22 learnable
queries (12 AU, 8 EXPR, 2 VA) read them through DETR-style decoder blocks. Each AU query gives its AU
logit; the AU queries also form a per-sample graph whose node features are routed to the 10 EXPR/VA
queries through a *learned* node selection (the peer's selection mask had no gradient and depended on
the batch size; here it is a softmax over the 12 AU nodes per EXPR/VA query, a model parameter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.blocks import (
    DecoderBlock,
    GraphConv,
    NodeLinear,
    flatten_leading,
    require_input,
    token_positions,
    topk_adjacency,
    unflatten_leading,
)
from mtaffect.models.registry import register_model
from mtaffect.schema import NUM_AUS, NUM_EXPR

NUM_VA = 2
NODE_SELECTIONS = ("learned", "mean")


class NodeSelection(nn.Module):
    """Routes the 12 AU node features to the EXPR/VA queries: (B, 12, D) -> (B, Q, D).

    ``learned``: each query takes a softmax-weighted mix of the AU nodes with its own learnable
    logits (initialised to zero = the mean). ``mean``: the fixed mean of the nodes (no parameters).
    Either way the routing is a property of the model, identical for every sample and batch size.
    """

    def __init__(self, queries: int, nodes: int, dim: int, mode: str = "learned") -> None:
        super().__init__()
        if mode not in NODE_SELECTIONS:
            raise ValueError(f"node_selection must be one of {NODE_SELECTIONS}, got {mode!r}")
        self.queries, self.nodes, self.mode = queries, nodes, mode
        self.logits = nn.Parameter(torch.zeros(queries, nodes)) if mode == "learned" else None
        self.proj = nn.Linear(dim, dim)

    def weights(self) -> torch.Tensor:
        """(Q, nodes) routing weights, each row summing to 1."""
        if self.logits is None:
            return torch.full((self.queries, self.nodes), 1.0 / self.nodes, device=self.proj.weight.device)
        return self.logits.softmax(-1)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.einsum("qn,bnd->bqd", self.weights().to(nodes.dtype), nodes))


@register_model("queries-gcn")
class QueriesGCN(MTLModel):
    """Task-adaptive queries over patch tokens with an AU graph feeding the EXPR/VA queries."""

    recipe = "queries-gcn"
    inputs = ("tokens",)

    def __init__(
        self,
        feature_dim: int,
        num_logits: int = 0,
        token_shape: Sequence[int] | None = None,
        dim: int = 128,
        blocks: int = 4,
        heads: int = 8,
        ffn_dim: int = 512,
        dropout: float = 0.1,
        topk: int = 4,
        node_selection: str = "learned",
    ) -> None:
        super().__init__()
        if token_shape is None:
            raise ValueError(
                "recipe 'queries-gcn' reads patch tokens: extract features with a backbone that has "
                "tokens (e.g. dinov2) and pass token_shape=(tokens, channels)"
            )
        if blocks < 1:
            raise ValueError(f"queries-gcn needs at least one decoder block, got blocks={blocks}")
        self.feature_dim, self.num_logits = int(feature_dim), int(num_logits)
        self.token_shape = (int(token_shape[0]), int(token_shape[1]))
        self.dim, self.num_blocks, self.heads, self.ffn_dim = dim, blocks, heads, ffn_dim
        self.dropout, self.topk, self.node_selection = dropout, topk, node_selection
        channels = self.token_shape[1]
        # two 1x1 convolutions over the token grid == two linear maps over the channel axis
        self.reduce = nn.Sequential(nn.Linear(channels, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        n_queries = NUM_AUS + NUM_EXPR + NUM_VA
        self.queries = nn.Embedding(n_queries, dim)  # content and positional embedding of each query
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, heads, ffn_dim, dropout, self_attention=i > 0) for i in range(blocks)
        )
        self.au_head = NodeLinear(NUM_AUS, dim, 1)  # each AU query dotted with its own weight row
        self.graph = GraphConv(dim)
        self.select = NodeSelection(NUM_EXPR + NUM_VA, NUM_AUS, dim, node_selection)
        self.query_linear = NodeLinear(NUM_EXPR + NUM_VA, dim, dim)  # one linear layer per query
        self.expr_head = nn.Linear(dim, NUM_EXPR)
        self.va_head = nn.Linear(dim, NUM_VA)

    def config(self) -> dict:
        return {
            "feature_dim": self.feature_dim, "num_logits": self.num_logits,
            "token_shape": list(self.token_shape),
            "dim": self.dim, "blocks": self.num_blocks, "heads": self.heads, "ffn_dim": self.ffn_dim,
            "dropout": self.dropout, "topk": self.topk, "node_selection": self.node_selection,
        }  # fmt: skip

    def stages(self) -> list[Stage]:
        return [Stage("joint")]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = require_input(batch, "tokens", self.recipe, (self.token_shape[1],))
        if tokens.ndim < 3:
            raise ValueError(f"recipe 'queries-gcn': tokens must be (..., N, C), got {tuple(tokens.shape)}")
        x, lead = flatten_leading(tokens, 2)
        memory = self.reduce(x)
        memory_pos = token_positions(memory.shape[1], self.dim, memory.device).to(memory.dtype).unsqueeze(0)
        query_pos = self.queries.weight.unsqueeze(0)
        q = query_pos.expand(memory.shape[0], -1, -1)
        for block in self.decoder:
            q = block(q, memory, query_pos, memory_pos)
        au_q, ev_q = q[:, :NUM_AUS], q[:, NUM_AUS:]
        au = self.au_head(au_q).squeeze(-1)
        nodes = self.graph(au_q, topk_adjacency(au_q, self.topk))
        h = self.query_linear(ev_q + self.select(nodes))
        expr = self.expr_head(h[:, :NUM_EXPR].mean(1))
        va = torch.tanh(self.va_head(h[:, NUM_EXPR:].mean(1)))
        return {"au": unflatten_leading(au, lead), "expr": unflatten_leading(expr, lead),
                "va": unflatten_leading(va, lead)}  # fmt: skip
