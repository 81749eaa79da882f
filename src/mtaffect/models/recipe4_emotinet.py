"""Recipe 4: MT-EmotiNet heads (Savchenko; ABAW7 second place).

Three independent light heads over a frozen extractor: EXPR is one linear layer (softmax; class
weights live in the loss), AU is Dense(128, ReLU) -> 12 logits (per-AU weighted BCE in the loss), and
VA is a tanh linear layer that sees only the extractor's logits. Each head is trained in its own
stage on its own task's valid rows (``joint=True``: one stage trains the three heads together, e.g.
behind a fine-tuned backbone, where the heads are a light multi-task head).

``head_input`` chooses what the EXPR and AU heads read: ``"features+logits"`` (default, as published:
the embedding concatenated with the extractor's logits) or ``"features"``. Without logits
(``num_logits=0``, e.g. a backbone with no classifier) every head reads the features; the attributes
``va_input`` and ``expr_au_input`` record what each reads.
(Smoothing, thresholds and blending are post-processing, outside the model.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtaffect.models.base import TASKS, MTLModel, Stage
from mtaffect.models.blocks import require_input
from mtaffect.models.registry import register_model
from mtaffect.schema import NUM_AUS, NUM_EXPR

HEAD_INPUTS = ("features+logits", "features")


@register_model("emotinet")
class EmotiNetHeads(MTLModel):
    """Separate EXPR (linear), AU (MLP) and VA (tanh linear on the extractor's logits) heads."""

    recipe = "emotinet"
    inputs: tuple[str, ...] = ("features", "logits")

    def __init__(
        self,
        feature_dim: int,
        num_logits: int = 0,
        token_shape: Sequence[int] | None = None,
        au_hidden: int = 128,
        dropout: float = 0.0,
        joint: bool = False,
        head_input: str = "features+logits",
    ) -> None:
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"emotinet head_input must be one of {list(HEAD_INPUTS)}, got {head_input!r}")
        self.feature_dim, self.num_logits = int(feature_dim), int(num_logits)
        self.token_shape = tuple(token_shape) if token_shape is not None else None
        self.au_hidden, self.dropout, self.joint = au_hidden, dropout, bool(joint)
        self.head_input = head_input
        self.va_input = "logits" if self.num_logits else "features"
        self.expr_au_input = head_input if self.num_logits else "features"
        self.inputs = ("features", "logits") if self.num_logits else ("features",)
        in_dim = self.feature_dim + (self.num_logits if self.expr_au_input == "features+logits" else 0)
        self.expr_head = nn.Linear(in_dim, NUM_EXPR)
        self.au_head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, au_hidden),
            nn.ReLU(),
            nn.Linear(au_hidden, NUM_AUS),
        )
        self.va_head = nn.Sequential(nn.Linear(self.num_logits or self.feature_dim, 2), nn.Tanh())

    def config(self) -> dict:
        return {
            "feature_dim": self.feature_dim,
            "num_logits": self.num_logits,
            "token_shape": list(self.token_shape) if self.token_shape is not None else None,
            "au_hidden": self.au_hidden,
            "dropout": self.dropout,
            "joint": self.joint,
            "head_input": self.head_input,
        }

    def stages(self) -> list[Stage]:
        if self.joint:
            return [Stage("joint")]
        return [
            Stage("expr", tasks=("expr",), train_modules=("expr_head",)),
            Stage("au", tasks=("au",), train_modules=("au_head",)),
            Stage("va", tasks=("va",), train_modules=("va_head",)),
        ]

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = require_input(batch, "features", self.recipe, (self.feature_dim,))
        tasks = self.active_tasks or TASKS  # the heads are independent: a stage computes only its own
        logits = (
            require_input(batch, "logits", self.recipe, (self.num_logits,)).to(x.dtype)
            if self.num_logits
            else None
        )
        out: dict[str, torch.Tensor] = {}
        if "au" in tasks or "expr" in tasks:
            h = (
                torch.cat([x, logits], -1)
                if logits is not None and self.expr_au_input == "features+logits"
                else x
            )
            if "au" in tasks:
                out["au"] = self.au_head(h)
            if "expr" in tasks:
                out["expr"] = self.expr_head(h)
        if "va" in tasks:
            out["va"] = self.va_head(logits if logits is not None else x)
        return out
