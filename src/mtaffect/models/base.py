"""The contract between recipes, the training loop, checkpoints and the application.

A recipe is an :class:`MTLModel`: it reads cached backbone outputs (pooled features, the backbone's
logits, patch tokens) and returns raw outputs for the three tasks. The training loop knows nothing
about any recipe beyond this: which inputs it reads, whether it wants temporal windows, and the
sequence of training :class:`Stage` s (task-sequential or progressive recipes train in stages).

The application sees a :class:`FaceAffectModel`: anything that turns a backbone's outputs into
probabilities. Trained checkpoints (``mtaffect.load_model``) and the embedded default model both are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from mtaffect.models.outputs import AffectOutputs

#: Task keys used in model outputs, losses, stages and configs.
TASKS: tuple[str, str, str] = ("au", "expr", "va")
#: Cached backbone arrays a recipe may read (names of the FeatureStore arrays).
INPUTS: tuple[str, str, str] = ("features", "logits", "tokens")


@dataclass(frozen=True)
class Stage:
    """One phase of training: which task losses are optimised and which submodules are trainable.

    ``train_modules`` names attributes of the model (``("*",)`` means all parameters); everything else
    is frozen (``requires_grad=False`` and eval mode) for the stage. ``epochs`` overrides the config's.
    """

    name: str
    tasks: tuple[str, ...] = TASKS
    train_modules: tuple[str, ...] = ("*",)
    epochs: int | None = None


class MTLModel(nn.Module):
    """Base class of every recipe.

    ``forward(batch)`` takes a dict with the arrays named in ``inputs``: ``features`` (B, D),
    ``logits`` (B, K), ``tokens`` (B, N, C) — with an extra time axis (B, T, ...) when ``temporal`` —
    and returns ``{"au": (..., 12) logits, "expr": (..., 8) logits, "va": (..., 2) in [-1, 1]}``.
    """

    recipe: ClassVar[str] = ""
    temporal: ClassVar[bool] = False
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    #: Set by the training loop during a training step to the stage's tasks (None otherwise): a recipe
    #: may then skip computing outputs no loss of the stage uses (a speed hint, never required).
    active_tasks: tuple[str, ...] | None = None

    def stages(self) -> list[Stage]:
        """Training phases in order; the default is one joint phase over all tasks and parameters."""
        return [Stage("joint")]

    def config(self) -> dict:
        """Keyword arguments that rebuild this model with ``create_model(self.recipe, **config)``."""
        raise NotImplementedError

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def outputs_to_probs(out: Mapping[str, torch.Tensor]) -> AffectOutputs:
    """Raw model outputs -> probabilities (softmax over expressions, sigmoid per AU)."""
    return AffectOutputs(
        va=out["va"].detach().float().cpu().numpy(),
        expr_probs=torch.softmax(out["expr"].detach().float(), -1).cpu().numpy(),
        au_probs=torch.sigmoid(out["au"].detach().float()).cpu().numpy(),
    )


@runtime_checkable
class FaceAffectModel(Protocol):
    """What the application needs: the backbone to run on aligned faces, and a head over its outputs."""

    backbone: str  # registry name of the backbone (create_backbone(backbone, **backbone_kwargs))
    backbone_kwargs: dict
    au_thresholds: np.ndarray  # (12,) decision thresholds for the 0/1 AU columns

    def predict(
        self, features: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> AffectOutputs:
        """Backbone outputs for N faces (one time step each) -> probabilities."""
        ...
