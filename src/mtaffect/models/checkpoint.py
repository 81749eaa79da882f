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

:func:`load_model` returns a :class:`TrainedAffectModel` (a :class:`FaceAffectModel`).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtaffect.features.registry import CODE_EXECUTING_OPTIONS, options_from_file, with_trust
from mtaffect.models.base import AffectOutputs, MTLModel, outputs_to_probs
from mtaffect.persist import (
    CHECKPOINT,
    atomic_folder,
    check_replaceable,
    header,
    read_header_file,
    write_json,
)
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS

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
    backbone_weights: Any = None,
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
        isinstance(k, str) and k.isidentifier() and isinstance(v, dict)
        and isinstance(v.get("fingerprint"), str | None) for k, v in named.items()
    ):  # fmt: skip
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
        and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t <= 1
                for t in thr)
    ):  # fmt: skip
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
    from mtaffect.models.registry import create_model

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


class TrainedAffectModel:
    """A trained recipe ready for prediction: implements :class:`mtaffect.models.base.FaceAffectModel`.

    ``predict(features, logits, tokens)`` takes N faces, one time step each. Temporal recipes also
    accept one sequence ``(1, T, ...)`` (consecutive frames of one video) and then return T rows;
    (N, ...) input is treated as N sequences of length 1 (no temporal context).
    :meth:`predict_store` predicts a whole store, temporal recipes over windows of each video;
    :meth:`predict_images` the same from face crops (the backbone runs on them);
    :meth:`create_backbone` builds the backbone the model was trained with (fine-tuned weights included).
    ``backbone_module`` gives an already built backbone (e.g. a model still in memory after training).
    """

    def __init__(
        self, model: MTLModel, config: dict, device: str | torch.device = "cpu", *,
        path: str | os.PathLike | None = None, backbone_module: Any = None, trust_remote_code: bool = False,
    ) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.path = None if path is None else Path(path)
        self._backbone_module = backbone_module
        bb = config["backbone"]
        self.backbone: str = bb["name"]
        kwargs = options_from_file(bb.get("kwargs"), "checkpoint config: backbone.kwargs")
        self.backbone_kwargs: dict = with_trust(self.backbone, kwargs, trust_remote_code)
        self.backbone_weights: str | None = bb.get("weights")  # fine-tuned weights inside the checkpoint
        self.fingerprint: str | None = bb.get("fingerprint")
        self.failures: list[tuple[str, str]] = []  # images predict_images could not read
        self.au_thresholds = np.asarray(config.get("au_thresholds", [DEFAULT_AU_THRESHOLD] * NUM_AUS), float)
        self.temporal = bool(config.get("temporal", False))
        self.window = int(config.get("window", 1))
        self.window_edge = str(config.get("window_edge", "pad"))
        self.inputs: tuple[str, ...] = tuple(config.get("inputs", model.inputs))
        self.metrics: dict = config.get("metrics", {})
        # named stores the model reads (features@au ...): {name: {backbone, fingerprint}}
        self.input_stores: dict[str, dict] = dict(config.get("input_stores", {}))

    @property
    def store_inputs(self) -> tuple[str, ...]:
        """Inputs read from named stores (``features@<name>``), not from this model's own backbone."""
        return tuple(i for i in self.inputs if "@" in i)

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

    def create_backbone(self) -> Any:
        """The backbone this model reads: ``create_backbone(name, **kwargs)``, with the checkpoint's own
        fine-tuned weights when it has them (eval mode, on the model's device)."""
        if self._backbone_module is not None:
            return self._backbone_module.to(self.device).eval()
        from mtaffect.features.registry import create_backbone

        kwargs = dict(self.backbone_kwargs)
        where = self.path / CONFIG if self.path is not None else "the checkpoint config"
        # backbone_kwargs come from the file through options_from_file (no code-running option) plus
        # the caller's own trust_remote_code decision (with_trust), never anything else
        if self.backbone_weights:
            folder = (self.path / self.backbone_weights) if self.path is not None else None
            if folder is None or not folder.is_dir() or self.path.resolve() not in folder.resolve().parents:
                raise CheckpointError(
                    f"{where}: the fine-tuned backbone's weights ({self.backbone_weights!r}) are not a "
                    "folder inside the checkpoint; the checkpoint is damaged"
                )
            kwargs["weights"] = str(folder)
        return create_backbone(self.backbone, **kwargs).to(self.device).eval()

    def _predict_units(
        self, inputs: Any, images: Sequence[str], batch_size: int, valid: np.ndarray | None = None
    ) -> Any:
        """The prediction loop of :meth:`predict_store` / :meth:`predict_images`: ``inputs(batches)``
        yields, in order, the model's input arrays for each array of positions (into the de-duplicated
        names) of ``batches``. ``valid`` (per de-duplicated name) adds the table's ``valid`` column."""
        from mtaffect.data.predictions import PredictionTable
        from mtaffect.data.units import make_windows, split_image_names

        names = list(dict.fromkeys(str(x) for x in images))
        n = len(names)
        va = np.zeros((n, 2))
        expr = np.zeros((n, 8))
        au = np.zeros((n, NUM_AUS))
        if self.temporal:
            video, frame = split_image_names(names, strict=False)
            units, mask = make_windows(video, frame, self.window, self.window, self.window_edge)
            bs = max(1, batch_size // self.window)
        else:
            units, mask, bs = np.arange(n), None, batch_size
        starts = range(0, len(units), bs)
        for s, arrays in zip(starts, inputs([units[s : s + bs] for s in starts]), strict=True):
            pos = units[s : s + bs]
            probs = outputs_to_probs(self._forward(arrays))
            idx = pos
            if mask is not None:
                keep = mask[s : s + bs]
                idx = pos[keep]
                probs = AffectOutputs(probs.va[keep], probs.expr_probs[keep], probs.au_probs[keep])
            va[idx], expr[idx], au[idx] = probs.va, probs.expr_probs, probs.au_probs
        pos = {name: i for i, name in enumerate(names)}
        take = np.array([pos[str(x)] for x in images], dtype=np.int64)
        extra = {"valid": np.asarray(valid)[take].astype(np.int8)} if valid is not None else {}
        return PredictionTable.from_arrays(
            [str(x) for x in images], va[take, 0], va[take, 1], expr[take], au[take], **extra
        )

    def _store_set(self, store: Any, stores: Mapping[str, Any] | None) -> Any:
        """``store`` (a store, its path or a StoreSet) with the named ``stores``, checked against the
        backbones this model was trained on."""
        from mtaffect.features.reader import StoreSet
        from mtaffect.features.store import FeatureStore

        if isinstance(store, StoreSet):
            st = store
        else:
            main = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
            named = StoreSet.open(dict(stores)).stores if stores else {}
            st = StoreSet({"": main, **named}) if named else main
        main_store = st.main if isinstance(st, StoreSet) else st
        if self.fingerprint and main_store.fingerprint != self.fingerprint:
            main_store.check_compatible(self.fingerprint, self.backbone)
        self._check_named(st if isinstance(st, StoreSet) else None)
        return st

    def _check_named(self, stores: Any) -> None:
        if not self.store_inputs:
            return
        if stores is None:
            from mtaffect.features.reader import store_names

            names = sorted(store_names(self.store_inputs))
            raise CheckpointError(
                f"this model fuses features of other models ({', '.join(self.store_inputs)}): give the "
                f"stores they were exported into ({', '.join(f'{n}=STORE' for n in names)}), or predict "
                "with the combined model that holds those models (a pipeline run's best/)"
            )
        for key, rec in self.input_stores.items():
            if key in stores.stores and rec.get("fingerprint"):
                stores.stores[key].check_compatible(rec["fingerprint"], rec.get("backbone"))

    def predict_store(
        self, store: Any, images: Sequence[str], batch_size: int = 4096, *, allow_missing: bool = False,
        stores: Mapping[str, Any] | None = None,
    ) -> Any:  # fmt: skip
        """A PredictionTable for ``images`` (repeats allowed) from a FeatureStore (or its path).

        Temporal recipes see windows of ``window`` consecutive listed frames of one video (sorted by
        frame, the last padded or shifted as in training); every frame is predicted exactly once.
        A model reading named stores (``features@au``) gets them from ``stores`` (``{name: store}``)
        or from ``store`` given as a :class:`~mtaffect.features.reader.StoreSet`.

        Images whose extraction failed (their store rows are zeros) are an error
        (:class:`mtaffect.features.reader.FailedImagesError`, counting them and naming the first few).
        With ``allow_missing`` the table gets a ``valid`` column: 0 for those rows, whose values are
        the model's output on zero features (placeholders to filter or fill), 1 for the others.
        """
        from mtaffect.features.reader import InputSource, check_valid

        if self.backbone_weights:
            raise CheckpointError(
                f"this model fine-tuned its backbone ({self.backbone!r}): no feature store holds its "
                "features; predict from the images (infer --data, predict)"
            )
        st = self._store_set(store, stores)
        names = list(dict.fromkeys(str(x) for x in images))
        rows = st.rows(names)
        ok = check_valid(st, rows, names, allow_missing=allow_missing)
        source = InputSource(st, rows, self.inputs, in_memory=False)
        return self._predict_units(
            lambda batches: map(source.get, batches), images, batch_size, ok if allow_missing else None
        )

    def _decoded(self, folder: str | os.PathLike, names: Sequence[str], batches: list[np.ndarray], spec: Any,
                 workers: int) -> Any:  # fmt: skip
        """Normalised pixels on the model's device for each array of positions (into ``names``) of
        ``batches``, decoded in ``workers`` processes exactly as extraction decodes; failures are added
        to :attr:`failures`."""
        from torch.utils.data import DataLoader

        from mtaffect.features.base import normalise, pixels_to_unit
        from mtaffect.features.decode import ImageReader, ReaderBatches

        reader = ImageReader(folder, list(names), spec.input_size, spec.colour)
        decoded = DataLoader(ReaderBatches(reader, batches), batch_size=None, num_workers=workers)
        for pixels, _, failed in decoded:
            self.failures.extend(failed)
            x = pixels_to_unit(torch.as_tensor(pixels).to(self.device), spec.colour)
            yield normalise(x, spec.mean, spec.std)

    @torch.no_grad()
    def backbone_features(
        self, folder: str | os.PathLike, images: Sequence[str], batch_size: int = 256, workers: int = 0
    ) -> np.ndarray:
        """This model's backbone features (float32, one row per distinct name of ``images``) of face
        crops under ``folder``: what ``mtaffect extract --backbone run:<this run>`` stores, in memory.
        Unreadable images give zero rows and are listed in :attr:`failures`."""
        from mtaffect.models.image_model import ImageMTLModel

        bb = self.create_backbone()
        loop = ImageMTLModel(bb, self.model)
        names = list(dict.fromkeys(str(x) for x in images))
        self.failures = []
        batches = [np.arange(s, min(s + batch_size, len(names))) for s in range(0, len(names), batch_size)]
        out = np.zeros((len(names), bb.spec.feature_dim), dtype=np.float32)
        for pos, x in zip(batches, self._decoded(folder, names, batches, bb.spec, workers), strict=True):
            out[pos] = loop.backbone_outputs(x)["features"].float().cpu().numpy()
        bad = {n for n, _ in self.failures}
        if bad:
            out[[i for i, n in enumerate(names) if n in bad]] = 0.0
        return out

    @torch.no_grad()
    def predict_images(
        self, folder: str | os.PathLike, images: Sequence[str], batch_size: int = 256, workers: int = 0,
        *, allow_missing: bool = False, stores: Mapping[str, Any] | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> Any:  # fmt: skip
        """A PredictionTable for ``images`` (names relative to ``folder``, e.g. a dataset's
        ``cropped_aligned``), decoded and normalised exactly as extraction does, through the backbone.

        ``workers`` decoding processes (0: decode here) prepare the next batches while the backbone
        runs. Unreadable images (missing, truncated) are an error counting them and naming the first
        few (:class:`mtaffect.features.reader.FailedImagesError`), as :meth:`predict_store`; with
        ``allow_missing`` the table gets a ``valid`` column, 0 for those rows (predicted from a black
        image, as extraction stores them: placeholders to filter or fill). ``self.failures`` lists them.

        A model that also reads named stores (``features@au``) takes them from ``stores``
        (``{name: store}``, read by image name) or ``extra`` (``{input name: array}``, one row per
        distinct name of ``images`` in order: what a combined model computes with the task models).
        """
        from mtaffect.features.reader import FailedImagesError, InputSource, StoreSet, check_valid
        from mtaffect.models.image_model import ImageMTLModel

        bb = self.create_backbone()
        loop = ImageMTLModel(bb, self.model)  # frozen: the same backbone -> head path as training
        names = list(dict.fromkeys(str(x) for x in images))
        self.failures = []
        named_valid = None
        read_named: Any = None
        if self.store_inputs and extra is not None:
            missing = [i for i in self.store_inputs if i not in extra]
            if missing:
                raise ValueError(f"extra lacks {missing}, which this model reads")

            def read_named(pos: np.ndarray) -> dict:
                return {i: torch.from_numpy(np.asarray(extra[i])[pos]) for i in self.store_inputs}
        elif self.store_inputs:
            sset = StoreSet.open(dict(stores)) if stores and not isinstance(stores, StoreSet) else stores
            self._check_named(sset)
            rows = sset.rows(names)
            named_valid = check_valid(sset, rows, names, allow_missing=allow_missing)
            read_named = InputSource(sset, rows, self.store_inputs, in_memory=False).get

        def inputs(batches: list[np.ndarray]):
            for pos, x in zip(batches, self._decoded(folder, names, batches, bb.spec, workers), strict=True):
                arrays = loop.backbone_outputs(x)
                if read_named is not None:
                    arrays.update(read_named(pos))
                yield arrays

        table = self._predict_units(inputs, images, batch_size)
        failed = dict(self.failures)
        if named_valid is not None:
            failed.update({n: "failed extraction in a named store" for n, ok in zip(names, named_valid,
                           strict=True) if not ok})  # fmt: skip
        if failed and not allow_missing:
            first = [f"{n} ({why})" for n, why in list(failed.items())[:5]]
            raise FailedImagesError(
                f"{len(failed)} of {len(names)} images could not be read under {folder}, e.g. "
                f"{'; '.join(first)}; fix them, or pass --allow-missing (allow_missing=True) to write "
                "their rows with valid = 0",
                list(failed),
            )
        if allow_missing:
            valid = np.array([n not in failed for n in table.frame["image"].astype(str)], dtype=np.int8)
            table = table.with_columns({"valid": valid})
        return table


def backbone_from_run(
    spec: str, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> Any:
    """``run:<folder>`` -> the backbone of a trained run (its ``best/``) or checkpoint folder, with its
    fine-tuned weights: ``mtaffect extract --backbone run:<run>`` exports its features into a store."""
    if not spec.startswith("run:") or not spec[4:]:
        raise ValueError(
            f"{spec!r}: a trained model's backbone is named run:<run folder or checkpoint folder>"
        )
    from mtaffect.models.ensemble import ENSEMBLE_FILE

    folder = Path(spec[4:]).expanduser()
    here = (folder / CONFIG).is_file() or (folder / ENSEMBLE_FILE).is_file()
    if not here and (folder / "best").is_dir():
        folder = folder / "best"  # a run folder: its selected model

    if (folder / ENSEMBLE_FILE).is_file():
        raise CheckpointError(
            f"{spec}: {folder} is an ensemble (several backbones): name one of its task models, e.g. "
            f"run:{folder / 'sources' / 'au'}, or the run that trained it"
        )
    if not (folder / CONFIG).is_file():
        raise CheckpointError(
            f"{spec}: {folder} is neither a run folder with best/ nor a checkpoint folder (no {CONFIG}); "
            "train it first (mtaffect train --out ...)"
        )
    return load_model(folder, device, trust_remote_code=trust_remote_code).create_backbone()


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> TrainedAffectModel:
    """Load a checkpoint folder written by :func:`save_checkpoint` (safetensors only, no pickle), or an
    ensemble folder (:mod:`mtaffect.models.ensemble`: one model per task) as an ``EnsembleAffectModel``.

    ``trust_remote_code=True`` lets an ``hf:`` backbone run the Python code its hub repository or
    folder ships (transformers' option of that name): the caller's decision, never the checkpoint's.
    """
    from mtaffect.models.ensemble import EnsembleAffectModel, is_ensemble

    if is_ensemble(path):  # one model per task (a pipeline run's best/)
        return EnsembleAffectModel(path, device, trust_remote_code=trust_remote_code)  # type: ignore[return-value]
    return load_checkpoint(path, device, trust_remote_code=trust_remote_code)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> TrainedAffectModel:
    """Load the checkpoint folder ``path`` (never an ensemble: what an ensemble's members are)."""
    model, config = load_mtl_model(path)
    return TrainedAffectModel(model, config, device, path=path, trust_remote_code=trust_remote_code)


__all__ = ["CheckpointError", "TrainedAffectModel", "backbone_from_run", "load_checkpoint", "load_model",
           "load_weights",
           "read_checkpoint_config", "save_checkpoint"]  # fmt: skip
