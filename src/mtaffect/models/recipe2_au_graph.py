"""Recipe 2: AU relation graph + multi-task cross attention (Nguyen et al.; ABAW4).

The AU branch encodes one node per AU from the frozen features (+ the backbone's logits), relates
them in a per-sample top-k graph and scores each node against a learnable class vector by cosine
similarity. The EXPR/VA branch is a shared trunk with a tanh VA head and EXPR logits re-weighted by
additive attention whose query is the 12 AU probabilities. As published it trains task-sequentially
(AU branch first, then frozen while EXPR and VA train); ``joint=True`` trains everything at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.blocks import (
    AdditiveAttention,
    NodeLinear,
    ResidualGraphConv,
    flatten_leading,
    require_input,
    topk_adjacency,
    unflatten_leading,
)
from mtaffect.models.registry import register_model
from mtaffect.schema import NUM_AUS, NUM_EXPR


class AUBranch(nn.Module):
    """Per-AU node encoders -> residual top-k graph layers -> cosine AU logits.

    Cosine similarity lies in [-1, 1]; BCE-with-logits needs a logit, so the AU logit is
    ``scale * cos(node_i, class_i) + bias_i`` with a positive scale (learnable by default, initial
    ``cos_scale``) and a per-AU bias that absorbs the AU's base rate.
    """

    def __init__(
        self, in_dim: int, node_dim: int, graph_layers: int, topk: int, cos_scale: float, learn_scale: bool
    ) -> None:
        super().__init__()
        self.topk = topk
        self.encoders = NodeLinear(NUM_AUS, in_dim, node_dim, shared_input=True)  # 12 node encoders
        self.encoder_norm = nn.LayerNorm(node_dim)
        self.graph = nn.ModuleList(ResidualGraphConv(node_dim) for _ in range(graph_layers))
        self.class_vectors = nn.Parameter(torch.randn(NUM_AUS, node_dim) / math.sqrt(node_dim))
        log_scale = torch.tensor(math.log(cos_scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.bias = nn.Parameter(torch.zeros(NUM_AUS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_dim) -> node features (B, 12, node_dim), AU logits (B, 12)."""
        nodes = F.relu(self.encoder_norm(self.encoders(x)))
        for layer in self.graph:
            nodes = layer(nodes, topk_adjacency(nodes, self.topk))
        cos = F.cosine_similarity(nodes, self.class_vectors.unsqueeze(0), dim=-1)
        return nodes, self.log_scale.exp() * cos + self.bias


class ExprVABranch(nn.Module):
    """Shared trunk; VA = tanh head; EXPR logits re-weighted by AU-queried additive attention.

    ``expr_c = e_c * C * alpha_c`` with ``alpha`` the attention over the C = 8 classes: a uniform
    attention leaves the logits unchanged, and the AU evidence scales each class up or down.
    """

    def __init__(self, in_dim: int, hidden: int, key_dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.expr_head = nn.Linear(hidden, NUM_EXPR)
        self.expr_keys = NodeLinear(NUM_EXPR, hidden, key_dim, shared_input=True)  # k_c per class
        self.attention = AdditiveAttention(NUM_AUS, key_dim, attn_dim)
        self.va_head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, au_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        alpha = self.attention(au_probs, self.expr_keys(h))
        return self.expr_head(h) * (NUM_EXPR * alpha), torch.tanh(self.va_head(h))


@register_model("au-graph")
class AUGraphMTL(MTLModel):
    """AU relation graph with AU-to-expression cross attention on pooled features (+ logits)."""

    recipe = "au-graph"
    inputs = ("features", "logits")

    def __init__(
        self,
        feature_dim: int,
        num_logits: int = 0,
        token_shape: Sequence[int] | None = None,
        node_dim: int = 64,
        graph_layers: int = 1,
        topk: int = 4,
        hidden: int = 256,
        key_dim: int = 32,
        attn_dim: int = 64,
        dropout: float = 0.1,
        cos_scale: float = 10.0,
        learn_scale: bool = True,
        joint: bool = False,
    ) -> None:
        super().__init__()
        if cos_scale <= 0:
            raise ValueError(f"cos_scale must be positive, got {cos_scale}")
        self.feature_dim, self.num_logits = int(feature_dim), int(num_logits)
        self.token_shape = tuple(token_shape) if token_shape is not None else None
        # the backbone's logits are optional: without them the model reads features only
        self.inputs = ("features", "logits") if self.num_logits else ("features",)
        self.hp = {
            "node_dim": node_dim, "graph_layers": graph_layers, "topk": topk, "hidden": hidden,
            "key_dim": key_dim, "attn_dim": attn_dim, "dropout": dropout, "cos_scale": cos_scale,
            "learn_scale": learn_scale, "joint": joint,
        }  # fmt: skip
        in_dim = self.feature_dim + self.num_logits
        self.au_branch = AUBranch(in_dim, node_dim, graph_layers, topk, cos_scale, learn_scale)
        self.expr_va = ExprVABranch(in_dim, hidden, key_dim, attn_dim, dropout)

    def config(self) -> dict:
        token_shape = list(self.token_shape) if self.token_shape is not None else None
        return {"feature_dim": self.feature_dim, "num_logits": self.num_logits, "token_shape": token_shape,
                **self.hp}  # fmt: skip

    def stages(self) -> list[Stage]:
        if self.hp["joint"]:
            return [Stage("joint")]
        return [
            Stage("au", tasks=("au",), train_modules=("au_branch",)),
            Stage("expr_va", tasks=("expr", "va"), train_modules=("expr_va",)),
        ]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = require_input(batch, "features", self.recipe, (self.feature_dim,))
        if self.num_logits:
            logits = require_input(batch, "logits", self.recipe, (self.num_logits,))
            x = torch.cat([x, logits.to(x.dtype)], dim=-1)
        x, lead = flatten_leading(x, 1)
        _, au = self.au_branch(x)
        expr, va = self.expr_va(x, torch.sigmoid(au))
        return {"au": unflatten_leading(au, lead), "expr": unflatten_leading(expr, lead),
                "va": unflatten_leading(va, lead)}  # fmt: skip
