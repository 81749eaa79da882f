"""PostConfig: the tuned post-processing, saved as YAML and applied wherever predictions are made.

``apply`` runs blend -> smoothing -> expression bias (probabilities re-normalised); the per-AU
thresholds are not applied to the probabilities (hard decisions are the writers' job) but travel in
``au_thresholds`` for ``evaluate``, ``submit`` and the application's 0/1 columns.

File format (YAML; every section optional, defaults = no post-processing)::

    format: mtaffect-postproc
    version: 1
    kernels:        {va: {kind: gaussian, width: 6.0, causal: false, unit: frames}, expr: {...}, au: {...}}
    au_thresholds:  {AU1: 0.41, ..., AU26: 0.37}
    expr_bias:      {Neutral: 0.0, ..., Other: 0.2}      # log-probability offsets
    blend_weights:  {va: [0.6, 0.4], expr: [...], au: [...]}   # or null: a single model / equal mean
    info:           {...}                                 # how it was tuned (free-form, kept as is)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from mtaffect.data.predictions import PredictionTable
from mtaffect.io import atomic_open
from mtaffect.persist import POSTPROC, check_header, header
from mtaffect.post.blend import blend, check_weights
from mtaffect.post.smoothing import TASKS, Kernel, SmoothingError, smooth
from mtaffect.post.thresholds import apply_expr_bias
from mtaffect.schema import AU_NAMES, DEFAULT_AU_THRESHOLD, EXPR_NAMES, EXPR_PROB_COLUMNS, NUM_AUS, NUM_EXPR
from mtaffect.textfiles import read_yaml

FORMAT = POSTPROC.name
VERSION = POSTPROC.version
_KEYS = (
    "format",
    "format_version",
    "mtaffect_version",
    "version",
    "kernels",
    "au_thresholds",
    "expr_bias",
    "blend_weights",
    "info",
)
_KERNEL_KEYS = tuple(f.name for f in fields(Kernel))  # kind, width, causal, unit


class PostConfigError(ValueError):
    """A post-processing file that cannot be used; the message names the file and the key."""


def _identity_kernels() -> dict[str, Kernel]:
    return {t: Kernel() for t in TASKS}


@dataclass
class PostConfig:
    """Kernels per task, AU thresholds (12,), expression log-prob bias (8,), blend weights per task."""

    kernels: dict[str, Kernel] = field(default_factory=_identity_kernels)
    au_thresholds: np.ndarray = field(default_factory=lambda: np.full(NUM_AUS, DEFAULT_AU_THRESHOLD))
    expr_bias: np.ndarray = field(default_factory=lambda: np.zeros(NUM_EXPR))
    blend_weights: dict[str, list[float]] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        kernels = dict(self.kernels)
        unknown = [t for t in kernels if t not in TASKS]
        if unknown:
            raise PostConfigError(f"kernels: unknown task(s) {unknown}; use some of {list(TASKS)}")
        for t in TASKS:
            k = kernels.setdefault(t, Kernel())
            if not isinstance(k, Kernel):
                raise PostConfigError(f"kernels.{t} must be a Kernel, got {type(k).__name__}")
        self.kernels = {t: kernels[t] for t in TASKS}
        thr = np.asarray(self.au_thresholds, dtype=np.float64)
        if thr.shape != (NUM_AUS,) or not (np.isfinite(thr) & (thr >= 0) & (thr <= 1)).all():
            raise PostConfigError(f"au_thresholds needs {NUM_AUS} values in [0, 1] (order {list(AU_NAMES)})")
        self.au_thresholds = thr
        bias = np.asarray(self.expr_bias, dtype=np.float64)
        if bias.shape != (NUM_EXPR,) or not np.isfinite(bias).all():
            raise PostConfigError(f"expr_bias needs {NUM_EXPR} finite values (order {list(EXPR_NAMES)})")
        self.expr_bias = bias
        if self.blend_weights is not None:
            weights = dict(self.blend_weights)
            unknown = [t for t in weights if t not in TASKS]
            if unknown:
                raise PostConfigError(f"blend_weights: unknown task(s) {unknown}; use some of {list(TASKS)}")
            sizes = {len(list(w)) for w in weights.values()}
            if len(sizes) > 1:
                raise PostConfigError(
                    f"blend_weights: every task needs one weight per model, got sizes {sizes}"
                )
            try:
                self.blend_weights = {
                    t: check_weights(list(w), len(list(w)), t).tolist() for t, w in weights.items()
                }
            except ValueError as exc:
                raise PostConfigError(str(exc)) from None

    # ---- applying --------------------------------------------------------------------------------
    @property
    def n_models(self) -> int | None:
        """How many prediction tables the blend weights expect (None: any number, equal weights)."""
        if not self.blend_weights:
            return None
        return len(next(iter(self.blend_weights.values())))

    def apply(
        self,
        tables: PredictionTable | Sequence[PredictionTable],
        *,
        group_by: Sequence[str] = ("video",),
        frame_col: str = "frame",
    ) -> PredictionTable:
        """Blend (several tables) -> smooth (per ``group_by`` group, frame units) -> expression bias."""
        tables = [tables] if isinstance(tables, PredictionTable) else list(tables)
        expected = self.n_models
        if expected is not None and len(tables) != expected:
            raise PostConfigError(
                f"this post-processing blends {expected} model(s) but {len(tables)} prediction table(s) "
                "were given; pass them in the order used by `mtaffect tune`"
            )
        table = blend(tables, self.blend_weights)
        table = smooth(table, self.kernels, group_by=group_by, frame_col=frame_col)
        if self.expr_bias.any():
            probs = apply_expr_bias(table.expr_probs, self.expr_bias)
            table = table.with_columns({c: probs[:, j] for j, c in enumerate(EXPR_PROB_COLUMNS)})
        return table

    # ---- YAML ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            **header(POSTPROC),
            "kernels": {t: k.to_dict() for t, k in self.kernels.items()},
            "au_thresholds": {n: float(v) for n, v in zip(AU_NAMES, self.au_thresholds, strict=True)},
            "expr_bias": {n: float(v) for n, v in zip(EXPR_NAMES, self.expr_bias, strict=True)},
            "blend_weights": None
            if self.blend_weights is None
            else {t: [float(x) for x in w] for t, w in self.blend_weights.items()},
            "info": _plain(self.info),
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the YAML atomically; refuses an existing file unless ``overwrite``."""
        p = Path(path)
        with atomic_open(p, "w", overwrite=overwrite, encoding="utf-8", newline="\n") as fh:
            fh.write("# mtaffect post-processing (written by `mtaffect tune`; apply with --post)\n")
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False, default_flow_style=None, width=110)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> PostConfig:
        """Read a YAML file written by :meth:`save` (or by hand); errors name the file and the key."""
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise FileNotFoundError(f"post-processing file not found: {where}")
        data = read_yaml(p, "post-processing config (YAML, from `mtaffect tune`)", error=PostConfigError)
        return cls.from_dict({} if data is None else data, where)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "<post-processing>") -> PostConfig:
        if not isinstance(data, Mapping):
            raise PostConfigError(f"{where}: expected a mapping of sections {list(_KEYS)}")
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            raise PostConfigError(f"{where}: unknown key(s) {unknown}; expected some of {list(_KEYS)}")
        # a hand-written file may leave the header out; one that has it must be ours and not newer
        given = {"format": FORMAT, **data}
        if "format_version" not in given and "version" not in given:
            given["format_version"] = VERSION
        check_header(given, POSTPROC, where, PostConfigError)
        try:
            kernels = _kernels(data.get("kernels") or {}, where)
            thr = _named(data.get("au_thresholds"), AU_NAMES, DEFAULT_AU_THRESHOLD, "au_thresholds", where)
            bias = _named(data.get("expr_bias"), EXPR_NAMES, 0.0, "expr_bias", where)
            weights = data.get("blend_weights")
            if weights is not None and not isinstance(weights, Mapping):
                raise PostConfigError(f"{where}: blend_weights must map va/expr/au to lists of weights")
            info = data.get("info") or {}
            blend = None if weights is None else dict(weights)
            return cls(kernels=kernels, au_thresholds=thr, expr_bias=bias, blend_weights=blend, info=info)
        except (PostConfigError, SmoothingError) as exc:
            msg = str(exc)
            raise PostConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _kernels(raw: object, where: str) -> dict[str, Kernel]:
    if not isinstance(raw, Mapping):
        raise PostConfigError(f"{where}: kernels must map va/expr/au to {{{', '.join(_KERNEL_KEYS)}}}")
    out = {}
    for task, spec in raw.items():
        if task not in TASKS:
            raise PostConfigError(f"{where}: kernels: unknown task {task!r}; use some of {list(TASKS)}")
        if spec is None:
            out[task] = Kernel()
            continue
        if not isinstance(spec, Mapping) or set(spec) - set(_KERNEL_KEYS):
            raise PostConfigError(f"{where}: kernels.{task} must be a mapping with {', '.join(_KERNEL_KEYS)}")
        try:
            out[task] = Kernel(**dict(spec))
        except SmoothingError as exc:
            raise PostConfigError(f"{where}: kernels.{task}: {exc}") from None
    return out


def _named(raw: object, names: Sequence[str], default: float, key: str, where: str) -> np.ndarray:
    """Values by name (missing names keep ``default``) or a full list in schema order."""
    out = np.full(len(names), default, dtype=np.float64)
    if raw is None:
        return out
    if isinstance(raw, Mapping):
        unknown = [k for k in raw if k not in names]
        if unknown:
            raise PostConfigError(
                f"{where}: {key}: unknown name(s) {unknown}; expected some of {list(names)}"
            )
        items = [(names.index(k), k, v) for k, v in raw.items()]
    elif isinstance(raw, list) and len(raw) == len(names):
        items = [(i, names[i], v) for i, v in enumerate(raw)]
    else:
        raise PostConfigError(
            f"{where}: {key} must map {list(names)} to numbers (or list {len(names)} numbers)"
        )
    for i, name, value in items:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PostConfigError(f"{where}: {key}.{name} must be a number, got {value!r}")
        out[i] = float(value)
    return out


def _plain(obj: object) -> object:
    """Numpy scalars/arrays -> plain Python so that yaml.safe_dump accepts them."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
