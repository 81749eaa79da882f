"""Trained-model checkpoints: a folder with ``model.safetensors`` + ``config.json``; never pickles.

``config.json`` (format ``mtaffect-checkpoint`` version 1) holds everything that rebuilds and
describes the model::

    recipe, model_config      create_model(recipe, **model_config) rebuilds the architecture
    temporal, inputs, window  what the model reads; temporal models predict over windows of `window`
    backbone                  {name, kwargs, spec, fingerprint}: the features it was trained on
    feature_dim, num_logits, token_shape
    au_thresholds             12 decision thresholds (default 0.5)
    metrics                   validation metrics of the saved weights (P and its terms)
    train_config              the resolved training config; mtaffect_version, created

A checkpoint is written into a temporary folder beside its target and renamed into place, so a crash
never leaves half a checkpoint; an existing one is replaced only with ``overwrite=True``.

:func:`load_model` returns a :class:`TrainedAffectModel` (a :class:`FaceAffectModel`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mtaffect.io import OutputExistsError, atomic_dir
from mtaffect.models.base import AffectOutputs, MTLModel, outputs_to_probs
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS

FORMAT = "mtaffect-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, damaged or does not fit the features it is used with."""


def _version() -> str:
    from mtaffect import __version__

    return __version__


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
) -> Path:
    """Write ``model`` to the folder ``path``; ``backbone`` = {name, spec, fingerprint[, kwargs]}."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
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
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": model.recipe,
        "model_config": _jsonable(model.config()),
        "temporal": bool(model.temporal),
        "inputs": list(model.inputs),
        "window": int(window),
        "backbone": {
            "name": backbone["name"],
            "kwargs": _jsonable(backbone.get("kwargs", {})),
            "spec": _jsonable(backbone.get("spec", {})),
            "fingerprint": backbone.get("fingerprint"),
        },
        "feature_dim": int(feature_dim),
        "num_logits": int(num_logits),
        "token_shape": None if token_shape is None else [int(x) for x in token_shape],
        "au_thresholds": thr.tolist(),
        "metrics": _jsonable(metrics or {}),
        "train_config": _jsonable(train_config or {}),
        "mtaffect_version": _version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_dir(target, overwrite=overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "recipe": model.recipe})
        with open(tmp / CONFIG, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=1)
            fh.write("\n")
    return target


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"no checkpoint folder at {p}; expected a folder with {WEIGHTS} and {CONFIG}")
    for name in (WEIGHTS, CONFIG):
        if not (p / name).is_file():
            raise CheckpointError(f"{p} is not a checkpoint: {name} is missing")
    try:
        config = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p / CONFIG}: cannot read ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{p / CONFIG}: not an mtaffect checkpoint config")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {config['format_version']} is newer than this mtaffect"
        )
    return config


def load_mtl_model(path: str | os.PathLike) -> tuple[MTLModel, dict]:
    """The :class:`MTLModel` of a checkpoint (eval mode, CPU) and its config."""
    from mtaffect.models.registry import create_model

    p = Path(path)
    config = read_checkpoint_config(p)
    try:
        model = create_model(config["recipe"], **config["model_config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{p / CONFIG}: cannot rebuild recipe {config.get('recipe')!r} ({exc})"
        ) from exc
    state = load_file(str(p / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{p / WEIGHTS}: weights do not fit the recipe's architecture ({exc})") from exc
    return model.eval(), config


class TrainedAffectModel:
    """A trained recipe ready for prediction: implements :class:`mtaffect.models.base.FaceAffectModel`.

    ``predict(features, logits, tokens)`` takes N faces, one time step each. Temporal recipes also
    accept one sequence ``(1, T, ...)`` (consecutive frames of one video) and then return T rows;
    (N, ...) input is treated as N sequences of length 1 (no temporal context).
    :meth:`predict_store` predicts a whole store, temporal recipes over windows of each video.
    """

    def __init__(self, model: MTLModel, config: dict, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        bb = config["backbone"]
        self.backbone: str = bb["name"]
        self.backbone_kwargs: dict = dict(bb.get("kwargs") or {})
        self.fingerprint: str | None = bb.get("fingerprint")
        self.au_thresholds = np.asarray(config.get("au_thresholds", [DEFAULT_AU_THRESHOLD] * NUM_AUS), float)
        self.temporal = bool(config.get("temporal", False))
        self.window = int(config.get("window", 1))
        self.inputs: tuple[str, ...] = tuple(config.get("inputs", model.inputs))
        self.metrics: dict = config.get("metrics", {})

    def __repr__(self) -> str:
        return (
            f"TrainedAffectModel(recipe={self.config['recipe']!r}, backbone={self.backbone!r}, "
            f"temporal={self.temporal}, P={self.metrics.get('P')})"
        )

    @torch.no_grad()
    def _forward(self, arrays: Mapping[str, torch.Tensor | np.ndarray | None]) -> dict[str, torch.Tensor]:
        batch = {}
        for name in self.inputs:
            a = arrays.get(name)
            if a is None:
                raise ValueError(f"this model reads {name!r} from the backbone; pass {name}=...")
            t = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)
            batch[name] = t.to(self.device).float()  # float16 from a store is cast on the device
        return self.model(batch)

    def predict(
        self, features: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> AffectOutputs:
        arrays = {"features": features, "logits": logits, "tokens": tokens}
        if self.temporal:
            f = torch.as_tensor(features)
            if f.ndim == 3 and f.shape[0] == 1:  # one sequence (1, T, D): keep the time axis
                out = self._forward(arrays)
                return outputs_to_probs({k: v[0] for k, v in out.items()})
            arrays = {k: None if v is None else torch.as_tensor(v)[:, None] for k, v in arrays.items()}
            out = self._forward(arrays)
            return outputs_to_probs({k: v[:, 0] for k, v in out.items()})
        return outputs_to_probs(self._forward(arrays))

    def predict_store(
        self, store: Any, images: Sequence[str], batch_size: int = 4096, *, allow_missing: bool = False
    ) -> Any:
        """A PredictionTable for ``images`` (repeats allowed) from a FeatureStore (or its path).

        Temporal recipes see windows of ``window`` consecutive listed frames of one video (sorted by
        frame, the last padded); every frame is predicted exactly once.

        Images whose extraction failed (their store rows are zeros) are an error
        (:class:`mtaffect.features.reader.FailedImagesError`, counting them and naming the first few).
        With ``allow_missing`` the table gets a ``valid`` column: 0 for those rows, whose values are
        the model's output on zero features (placeholders to filter or fill), 1 for the others.
        """
        from mtaffect.data.predictions import PredictionTable
        from mtaffect.data.units import make_windows, split_image_names
        from mtaffect.features.reader import InputSource, check_valid
        from mtaffect.features.store import FeatureStore

        st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        if self.fingerprint and st.fingerprint != self.fingerprint:
            st.check_compatible(self.fingerprint, self.backbone)
        names = list(dict.fromkeys(str(x) for x in images))
        rows = st.rows(names)
        ok = check_valid(st, rows, names, allow_missing=allow_missing)
        source = InputSource(st, rows, self.inputs, in_memory=False)
        n = len(names)
        va = np.zeros((n, 2))
        expr = np.zeros((n, 8))
        au = np.zeros((n, NUM_AUS))
        if self.temporal:
            video, frame = split_image_names(names, strict=False)
            units, mask = make_windows(video, frame, self.window, self.window)
            bs = max(1, batch_size // self.window)
        else:
            units, mask, bs = np.arange(n), None, batch_size
        for s in range(0, len(units), bs):
            pos = units[s : s + bs]
            probs = outputs_to_probs(self._forward(source.get(pos)))
            idx = pos
            if mask is not None:
                keep = mask[s : s + bs]
                idx = pos[keep]
                probs = AffectOutputs(probs.va[keep], probs.expr_probs[keep], probs.au_probs[keep])
            va[idx], expr[idx], au[idx] = probs.va, probs.expr_probs, probs.au_probs
        pos = {name: i for i, name in enumerate(names)}
        take = np.array([pos[str(x)] for x in images], dtype=np.int64)
        extra = {"valid": ok[take].astype(np.int8)} if allow_missing else {}
        return PredictionTable.from_arrays(
            [str(x) for x in images], va[take, 0], va[take, 1], expr[take], au[take], **extra
        )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedAffectModel:
    """Load a checkpoint folder written by :func:`save_checkpoint` (safetensors only, no pickle)."""
    model, config = load_mtl_model(path)
    return TrainedAffectModel(model, config, device)


__all__ = ["CheckpointError", "TrainedAffectModel", "load_model", "read_checkpoint_config", "save_checkpoint"]
