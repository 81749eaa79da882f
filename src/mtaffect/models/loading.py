"""One way to load any model: a name (:mod:`mtaffect.models.names`) -> the interface the caller needs.

Two roles, one entry point each (the interfaces are in :mod:`mtaffect.models.base`):

- :func:`load_face_model` -> :class:`~mtaffect.models.base.FaceAffectModel`, what ``mtaffect predict``
  (torch engine) and ``mtaffect export`` run on each face: ``default``, ``emotiefflib:<model>``, a
  checkpoint (or the run whose ``best/`` is one). :func:`backbone_of` is its backbone
  (``extract --backbone run:<run>``, the pipeline's export step).
- :func:`load_predictor` (``mtaffect.load_model``) -> a trained model over feature stores or face crops
  (:class:`~mtaffect.models.base.AffectPredictor`): a checkpoint or an ensemble (or a run holding one).

A name that resolves to a model that cannot serve the role asked is a :class:`ModelRoleError` naming
what it resolved to, why, and what to use instead; no object is ever presented as what it is not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from mtaffect.models.base import FaceAffectModel
from mtaffect.models.default import DefaultAffectModel
from mtaffect.models.emotiefflib import EmotiEffLibAffectModel
from mtaffect.models.ensemble import EnsembleAffectModel
from mtaffect.models.names import RUN_PREFIX, ModelRef, parse_model_name
from mtaffect.models.trained import TrainedAffectModel, load_checkpoint

if TYPE_CHECKING:
    from mtaffect.features.base import Backbone


class ModelRoleError(ValueError):
    """A model name resolved to a model that cannot serve the role asked of it."""


def _not_a_face_model(ref: ModelRef) -> ModelRoleError:
    if ref.kind == "ensemble":
        why = (
            "it answers each task with its own model (several backbones), so it cannot be the one face "
            "model the application runs; predict face crops with `mtaffect infer --model ... --data ROOT`, "
            f"or run one of its task models, e.g. {ref.path / 'sources'}/<task>"
        )
    elif ref.kind == "export":
        why = (
            "it is ONNX graphs for onnxruntime: run it with --engine onnxruntime (Python: "
            "Predictor(model=..., engine='onnxruntime'))"
        )
    else:  # pragma: no cover - every other kind is a face model
        why = "it is not a face model"
    return ModelRoleError(f"{ref.describe()}: {why}")


def load_face_model(
    model: FaceAffectModel | str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> FaceAffectModel:
    """The application's face model for ``model`` (see the module docstring).

    Args:
        model: a model name (None: the default model), or a face model object (returned as it is).
        device: where a trained checkpoint's heads run.
        trust_remote_code: lets an ``hf:`` backbone run its repository's code (the caller's decision).

    Returns:
        The face model: one backbone (``create_backbone``) and heads over its outputs (``predict``).

    Raises:
        ModelRoleError: ``model`` is an ensemble, an export folder or a checkpoint that also reads the
            features of other models, none of which one backbone on a face can feed.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(model, EnsembleAffectModel):
        raise _not_a_face_model(ModelRef("ensemble", str(model.path), str(model.path)))
    if not (model is None or isinstance(model, str | os.PathLike)):
        if isinstance(model, FaceAffectModel):
            return model
        raise TypeError(
            f"model must be None, a model name or path, or a FaceAffectModel, got {type(model).__name__}"
        )
    ref = parse_model_name(model)
    if ref.kind == "default":
        return DefaultAffectModel()
    if ref.kind == "emotiefflib":
        return EmotiEffLibAffectModel(ref.location)
    if ref.kind != "checkpoint":
        raise _not_a_face_model(ref)
    loaded = load_checkpoint(ref.path, device, trust_remote_code=trust_remote_code)
    if loaded.store_inputs:
        raise ModelRoleError(
            f"{ref.describe()}: it also reads the features of other models "
            f"({', '.join(loaded.store_inputs)}), which its own backbone does not compute; run the "
            "combined model (an ensemble) with `mtaffect infer --data`, or a model reading its backbone only"
        )
    return loaded


def load_predictor(
    name: str | os.PathLike, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> TrainedAffectModel | EnsembleAffectModel:
    """A trained model to predict lists of images with, from feature stores or face crops.

    Args:
        name: a checkpoint folder, an ensemble folder, or a run folder (``run:<folder>`` too) whose
            ``best/`` is one.
        device: where the model runs.
        trust_remote_code: lets an ``hf:`` backbone run its repository's code (the caller's decision,
            never the checkpoint's).

    Returns:
        A :class:`TrainedAffectModel` for a checkpoint, an :class:`EnsembleAffectModel` for an ensemble
        (both :class:`~mtaffect.models.base.AffectPredictor`).

    Raises:
        ModelRoleError: ``name`` is the default model, an EmotiEffLib network or an export folder,
            which predict faces in the application, not lists of dataset images.
        FileNotFoundError: a path that does not exist.
    """
    ref = parse_model_name(name)
    if ref.kind == "checkpoint":
        return load_checkpoint(ref.path, device, trust_remote_code=trust_remote_code)
    if ref.kind == "ensemble":
        return EnsembleAffectModel(ref.path, device, trust_remote_code=trust_remote_code)
    if ref.kind == "export":
        fix = "give the checkpoint it was exported from (mtaffect predict --engine onnxruntime runs it)"
    else:
        fix = f"it predicts faces in the application: mtaffect predict --model {ref.name} (Python: Predictor)"
    raise ModelRoleError(
        f"{ref.describe()} is not a trained model over feature stores or face crops (a checkpoint or an "
        f"ensemble folder): {fix}"
    )


#: The public name (``mtaffect.load_model``, README): a checkpoint or an ensemble, ready to predict.
load_model = load_predictor


def backbone_of(
    name: str | os.PathLike, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> Backbone:
    """The backbone of the face model ``name``, as it was trained (fine-tuned weights included).

    Args:
        name: a checkpoint, or a run folder (``run:<folder>`` too) whose ``best/`` is one.
        device: where the backbone runs.
        trust_remote_code: the caller's decision for ``hf:`` backbones.

    Returns:
        The backbone in eval mode on ``device``.
    """
    return load_face_model(name, device, trust_remote_code=trust_remote_code).create_backbone()


def resolve_backbone(
    name: str,
    kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
) -> str | Backbone:
    """What ``mtaffect extract --backbone NAME`` runs.

    Args:
        name: a backbone's registry name, or ``run:<folder>``: a trained run's (or checkpoint's) backbone.
        kwargs: the registry backbone's options (``--backbone-arg``); a trained one takes none.
        device: where a trained backbone is built.
        trust_remote_code: the caller's decision for ``hf:`` backbones.

    Returns:
        A registry name as given (extraction builds it with ``kwargs``), or the trained backbone.
    """
    if not name.startswith(RUN_PREFIX):
        return name
    if kwargs:
        raise ValueError("--backbone-arg does not apply to run:RUN (the run's backbone is used as trained)")
    return backbone_of(name, device, trust_remote_code=trust_remote_code)


__all__ = [
    "ModelRoleError",
    "backbone_of",
    "load_face_model",
    "load_model",
    "load_predictor",
    "resolve_backbone",
]
