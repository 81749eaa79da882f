"""Recipe 2: AU relation graph + multi-task cross attention (Nguyen et al.; ABAW4).

The AU branch encodes one node per AU from the frozen features (+ the backbone's logits), relates
them in a per-sample top-k graph and scores each node against a learnable class vector by cosine
similarity. The EXPR/VA branch is a shared trunk with a tanh VA head and EXPR logits re-weighted by
additive attention whose query is the 12 AU probabilities. As published it trains task-sequentially
(AU branch first, then frozen while EXPR and VA train); ``joint=True`` trains everything at once.

``variant="published"`` is the peer's network (khanhnd185/MTL-ABAW4, model.py ``AMTL``, block.py):
12 AU nodes, each ``Dense(in -> in)`` = dropout 0.5, linear, BatchNorm, ReLU (in = 1280 EfficientNet-B0
features + its 8 scores = 1288); one graph layer ``relu(x + BN_nodes(A V(x) + U(x)))`` with the
BatchNorm over the 12 nodes; the cosine of each node with its ReLU-ed class vector, in [0, 1], used
directly as the AU probability (the AU output is its logit, so sigmoid gives the cosine back); EXPR =
a linear layer whose 8 logits are the attention keys (one scalar each) and are re-weighted by additive
attention queried by the 12 AU cosines; VA = linear, BatchNorm, tanh. It trains as the peer's three
separate task runs: stages ``au``, ``expr`` (AU branch frozen) and ``va``, each on its own task's
loss and selecting its own best epoch.
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
    topk_adjacency_with_self,
    unflatten_leading,
)
from mtaffect.models.registry import register_model
from mtaffect.schema import NUM_AUS, NUM_EXPR

VARIANTS = ("ours", "published")
#: Published variant: the cosine is clamped to [COS_EPS, 1 - COS_EPS] before its logit is taken, so the
#: logit stays finite (the peer clamped the same way inside its loss's logarithms).
COS_EPS = 1e-6


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


class PublishedAUBranch(nn.Module):
    """The peer's ANFL head: per-AU Dense nodes -> one graph layer -> cosine with class vectors.

    Each of the 12 node encoders is ``Dense(in, in, bn, drop=0.5, relu)`` with its own dropout mask,
    weights and BatchNorm (as 12 separate modules); the graph layer's BatchNorm runs over the 12 nodes
    (``BatchNorm1d(12)`` on (B, 12, in)), not over the channels.
    """

    def __init__(self, in_dim: int, topk: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.topk = topk
        self.drop = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(NUM_AUS, in_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(NUM_AUS, in_dim))
        self.node_norm = nn.BatchNorm1d(NUM_AUS * in_dim)  # 12 BatchNorm1d(in), one per node
        self.U = nn.Linear(in_dim, in_dim)
        self.V = nn.Linear(in_dim, in_dim)
        self.graph_norm = nn.BatchNorm1d(NUM_AUS)  # over the nodes, as the peer's GNN.bnv
        self.class_vectors = nn.Parameter(torch.empty(NUM_AUS, in_dim))
        # the peer's initialisation: Dense N(0, 1/out), U/V N(0, 2/in), class vectors Xavier
        nn.init.normal_(self.weight, 0.0, math.sqrt(1.0 / in_dim))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default bias
        nn.init.uniform_(self.bias, -bound, bound)
        for lin in (self.U, self.V):
            nn.init.normal_(lin.weight, 0.0, math.sqrt(2.0 / in_dim))
        nn.init.xavier_uniform_(self.class_vectors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> AU cosines (B, 12) in [0, 1]."""
        b, d = x.shape
        h = self.drop(x.unsqueeze(1).expand(b, NUM_AUS, d))  # an independent mask per node
        h = torch.einsum("bni,nio->bno", h, self.weight.to(h.dtype)) + self.bias.to(h.dtype)
        nodes = F.relu(self.node_norm(h.reshape(b, -1)).reshape(b, NUM_AUS, d))
        adj = topk_adjacency_with_self(nodes, self.topk)
        nodes = F.relu(nodes + self.graph_norm(adj @ self.V(nodes) + self.U(nodes)))
        cls = F.normalize(F.relu(self.class_vectors), dim=-1).to(nodes.dtype)
        return (F.normalize(nodes, dim=-1) * cls.unsqueeze(0)).sum(-1)


class PublishedExprBranch(AdditiveAttention):
    """EXPR logits re-weighted by additive attention keyed by themselves: ``e_c <- alpha_c e_c``.

    ``alpha = softmax_c(w . tanh(Wq au + Wk e_c))`` with the 12 AU cosines as the query and each
    class's scalar logit as its key (every map bias-free, as the peer's ``AdditiveAttention``). The
    attention is the shared block itself (a subclass, so the parameter names ``Wq``/``Wk``/``w`` of
    published checkpoints stay where they were).
    """

    def __init__(self, in_dim: int, attn_dim: int) -> None:
        head = nn.Linear(in_dim, NUM_EXPR)  # made first: the random initialisation of a seed is unchanged
        nn.init.normal_(head.weight, 0.0, math.sqrt(1.0 / NUM_EXPR))  # the peer's Dense init
        super().__init__(NUM_AUS, 1, attn_dim, key_bias=False)
        self.head = head

    def forward(self, x: torch.Tensor, au_cos: torch.Tensor) -> torch.Tensor:
        e = self.head(x)
        return super().forward(au_cos.to(e.dtype), e.unsqueeze(-1)) * e


class PublishedVABranch(nn.Module):
    """VA = tanh(BN(linear(x))) (the peer's ``Dense(in, 2, activation='tanh', bn=True)``)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, 2)
        nn.init.normal_(self.head.weight, 0.0, math.sqrt(1.0 / 2))
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.head(x)))


def cosine_logit(cos: torch.Tensor) -> torch.Tensor:
    """The logit whose sigmoid is ``cos`` (clamped to [COS_EPS, 1 - COS_EPS]): a probability as a logit."""
    c = cos.float().clamp(COS_EPS, 1.0 - COS_EPS)
    return torch.log(c) - torch.log1p(-c)


@register_model("au-graph")
class AUGraphMTL(MTLModel):
    """AU relation graph with AU-to-expression cross attention on pooled features (+ logits)."""

    recipe = "au-graph"
    inputs: tuple[str, ...] = ("features", "logits")

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
        dropout: float | None = None,
        cos_scale: float = 10.0,
        learn_scale: bool = True,
        joint: bool = False,
        variant: str = "ours",
    ) -> None:
        """``dropout``: ours, the trunk's (default 0.1); published, the AU nodes' (default 0.5, as the
        peer's). ``variant="published"`` reads ``topk``, ``attn_dim``, ``dropout`` and ``joint``; its nodes
        are as wide as the input, so the other sizes are unused."""
        super().__init__()
        if cos_scale <= 0:
            raise ValueError(f"cos_scale must be positive, got {cos_scale}")
        if variant not in VARIANTS:
            raise ValueError(f"au-graph variant must be one of {VARIANTS}, got {variant!r}")
        if dropout is None:
            dropout = 0.5 if variant == "published" else 0.1
        self.feature_dim, self.num_logits = int(feature_dim), int(num_logits)
        self.token_shape = tuple(token_shape) if token_shape is not None else None
        # the backbone's logits are optional: without them the model reads features only
        self.inputs = ("features", "logits") if self.num_logits else ("features",)
        self.hp: dict[str, object] = {
            "node_dim": node_dim,
            "graph_layers": graph_layers,
            "topk": topk,
            "hidden": hidden,
            "key_dim": key_dim,
            "attn_dim": attn_dim,
            "dropout": dropout,
            "cos_scale": cos_scale,
            "learn_scale": learn_scale,
            "joint": joint,
        }
        self.published = variant == "published"
        if self.published:  # configs of our variant read as before the key
            self.hp["variant"] = variant
        in_dim = self.feature_dim + self.num_logits
        if self.published:
            self.au_branch: PublishedAUBranch | AUBranch = PublishedAUBranch(in_dim, topk, dropout)
            self.expr_branch = PublishedExprBranch(in_dim, attn_dim)
            self.va_branch = PublishedVABranch(in_dim)
        else:
            self.au_branch = AUBranch(in_dim, node_dim, graph_layers, topk, cos_scale, learn_scale)
            self.expr_va = ExprVABranch(in_dim, hidden, key_dim, attn_dim, dropout)

    def config(self) -> dict:
        token_shape = list(self.token_shape) if self.token_shape is not None else None
        return {
            "feature_dim": self.feature_dim,
            "num_logits": self.num_logits,
            "token_shape": token_shape,
            **self.hp,
        }

    def stages(self) -> list[Stage]:
        if self.hp["joint"]:
            return [Stage("joint")]
        if self.published:  # the peer's three runs (train.py --task AU / EX / VA), AU first
            return [
                Stage("au", tasks=("au",), train_modules=("au_branch",)),
                Stage("expr", tasks=("expr",), train_modules=("expr_branch",)),
                Stage("va", tasks=("va",), train_modules=("va_branch",)),
            ]
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
        if self.published:
            cos = self.au_branch(x)
            au = cosine_logit(cos)
            expr, va = self.expr_branch(x, cos), self.va_branch(x)
        else:
            _, au = self.au_branch(x)
            expr, va = self.expr_va(x, torch.sigmoid(au))
        return {
            "au": unflatten_leading(au, lead),
            "expr": unflatten_leading(expr, lead),
            "va": unflatten_leading(va, lead),
        }
