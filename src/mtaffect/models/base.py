"""The contract between recipes, the training loop, checkpoints and the application.

A recipe is an :class:`MTLModel`: it reads cached backbone outputs (pooled features, the backbone's
logits, patch tokens) and returns raw outputs for the three tasks. The training loop knows nothing
about any recipe beyond this: which inputs it reads, whether it wants temporal windows, and the
sequence of training :class:`Stage` s (task-sequential or progressive recipes train in stages).

Two interfaces face the users of a trained model, and a model implements only those it can serve:

- :class:`FaceAffectModel`, what the application (``mtaffect predict``, ``mtaffect export``) runs on
  each aligned face: one backbone and heads over its outputs. The embedded default model,
  ``emotiefflib:`` and a trained checkpoint are one; an ensemble (several backbones) is not.
- :class:`AffectPredictor`, the research interface over a list of images: a PredictionTable from feature
  stores or from face crops (``mtaffect infer``, ``evaluate``). A trained checkpoint and an ensemble are.

:mod:`mtaffect.models.loading` turns any model name into the one a caller asks for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from mtaffect.models.outputs import AffectOutputs

if TYPE_CHECKING:
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.features.base import Backbone

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

    # class defaults a recipe instance may set from its hparams (an image model takes its head's)
    recipe: str = ""
    temporal: bool = False
    inputs: tuple[str, ...] = ("features",)
    #: Set by the training loop during a training step to the stage's tasks (None otherwise): a recipe
    #: may then skip computing outputs no loss of the stage uses (a speed hint, never required).
    active_tasks: tuple[str, ...] | None = None
    #: Optimiser settings per submodule, ``{dotted name: {"lr": ..., "weight_decay": ...}}`` (the
    #: config's ``optim.groups``), read by :meth:`param_groups`; not part of the architecture.
    group_settings: Mapping[str, Mapping[str, float]] = {}
    #: ``optim.decay_all``: weight decay on every parameter. A recipe's own parameters always decay
    #: (:meth:`param_groups`); a fine-tuned backbone (:class:`~mtaffect.models.image_model.ImageMTLModel`)
    #: otherwise spares its biases, norms and embedding tokens (its ``/no_decay`` groups) unless this is
    #: set (:meth:`~mtaffect.models.image_model.ImageMTLModel.param_groups`).
    decay_all: bool = False

    def stages(self) -> list[Stage]:
        """Training phases in order; the default is one joint phase over all tasks and parameters."""
        return [Stage("joint")]

    def config(self) -> dict:
        """Keyword arguments that rebuild this model with ``create_model(self.recipe, **config)``."""
        raise NotImplementedError

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups over the trainable parameters.

        A submodule named in :attr:`group_settings` (e.g. recipe 3's ``fusion``, ``temporal_net``,
        ``heads``) gets its own lr and weight decay (the most specific name wins); every other
        trainable parameter trains at ``lr`` / ``weight_decay``. Groups carry a ``name``.
        """
        names = sorted(self.group_settings, key=lambda n: -n.count("."))  # most specific first
        known = {n for n, _ in self.named_modules()}
        bad = [n for n in names if n not in known]
        if bad:
            children = [n for n, _ in self.named_children()]
            raise ValueError(
                f"optim.groups names {bad}, not submodules of recipe {self.recipe!r} (its parts: {children})"
            )
        members: dict[str, list[torch.nn.Parameter]] = {n: [] for n in ["", *names]}
        for pname, p in self.named_parameters():
            if p.requires_grad:
                owner = next((n for n in names if pname.startswith(n + ".")), "")
                members[owner].append(p)
        groups = []
        for name, params in members.items():
            if params:
                s = self.group_settings.get(name, {})
                groups.append(
                    {
                        "name": name or "default",
                        "params": params,
                        "lr": float(s.get("lr", lr)),
                        "weight_decay": float(s.get("weight_decay", weight_decay)),
                    }
                )
        return groups

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
    """What the application needs: the backbone to run on aligned faces, and a head over its outputs.

    The embedded default model (and ``emotiefflib:``) subclasses it and inherits :meth:`create_backbone`;
    a trained checkpoint implements it with its fine-tuned backbone; any object with these members
    qualifies.
    """

    backbone: str  # registry name of the backbone (create_backbone(backbone, **backbone_kwargs))
    backbone_kwargs: dict
    au_thresholds: np.ndarray  # (12,) decision thresholds for the 0/1 AU columns
    # Optional (not part of the protocol's checked members): ``au_source = "expression"`` when the AUs are
    # priors read off the expression probabilities (the application then combines them with the face's
    # blendshape evidence); absent or "model": the model's own AU outputs, kept as they are.

    def create_backbone(self) -> Backbone:
        """The backbone whose outputs :meth:`predict` reads: ``create_backbone(backbone,
        **backbone_kwargs)`` from the registry; a checkpoint with a fine-tuned backbone overrides it to
        restore its own weights. Every engine and the exporter build the backbone through this."""
        from mtaffect.features.registry import create_backbone

        return create_backbone(self.backbone, **dict(self.backbone_kwargs))

    def predict(
        self, features: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> AffectOutputs:
        """Backbone outputs for N faces (one time step each) -> probabilities."""
        ...


@runtime_checkable
class AffectPredictor(Protocol):
    """What research code needs: a PredictionTable for a list of images (``<video>/<frame>`` names), from
    feature stores or from face crops. Trained checkpoints and ensemble folders implement it
    (:func:`mtaffect.models.loading.load_predictor`).
    """

    au_thresholds: np.ndarray  # (12,) decision thresholds for the 0/1 AU columns
    failures: list[tuple[str, str]]  # (image, why) of the last predict_images call's unreadable images

    def predict_store(
        self,
        store: object,
        images: Sequence[str],
        batch_size: int = 4096,
        *,
        allow_missing: bool = False,
        stores: Mapping[str, object] | None = None,
    ) -> PredictionTable:
        """Predict ``images`` from a feature store (or its folder); ``stores``: named ones it fuses."""
        ...

    def predict_images(
        self,
        folder: str | os.PathLike,
        images: Sequence[str],
        batch_size: int = 256,
        workers: int = 0,
        *,
        allow_missing: bool = False,
        stores: Mapping[str, object] | None = None,
    ) -> PredictionTable:
        """Predict ``images`` (names relative to ``folder``) through the model's own backbone(s)."""
        ...
