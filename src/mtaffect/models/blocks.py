"""Building blocks shared by the recipes: AU relation graphs, attention, decoder blocks, temporal modules.

Each block is small and documented with the shape it expects, so a recipe reads as a composition of
published ideas rather than a tangle of tensor reshapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# ---- shape helpers ------------------------------------------------------------------------------------


def flatten_leading(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Merge every axis but the last ``keep`` into one batch axis; return the leading shape to restore.

    Per-frame recipes accept (B, ...) rows and (B, T, ...) windows alike through this.
    """
    lead = tuple(x.shape[: x.ndim - keep])
    return x.reshape(-1, *x.shape[x.ndim - keep :]), lead


def unflatten_leading(x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`flatten_leading` for an output whose first axis is the merged batch."""
    return x.reshape(*lead, *x.shape[1:])


def require_input(
    batch: Mapping[str, torch.Tensor], key: str, recipe: str, tail: tuple[int, ...]
) -> torch.Tensor:
    """The array ``key`` of a batch, checked against the trailing shape the model was built for."""
    if key not in batch:
        raise KeyError(
            f"recipe {recipe!r} reads {key!r} but the batch has only {sorted(batch)}; "
            f"use a feature store with {key} (see the backbone's spec) or rebuild the model without it"
        )
    x = batch[key]
    if tuple(x.shape[x.ndim - len(tail) :]) != tail or x.ndim <= len(tail):
        raise ValueError(
            f"recipe {recipe!r}: {key} has shape {tuple(x.shape)}, expected (..., "
            f"{', '.join(map(str, tail))}); "
            "the model was built for another backbone: rebuild it with this store's dimensions"
        )
    return x


class NodeLinear(nn.Module):
    """``nodes`` independent linear maps applied node-wise: (B, nodes, in) -> (B, nodes, out).

    Mathematically the same as ``nodes`` separate ``nn.Linear`` layers, computed in one einsum. With
    ``shared_input`` the input is one vector (B, in) that every node's map reads (per-node encoders).
    """

    def __init__(self, nodes: int, in_dim: int, out_dim: int, shared_input: bool = False) -> None:
        super().__init__()
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.empty(nodes, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(nodes, out_dim))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per node
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            return torch.einsum("bi,nio->bno", x, self.weight) + self.bias
        return torch.einsum("bni,nio->bno", x, self.weight) + self.bias


# ---- AU relation graph --------------------------------------------------------------------------------


def topk_adjacency(nodes: torch.Tensor, k: int, self_loop: bool = True) -> torch.Tensor:
    """Per-sample adjacency from each node's top-``k`` dot-product neighbours, normalised.

    ``nodes`` (B, N, D) -> (B, N, N). Row i links node i to the ``k`` other nodes with the largest
    dot product (plus itself when ``self_loop``); the 0/1 matrix is then symmetrically normalised,
    ``D^-1/2 A D^-1/2`` with D the (constant) row degree, so every row sums to 1. The neighbour choice
    depends only on the sample itself, never on the rest of the batch. The selection is a hard top-k
    (no gradient through the indices); gradients reach the node features through the messages.
    """
    b, n, _ = nodes.shape
    if not 0 < k < n:
        raise ValueError(f"top-k adjacency needs 0 < k < number of nodes ({n}), got k={k}")
    sim = nodes @ nodes.transpose(1, 2)
    eye = torch.eye(n, dtype=torch.bool, device=nodes.device)
    sim = sim.masked_fill(eye, float("-inf"))  # choose k *other* nodes
    idx = sim.topk(k, dim=-1).indices
    adj = torch.zeros(b, n, n, dtype=nodes.dtype, device=nodes.device)
    adj.scatter_(-1, idx, 1.0)
    if self_loop:
        adj = adj + eye.to(nodes.dtype)
    deg_inv_sqrt = adj.sum(-1).clamp_min(1e-12).rsqrt()
    return deg_inv_sqrt.unsqueeze(-1) * adj * deg_inv_sqrt.unsqueeze(-2)


def topk_adjacency_with_self(nodes: torch.Tensor, k: int) -> torch.Tensor:
    """ME-GraphAU's per-sample adjacency (both published recipe-1 and recipe-2 peers use it).

    ``nodes`` (B, N, D) -> (B, N, N). Row i links node i to every node whose dot product with it
    reaches the row's ``k``-th largest, the node itself a candidate like any other (so usually k
    links, itself included; ties add links), then ``D^-1/2 A D^-1/2`` with D the row degrees. Unlike
    :func:`topk_adjacency` there is no forced self-loop and the k links may include the node itself;
    the similarity is detached, so no gradient flows through the choice of neighbours.
    """
    _, n, _ = nodes.shape
    if not 0 < k <= n:
        raise ValueError(f"top-k adjacency needs 0 < k <= number of nodes ({n}), got k={k}")
    sim = nodes.detach() @ nodes.detach().transpose(1, 2)
    threshold = sim.topk(k, dim=-1).values[..., -1:]
    adj = (sim >= threshold).to(nodes.dtype)
    deg_inv_sqrt = adj.sum(-1).clamp_min(1.0).rsqrt()
    return deg_inv_sqrt.unsqueeze(-1) * adj * deg_inv_sqrt.unsqueeze(-2)


class GraphConv(nn.Module):
    """Graph convolution ``relu(BN(A X W))`` over (B, N, D) node features (recipe 1's AU graph)."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = out_dim or dim
        self.linear = nn.Linear(dim, out_dim, bias=False)
        self.norm = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = adj @ self.linear(x)
        b, n, d = h.shape
        return F.relu(self.norm(h.reshape(b * n, d)).reshape(b, n, d))


class ResidualGraphConv(nn.Module):
    """Residual graph update ``x = relu(x + BN(A V(x) + U(x)))`` (recipe 2, as in ME-GraphAU's GNN)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.V = nn.Linear(dim, dim, bias=False)
        self.U = nn.Linear(dim, dim, bias=False)
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = adj @ self.V(x) + self.U(x)
        b, n, d = h.shape
        return F.relu(x + self.norm(h.reshape(b * n, d)).reshape(b, n, d))


# ---- attention ----------------------------------------------------------------------------------------


class AdditiveAttention(nn.Module):
    """Bahdanau attention of one query over C keys: ``score_c = w . tanh(Wq q + Wk k_c)``, softmax over C.

    ``forward(q (B, Dq), k (B, C, Dk))`` returns the weights (B, C), each row summing to 1.

    Args:
        query_dim: size of the query ``q``.
        key_dim: size of each key ``k_c``.
        attn_dim: size of the space the query and the keys are mapped to.
        key_bias: whether ``Wk`` has a bias (recipe 2's published variant has none: every map bias-free).
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int = 64, key_bias: bool = True) -> None:
        super().__init__()
        self.Wq = nn.Linear(query_dim, attn_dim, bias=False)
        self.Wk = nn.Linear(key_dim, attn_dim, bias=key_bias)
        self.w = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = self.w(torch.tanh(self.Wq(q).unsqueeze(1) + self.Wk(k))).squeeze(-1)
        return scores.softmax(-1)


def token_positions(n: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed sinusoidal positions (n, dim) of patch tokens: 2-D (row and column halves, as DETR).

    Patch tokens of a ViT form a sqrt(n) x sqrt(n) grid (17 x 17 for DINOv2 at 238 px); a token count
    that is not a square (or a ``dim`` not divisible by 4) gets 1-D positions in token order.
    """
    side = math.isqrt(n)
    if side * side == n and n > 1 and dim % 4 == 0:
        rows = torch.arange(side, device=device).repeat_interleave(side).float()
        cols = torch.arange(side, device=device).repeat(side).float()
        return torch.cat([sine_1d(rows, dim // 2), sine_1d(cols, dim // 2)], dim=-1)
    return sine_1d(torch.arange(n, device=device).float(), dim)


def sine_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal encoding of positions (n,) -> (n, dim) (sin/cos pairs; any ``dim``)."""
    half = (dim + 1) // 2
    freq = torch.exp(torch.arange(half, device=pos.device).float() * (-2.0 * math.log(10000.0) / (2 * half)))
    ang = pos.unsqueeze(-1) * freq
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)[:, :dim]


class DecoderBlock(nn.Module):
    """DETR-style post-norm decoder block: [self-attention], cross-attention to memory, FFN.

    Queries (B, Q, D) carry a learned positional embedding ``query_pos`` added to attention queries and
    keys; memory (B, N, D) carries fixed ``memory_pos`` added to the cross-attention keys only, as DETR.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, self_attention: bool) -> None:
        super().__init__()
        self.self_attn = (
            nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if self_attention else None
        )
        self.norm_sa = nn.LayerNorm(dim) if self_attention else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ca = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm_ffn = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor, memory_pos: torch.Tensor
    ) -> torch.Tensor:
        if self.self_attn is not None and self.norm_sa is not None:
            qk = x + query_pos
            x = self.norm_sa(x + self.drop(self.self_attn(qk, qk, x, need_weights=False)[0]))
        attn = self.cross_attn(x + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        x = self.norm_ca(x + self.drop(attn))
        return self.norm_ffn(x + self.drop(self.ffn(x)))


# ---- temporal modules: (B, T, D) -> (B, T, D) ---------------------------------------------------------


class TransformerTemporal(nn.Module):
    """Transformer encoder over a window with sinusoidal frame positions; ``causal`` masks the future."""

    def __init__(
        self,
        dim: int,
        layers: int = 2,
        heads: int = 4,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer temporal module: dim {dim} is not divisible by heads {heads}")
        self.causal = causal
        layer = nn.TransformerEncoderLayer(
            dim, heads, ffn_dim or 2 * dim, dropout, batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = sine_1d(torch.arange(t, device=x.device).float(), x.shape[-1]).to(x.dtype)
        mask = None
        if self.causal:
            mask = torch.triu(torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype), 1)
        return self.encoder(x + pos, mask=mask)


class LSTMTemporal(nn.Module):
    """Unidirectional (hence causal) LSTM with a residual projection back to ``dim``."""

    causal = True

    def __init__(self, dim: int, layers: int = 2, hidden: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = hidden or dim
        self.lstm = nn.LSTM(dim, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.lstm(x)[0])


class _TCNBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, dilation: int, dropout: float, causal: bool) -> None:
        super().__init__()
        span = (kernel - 1) * dilation
        self.pad = (span, 0) if causal else (span // 2, span - span // 2)
        self.conv1 = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, D, T)
        h = self.drop(F.relu(self.conv1(F.pad(x, self.pad))))
        h = self.drop(F.relu(self.conv2(F.pad(h, self.pad))))
        return F.relu(x + h)


class TCNTemporal(nn.Module):
    """Temporal convolutional network: residual dilated conv blocks (dilations 1, 2, 4, ...).

    With ``causal`` (the default, as in Bai et al.'s TCN) each output frame sees only itself and the
    past; otherwise the padding is centred.
    """

    def __init__(
        self, dim: int, levels: int = 2, kernel: int = 3, dropout: float = 0.1, causal: bool = True
    ) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.Sequential(*(_TCNBlock(dim, kernel, 2**i, dropout, causal) for i in range(levels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.transpose(1, 2)).transpose(1, 2)


class PlainLSTM(nn.Module):
    """A bare ``nn.LSTM`` over a window (B, T, dim) -> (B, T, hidden): no residual, no projection, no
    dropout between layers (the recipe-3 peer's VA model: 2 layers of 768). Causal (unidirectional)."""

    causal = True

    def __init__(self, dim: int, layers: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        self.hidden = hidden or dim
        self.lstm = nn.LSTM(dim, self.hidden, layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


#: Temporal module kinds accepted by :func:`create_temporal` (``"none"`` is the identity).
TEMPORAL_KINDS: tuple[str, ...] = ("none", "transformer", "lstm", "tcn")

_TEMPORAL: dict[str, Callable[..., nn.Module]] = {
    "transformer": TransformerTemporal,
    "lstm": LSTMTemporal,
    "tcn": TCNTemporal,
}


def create_temporal(kind: str, dim: int, **kw) -> nn.Module:
    """A temporal module mapping (B, T, dim) -> (B, T, dim): ``none``, ``transformer``, ``lstm``, ``tcn``."""
    if kind == "none":
        return nn.Identity()
    if kind not in _TEMPORAL:
        raise ValueError(f"unknown temporal module {kind!r}; choose one of {', '.join(TEMPORAL_KINDS)}")
    return _TEMPORAL[kind](dim, **kw)
