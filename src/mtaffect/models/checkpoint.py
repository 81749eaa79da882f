"""Trained-model checkpoints: a folder with ``model.safetensors`` + ``config.json``; never pickles.

``config.json`` (format ``mtaffect-checkpoint`` version 1, the one header of :mod:`mtaffect.persist`)
holds everything that rebuilds and describes the model::

    recipe, model_config      create_model(recipe, **model_config) rebuilds the architecture
    temporal, inputs, window  what the model reads; temporal models predict over windows of `window`
    backbone                  {name, kwargs, spec, fingerprint[, mode, weights]}: the features it was
                              trained on; create_backbone(name, **kwargs) rebuilds the backbone
    feature_dim, num_logits, token_shape
    au_thresholds             12 decision thresholds (default 0.5)
    metrics                   validation metrics of the saved weights (P and its terms)
    train_config              the resolved training config; created

A model trained from images with a fine-tuned backbone (``backbone.mode: finetune``) also holds the
backbone's weights: ``backbone/`` (safetensors, loaded by the backbone's own ``weights=`` option) and
``backbone.weights = "backbone"``; its ``fingerprint`` is null, since its features are its own and no
feature store holds them (such a model predicts from images only). ``kwargs`` are data (sizes,
normalisation, dtype): an option that would run code (``trust_remote_code``) is never honoured here.

A checkpoint is written into a temporary folder beside its target and renamed into place, so a crash
never leaves half a checkpoint; an existing one is replaced only with ``overwrite=True`` and only when
it is a checkpoint (nothing else is ever replaced: :func:`mtaffect.persist.check_replaceable`).

A checkpoint is data, never code: every field of ``config.json`` is checked when read (types, ranges,
registered recipe), the weights are safetensors, and ``backbone.kwargs`` may not hold an option that
runs code (``trust_remote_code``): that is only ever the person's decision (``load_model(...,
trust_remote_code=True)``, CLI ``--trust-remote-code``), never the file's.

This module is the format alone (write, read and audit, the safetensors read, the recipe rebuilt);
the model a checkpoint becomes is :class:`mtaffect.models.trained.TrainedAffectModel`, and which name
loads what is :mod:`mtaffect.models.loading`.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtaffect.features.registry import CODE_EXECUTING_OPTIONS, options_from_file
from mtaffect.models.base import MTLModel
from mtaffect.models.registry import create_model
from mtaffect.persist import (
    CHECKPOINT,
    atomic_folder,
    check_replaceable,
    header,
    read_header_file,
    write_json,
)
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS

if TYPE_CHECKING:
    from mtaffect.features.base import Backbone

FORMAT = CHECKPOINT.name
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BACKBONE_DIR = "backbone"  # a fine-tuned backbone's weights


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged or does not fit the features it is used with."""


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    return obj


def _data_options(kwargs: Mapping[str, Any]) -> dict:
    """Backbone options as stored: plain data, never a code-running one (the person's trust in remote
    code is theirs to give on each load, never recorded)."""
    return {k: v for k, v in _jsonable(kwargs).items() if k not in CODE_EXECUTING_OPTIONS}


def save_checkpoint(
    path: str | os.PathLike,
    model: MTLModel,
    *,
    backbone: Mapping[str, Any],
    feature_dim: int,
    num_logits: int = 0,
    token_shape: Sequence[int] | None = None,
    window: int = 1,
    au_thresholds: Sequence[float] | np.ndarray | None = None,
    metrics: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    backbone_weights: Backbone | None = None,
    window_edge: str = "pad",
    input_stores: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``model`` to the folder ``path``; ``backbone`` = {name, spec, fingerprint[, kwargs, mode]}.

    ``backbone_weights``: a fine-tuned :class:`~mtaffect.features.base.Backbone` whose weights go into
    ``backbone/`` (its ``save_weights`` decides the files and the kwargs that load them again).
    ``input_stores``: for a model reading named stores (``features@au``), each store's backbone and
    fingerprint ({name: {backbone, fingerprint}}), checked when it predicts from stores.
    """
    target = check_replaceable(path, CHECKPOINT, overwrite)  # before any work
    if not model.recipe:
        raise CheckpointError(f"{type(model).__name__} has no recipe name; register it with register_model")
    thr = (
        np.full(NUM_AUS, DEFAULT_AU_THRESHOLD) if au_thresholds is None else np.asarray(au_thresholds, float)
    )
    if thr.ndim == 0:
        thr = np.full(NUM_AUS, float(thr))
    if thr.shape != (NUM_AUS,):
        raise CheckpointError(f"au_thresholds must hold {NUM_AUS} values, got shape {thr.shape}")
    config = {
        **header(CHECKPOINT),
        "recipe": model.recipe,
        "model_config": _jsonable(model.config()),
        "temporal": bool(model.temporal),
        "inputs": list(model.inputs),
        "window": int(window),
        **({"window_edge": window_edge} if window_edge != "pad" else {}),
        **({"input_stores": _jsonable(input_stores)} if input_stores else {}),
        "backbone": {
            "name": backbone["name"],
            "kwargs": _data_options(backbone.get("kwargs", {})),
            "spec": _jsonable(backbone.get("spec", {})),
            "fingerprint": None if backbone_weights is not None else backbone.get("fingerprint"),
            **({"mode": str(backbone["mode"])} if "mode" in backbone else {}),
        },
        "feature_dim": int(feature_dim),
        "num_logits": int(num_logits),
        "token_shape": None if token_shape is None else [int(x) for x in token_shape],
        "au_thresholds": thr.tolist(),
        "metrics": _jsonable(metrics or {}),
        "train_config": _jsonable(train_config or {}),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_folder(target, CHECKPOINT, overwrite) as tmp:
        if backbone_weights is not None:
            kwargs = backbone_weights.save_weights(tmp / BACKBONE_DIR, dict(backbone.get("kwargs", {})))
            config["backbone"]["kwargs"] = _data_options(kwargs)
            config["backbone"]["weights"] = BACKBONE_DIR
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "recipe": model.recipe})
        write_json(tmp / CONFIG, config)
    return target


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The checked ``config.json`` of a checkpoint folder (see :func:`_audit` for what is checked)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint folder at {p}; expected a folder with {WEIGHTS} and {CONFIG}")
    for name in (WEIGHTS, CONFIG):
        if not (p / name).is_file():
            raise CheckpointError(f"{p} is not a checkpoint: {name} is missing")
    config = read_header_file(p / CONFIG, CHECKPOINT, CheckpointError)
    _audit(config, str(p / CONFIG))
    return config


def _audit(config: dict, where: str) -> None:
    """Check every field a loader uses, so a damaged or hostile file fails here, naming the key."""

    def fail(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key} {what}, got {_short(config.get(key))}")

    def is_int(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not isinstance(config.get("recipe"), str) or not config["recipe"]:
        raise fail("recipe", "must be a recipe name")
    if not isinstance(config.get("model_config"), dict):
        raise fail("model_config", "must be a mapping of the recipe's settings")
    if not isinstance(config.get("temporal", False), bool):
        raise fail("temporal", "must be true or false")
    inputs = config.get("inputs", ["features"])
    if not isinstance(inputs, list) or not inputs or not all(_input_name_ok(i) for i in inputs):
        raise fail("inputs", "must list some of features, logits, tokens (optionally @<store name>)")
    if not is_int(config.get("window", 1), 1):
        raise fail("window", "must be an integer >= 1")
    if config.get("window_edge", "pad") not in ("pad", "shift"):
        raise fail("window_edge", "must be pad or shift")
    named = config.get("input_stores", {})
    if not isinstance(named, dict) or not all(
        isinstance(k, str)
        and k.isidentifier()
        and isinstance(v, dict)
        and isinstance(v.get("fingerprint"), str | None)
        for k, v in named.items()
    ):
        raise fail("input_stores", "must map store names to {fingerprint, backbone}")
    for key, low in (("feature_dim", 1), ("num_logits", 0)):
        if key in config and not is_int(config[key], low):
            raise fail(key, f"must be an integer >= {low}")
    shape = config.get("token_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 2 and all(is_int(x, 1) for x in shape)
    ):
        raise fail("token_shape", "must be null or [tokens, channels]")
    thr = config.get("au_thresholds", [DEFAULT_AU_THRESHOLD] * NUM_AUS)
    if not (
        isinstance(thr, list)
        and len(thr) == NUM_AUS
        and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t <= 1
            for t in thr
        )
    ):
        raise fail("au_thresholds", f"must be {NUM_AUS} numbers in [0, 1]")
    for key in ("metrics", "train_config"):
        if not isinstance(config.get(key, {}), dict):
            raise fail(key, "must be a mapping")
    bb = config.get("backbone")
    if not isinstance(bb, dict) or not isinstance(bb.get("name"), str) or not bb["name"]:
        raise fail("backbone", "must be a mapping with the backbone's registry name")
    if not isinstance(bb.get("spec", {}), dict) or not isinstance(bb.get("fingerprint"), str | None):
        raise fail("backbone", "must hold spec (a mapping) and fingerprint (a string)")
    try:
        bb["kwargs"] = options_from_file(bb.get("kwargs"), f"{where}: backbone.kwargs")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def _input_name_ok(name: Any) -> bool:
    from mtaffect.features.reader import split_input

    try:
        split_input(name)
    except ValueError:
        return False
    return isinstance(name, str)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_weights(
    path: str | os.PathLike, hint: str | None = "the checkpoint is damaged: copy or train it again"
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a checkpoint folder's ``model.safetensors``.

    A damaged file is a :class:`CheckpointError` naming it, ``hint`` saying what to do (safetensors'
    own error is no ``ValueError``: it would reach the user as a traceback); a missing one an ``OSError``.
    """
    p = Path(path)
    file = p / WEIGHTS if p.is_dir() else p
    try:
        return load_file(str(file))
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({exc})" + (f"; {hint}" if hint else "")
        ) from None


def load_mtl_model(path: str | os.PathLike) -> tuple[MTLModel, dict]:
    """The :class:`MTLModel` of a checkpoint (eval mode, CPU) and its config."""
    p = Path(path)
    config = read_checkpoint_config(p)
    try:
        model = create_model(config["recipe"], **config["model_config"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CheckpointError(
            f"{p / CONFIG}: cannot rebuild recipe {config.get('recipe')!r} ({msg})"
        ) from exc
    state = load_weights(p / WEIGHTS)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{p / WEIGHTS}: weights do not fit the recipe's architecture ({exc})") from exc
    return model.eval(), config


__all__ = [
    "BACKBONE_DIR",
    "CONFIG",
    "WEIGHTS",
    "CheckpointError",
    "load_mtl_model",
    "load_weights",
    "read_checkpoint_config",
    "save_checkpoint",
]
