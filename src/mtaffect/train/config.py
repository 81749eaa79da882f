"""Training configuration: one YAML per recipe (``configs/*.yaml``) read into dataclasses.

Layout (every section optional except ``model.recipe``)::

    model:   {recipe: emotinet, hparams: {...}}        # hparams go to create_model(recipe, ...)
    data:    {batch_size, eval_batch_size, window, stride, in_memory, memory_limit_gb, num_workers}
    optim:   {lr, weight_decay, warmup_epochs, min_lr_ratio, grad_clip}
    loss:    {weights: {au, expr, va}, au_loss: bce|wal, au_pos_weight, expr_class_weights}
    trainer: {epochs, patience, seed, accelerator, devices, strategy, num_nodes, precision, progress,
              log_every_n_steps, au_threshold, num_threads}
    stages:  {<stage name>: {epochs, lr, batch_size}}   # per-stage settings (each optional)
    search:  {grid: [{hparam: value, ...}, ...]}        # mtaffect search: one run per entry

``--override section.key=value`` (value parsed as YAML) changes one field; unknown keys are errors
that list the valid ones. ``model.hparams.*`` accepts any name (the recipe checks them when built);
``stages.<name>.<key>`` sets one stage (the names are the recipe's stages, checked when training).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtaffect.models.losses import LossConfig


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the file/key and what is allowed."""


@dataclass
class ModelSection:
    recipe: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    batch_size: int = 256  # rows (frames) per batch; temporal models: batch_size // window windows
    eval_batch_size: int = 4096
    window: int = 32  # temporal models: frames per window
    stride: int = 16  # temporal models: training window step (validation/prediction use `window`)
    in_memory: str | bool = "auto"  # load the needed arrays into RAM when they fit memory_limit_gb
    memory_limit_gb: float = 8.0  # per process (under DDP each rank holds only its share of the rows)
    num_workers: int | str = "auto"  # batch-reading processes; auto: 0 in RAM, up to 4 memory-mapped


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0  # linear warm-up length (may be fractional); lr > 0 from the first step
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # 0: no clipping


@dataclass
class TrainerSection:
    epochs: int = 20
    patience: int = 5  # early stopping on val P (0: off)
    seed: int = 0
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int | str = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on a GPU that supports it, else 32-true (AMP is GPU only)
    progress: bool = True
    log_every_n_steps: int = 50
    au_threshold: float = 0.5  # threshold stored in checkpoints and used for the validation AU F1
    num_threads: int = 0  # torch threads per process; 0: the CPUs divided by the processes on this node


@dataclass
class StageSettings:
    """One stage's settings; ``None`` keeps ``trainer.epochs``, ``optim.lr``, ``data.batch_size``."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None


@dataclass
class SearchSection:
    grid: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    stages: dict[str, StageSettings] = field(default_factory=dict)
    search: SearchSection = field(default_factory=SearchSection)
    source: str | None = None  # the YAML it was read from (not a setting)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    def copy(self) -> TrainConfig:
        return copy.deepcopy(self)

    def stage(self, name: str) -> StageSettings:
        """The settings of stage ``name`` (all ``None`` when the config has none for it)."""
        return self.stages.get(name) or StageSettings()


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "source"}
_STAGE_KEYS = {f.name: f for f in dataclasses.fields(StageSettings)}
_FREE_KEYS = {("model", "hparams"), ("loss", "weights")}  # dict-valued fields


def _check_type(value: Any, default: Any, where: str) -> Any:
    """Coerce/validate a scalar against the default's type (ints accepted for floats)."""
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, float) and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(default, (int, float, str, list, dict)) and not isinstance(value, type(default)):
        if where.endswith(".devices") and isinstance(value, str):  # devices: int | "auto"
            return value
        if where.endswith(".num_workers") and isinstance(value, int) and not isinstance(value, bool):
            return value  # num_workers: "auto" | int
        if isinstance(default, str) and isinstance(value, bool):  # in_memory: "auto" | bool
            return value
        raise ConfigError(f"{where} must be a {type(default).__name__}, got {value!r}")
    return value


def _build_stages(raw: Any, where: str) -> dict[str, StageSettings]:
    """``stages: {name: {epochs, lr, batch_size}}``; each value checked (``None`` keeps the config's)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) or v is None for v in raw.values()):
        raise ConfigError(f"{where}: stages must map stage names to {{epochs, lr, batch_size}}")
    out = {}
    for stage, values in raw.items():
        values = values or {}
        unknown = sorted(set(values) - set(_STAGE_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown} in stages.{stage}; valid keys: {sorted(_STAGE_KEYS)}"
            )
        settings = StageSettings()
        for key, value in values.items():
            if value is not None:
                example = 1.0 if key == "lr" else 1
                value = _check_type(value, example, f"{where}: stages.{stage}.{key}")
                if value <= 0:
                    raise ConfigError(f"{where}: stages.{stage}.{key} must be > 0, got {value!r}")
            setattr(settings, key, value)
        out[str(stage)] = settings
    return out


def _build_section(name: str, raw: Any, where: str) -> Any:
    if name == "stages":
        return _build_stages(raw, where)
    cls = _SECTIONS[name].default_factory  # type: ignore[misc]
    obj = cls()
    if raw is None:
        return obj
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section {name!r} must be a mapping, got {type(raw).__name__}")
    valid = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} in section {name!r}; valid keys: {sorted(valid)}"
        )
    for key, value in raw.items():
        default = getattr(obj, key)
        if (name, key) in _FREE_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name}.{key} must be a mapping, got {value!r}")
            value = {**default, **value} if key == "weights" else dict(value)
        else:
            value = _check_type(value, default, f"{where}: {name}.{key}")
        setattr(obj, key, value)
    return obj


def config_from_dict(raw: dict, where: str = "<config>") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a config is a mapping of sections {sorted(_SECTIONS)}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; valid sections: {sorted(_SECTIONS)}")
    cfg = TrainConfig(**{name: _build_section(name, raw.get(name), where) for name in _SECTIONS})
    cfg.source = None if where.startswith("<") else where
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "<config>") -> None:
    """Check values that would otherwise fail late (mid-training) with an obscure message."""
    if not cfg.model.recipe:
        raise ConfigError(
            f"{where}: model.recipe is required (e.g. emotinet, au-graph, progressive, queries-gcn)"
        )
    checks = [
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
        (cfg.data.window >= 1 and cfg.data.stride >= 1, "data.window and data.stride must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.trainer.epochs >= 1, "trainer.epochs must be >= 1"),
        (cfg.trainer.patience >= 0, "trainer.patience must be >= 0"),
        (0 < cfg.trainer.au_threshold < 1, "trainer.au_threshold must be in (0, 1)"),
        (cfg.trainer.strategy in ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"),
         "trainer.strategy must be auto, ddp or ddp_spawn"),
        (cfg.trainer.precision in ("auto", "32-true", "32", "bf16-mixed", "16-mixed"),
         "trainer.precision must be auto, 32-true, bf16-mixed or 16-mixed"),
        (cfg.data.in_memory in ("auto", True, False), "data.in_memory must be auto, true or false"),
        (cfg.data.num_workers == "auto" or (isinstance(cfg.data.num_workers, int)
                                             and cfg.data.num_workers >= 0),
         "data.num_workers must be auto or an integer >= 0"),
        (cfg.trainer.num_threads >= 0, "trainer.num_threads must be >= 0 (0: automatic)"),
        (isinstance(cfg.search.grid, list) and all(isinstance(g, dict) for g in cfg.search.grid),
         "search.grid must be a list of mappings {hparam: value}"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")
    unknown = set(cfg.loss.weights) - {"au", "expr", "va"}
    if unknown:
        raise ConfigError(f"{where}: loss.weights has unknown task(s) {sorted(unknown)}; tasks: au, expr, va")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, str(p))


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """``section.key=value`` (``model.hparams.name=value``) applied to a raw config dict (a copy)."""
    out = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. trainer.epochs=5)")
        parts = key.split(".")
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {parts[0]!r}; valid: {sorted(_SECTIONS)}")
        free = len(parts) == 3 and ((parts[0], parts[1]) in _FREE_KEYS or parts[0] == "stages")
        if (len(parts) != 2 and not free) or (parts[0] == "stages" and len(parts) != 3):
            raise ConfigError(
                f"override {item!r}: use section.key=value, or model.hparams.<name>=value / "
                "loss.weights.<task>=value / stages.<stage>.<epochs|lr|batch_size>=value"
            )
        if len(parts) == 2:
            valid = {f.name for f in dataclasses.fields(_SECTIONS[parts[0]].default_factory())}  # type: ignore[misc]
            if parts[1] not in valid:
                raise ConfigError(
                    f"override {item!r}: unknown key {parts[1]!r} in section {parts[0]!r}; valid keys: "
                    f"{sorted(valid)}"
                )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = out
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out
