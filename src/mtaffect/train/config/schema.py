"""The training-config schema: one pydantic model per YAML section, each field with its type, default,
accepted values (a :class:`~mtaffect.train.config.rules.Rule`) and meaning.

A YAML lists only what differs from these defaults; a recipe's settings (``model.hparams``) default in
the recipe itself (``create_model``). Keys renamed for one name per concept are in :data:`RENAMED`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from mtaffect.data.units import WINDOW_EDGES
from mtaffect.models.base import TASKS
from mtaffect.models.image_model import MODES
from mtaffect.models.losses import LossConfig
from mtaffect.train.config.rules import (
    Rule,
    auto_or,
    choice,
    devices_check,
    flag,
    grid_check,
    groups_check,
    hparams_check,
    integer,
    listing,
    mapping,
    number,
    optional,
    options_check,
    partial_config,
    partial_configs,
    text,
)
from mtaffect.train.images.augment import PRESETS

#: What ``trainer.select`` may name: the tasks' terms of P, or one CCC of VA (the recipe-3 peer selected
#: on AU F1 + EXPR F1 + CCC_V + CCC_A of the tasks each model trained: valence alone where arousal was off).
SELECT_TERMS = (*TASKS, "valence", "arousal")
#: ``optim.schedule`` values (:func:`mtaffect.train.module.lr_lambda`).
SCHEDULES = ("cosine", "constant", "warmup_constant")
#: Upper bound of epochs and patience: beyond it a value is a typo (``1e20``), not a plan.
MAX_EPOCHS = 100_000
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed")
EXPORT_KEYS = ("splits", "batch_size", "workers", "device")
#: Keys renamed for one name per concept: the old key's error says the new one (no silent alias).
RENAMED = {
    "backbone": {"kwargs": "options", "stages": "train_stages"},
    "pipeline": {"task_model": "task_defaults", "enhanced_model": "enhanced_defaults"},
}


class Section(BaseModel):
    """A config section: unknown keys refused; values checked again when assigned in code."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=False)


# rules shared by several fields
HPARAMS = Rule("mapping", "the recipe's settings (checked when it is built)", hparams_check)
CHANNELS = optional(listing(number(), non_empty=True, what="numbers"), "the backbone's")
OPTIONS = Rule("mapping", "data only; never trust_remote_code", options_check)
GROUPS = Rule("mapping", "{submodule: {lr, weight_decay}}", groups_check)
PARTIALS = Rule("mapping", "name -> partial config", partial_configs)
PARTIAL = Rule("partial config", "", partial_config)
LOSS = LossConfig()  # the losses' defaults live with the losses


class ModelSection(Section):
    recipe: Annotated[str, text()] = Field(
        "", description="the recipe (required): emotinet, au-graph, progressive, queries-gcn, ..."
    )
    hparams: Annotated[dict[str, Any], HPARAMS] = Field(
        default_factory=dict, description="create_model(recipe, **hparams): what differs from its defaults"
    )


class DataSection(Section):
    batch_size: Annotated[int, integer(1)] = Field(
        256, description="rows (frames) per batch; temporal models: batch_size // window windows"
    )
    eval_batch_size: Annotated[int, integer(1)] = Field(
        4096, description="rows per validation/prediction batch"
    )
    window: Annotated[int, integer(1)] = Field(32, description="temporal models: frames per window")
    stride: Annotated[int, integer(1)] = Field(
        16, description="temporal models: training window step (validation/prediction use window)"
    )
    window_edge: Annotated[str, choice(*WINDOW_EDGES)] = Field(
        "pad", description="a video's last window: pad (repeat, masked) or shift (end on its last frame)"
    )
    in_memory: Annotated[str | bool, choice("auto", True, False)] = Field(
        "auto", description="load the needed arrays into RAM (auto: when they fit memory_limit_gb)"
    )
    memory_limit_gb: Annotated[float, number(0)] = Field(
        8.0, description="per process (under DDP each rank holds only its share)"
    )
    workers: Annotated[int | str, auto_or(integer(0))] = Field(
        "auto", description="DataLoader processes per rank (auto: images 2; store 0 in RAM, else up to 4)"
    )


class OptimSection(Section):
    lr: Annotated[float, number(0, lo_open=True)] = Field(1e-3, description="AdamW learning rate")
    weight_decay: Annotated[float, number(0)] = Field(1e-2, description="AdamW weight decay")
    warmup_epochs: Annotated[float, number(0)] = Field(
        1.0, description="linear warm-up length (may be fractional)"
    )
    min_lr_ratio: Annotated[float, number(0, 1)] = Field(0.01, description="cosine floor as a fraction of lr")
    grad_clip: Annotated[float, number(0, hint=" (0: no clipping)")] = Field(
        0.0, description="gradient norm clip"
    )
    schedule: Annotated[str, choice(*SCHEDULES)] = Field(
        "cosine", description="warm-up then cosine to min_lr_ratio; lr all along; warm-up then lr"
    )
    decay_all: Annotated[bool, flag()] = Field(
        False, description="true: weight decay on every parameter (backbone biases, norms, tokens too)"
    )
    groups: Annotated[dict[str, Any], GROUPS] = Field(
        default_factory=dict, description="a recipe submodule's own AdamW group"
    )


class LossSection(Section):
    weights: Annotated[dict[str, float], mapping(number(0), keys=TASKS, defaults=LOSS.weights)] = Field(
        default_factory=lambda: dict(LOSS.weights), description="each task's weight in the loss (one > 0)"
    )
    au_loss: Annotated[str, choice("bce", "wal")] = Field(
        LOSS.au_loss, description="per-AU BCE or the weighted asymmetric loss"
    )
    au_pos_weight: Annotated[bool, flag()] = Field(
        LOSS.au_pos_weight, description="bce: negatives/positives per AU; wal: occurrence weights"
    )
    expr_class_weights: Annotated[bool, flag()] = Field(
        LOSS.expr_class_weights, description="class-weighted cross-entropy"
    )
    va_weights: Annotated[
        dict[str, float], mapping(number(0), keys=("valence", "arousal"), defaults=LOSS.va_weights)
    ] = Field(default_factory=lambda: dict(LOSS.va_weights), description="the two CCC terms of the VA loss")


class TrainerSection(Section):
    epochs: Annotated[int, integer(1, MAX_EPOCHS)] = Field(20, description="epochs per stage")
    patience: Annotated[int, integer(0, MAX_EPOCHS)] = Field(
        5, description="early stopping on val P (0: off)"
    )
    seed: Annotated[int, integer(0, 2**32 - 1, hint=" (numpy's seed range)")] = Field(
        0, description="the run's seed"
    )
    accelerator: Annotated[str, choice(*ACCELERATORS)] = Field("auto", description="Lightning accelerator")
    devices: Annotated[int | str, Rule("count or list", ">= 1 | -1 | auto | '0,1'", devices_check)] = Field(
        1, description="devices per node"
    )
    strategy: Annotated[str, choice(*STRATEGIES)] = Field("auto", description="Lightning strategy")
    num_nodes: Annotated[int, integer(1)] = Field(1, description="nodes (DDP)")
    precision: Annotated[str, choice(*PRECISIONS)] = Field(
        "auto", description="auto: bf16-mixed on a GPU that supports it, else 32-true"
    )
    progress: Annotated[bool, flag()] = Field(True, description="progress bars")
    log_every_n_steps: Annotated[int, integer(1)] = Field(50, description="Lightning logging interval")
    au_threshold: Annotated[float, number(0, 1, lo_open=True, hi_open=True)] = Field(
        0.5, description="AU threshold stored in checkpoints and used for validation F1"
    )
    num_threads: Annotated[int, integer(0, hint=" (0: automatic)")] = Field(
        0, description="torch threads per process (0: the CPUs divided by the processes)"
    )
    tasks: Annotated[list[str], listing(choice(*TASKS), distinct=True, non_empty=True, what="tasks")] = Field(
        default_factory=lambda: list(TASKS), description="the tasks this run trains"
    )
    select: Annotated[list[str], listing(choice(*SELECT_TERMS), distinct=True, what="tasks")] = Field(
        default_factory=list, description="tasks whose terms choose each stage's epoch ([]: the stage's)"
    )
    checkpoint_per_task: Annotated[bool, flag()] = Field(
        False, description="each task from its own best epoch; best/ an ensemble (not in pipelines)"
    )


class StageSettings(Section):
    """One stage's settings; ``None`` keeps ``trainer.epochs``, ``optim.lr``, ``data.batch_size``."""

    epochs: Annotated[int | None, optional(integer(1, MAX_EPOCHS), "trainer.epochs")] = Field(
        None, description="this stage's epochs"
    )
    lr: Annotated[float | None, optional(number(0, lo_open=True), "optim.lr")] = Field(
        None, description="this stage's lr"
    )
    batch_size: Annotated[int | None, optional(integer(1), "data.batch_size")] = Field(
        None, description="this stage's batch size"
    )


class BackboneSection(Section):
    name: Annotated[str, text()] = Field(
        "", description="a backbone (`mtaffect backbones`), hf:<id or folder>; empty: feature store"
    )
    weights: Annotated[str | None, optional(text(), "the backbone's default")] = Field(
        None, description="hub id or local folder (passed as weights=)"
    )
    image_size: Annotated[int | None, optional(integer(1), "the backbone's")] = Field(
        None, description="input side in pixels (DINOv2: a multiple of 14)"
    )
    mean: Annotated[list[float] | None, CHANNELS] = Field(
        None, description="normalisation of [0, 1] pixels, per channel (with std)"
    )
    std: Annotated[list[float] | None, CHANNELS] = Field(None, description="per channel (with mean)")
    options: Annotated[dict[str, Any], OPTIONS] = Field(
        default_factory=dict, description="other create_backbone options (`--backbone-arg` on the CLI)"
    )
    mode: Annotated[str, choice(*MODES)] = Field(
        "frozen", description="frozen (run on the fly, never trained) or finetune"
    )
    lr: Annotated[float | None, optional(number(0, lo_open=True), "optim.lr")] = Field(
        None, description="finetune: the backbone's lr"
    )
    weight_decay: Annotated[float | None, optional(number(0), "optim.weight_decay")] = Field(
        None, description="finetune: the backbone's weight decay (never on biases/norms/tokens)"
    )
    layer_decay: Annotated[float, number(0, 1, lo_open=True)] = Field(
        1.0, description="finetune: lr x layer_decay^(depth from the top)"
    )
    frozen_blocks: Annotated[int, integer(0)] = Field(
        0, description="finetune: keep the stem and the first N blocks frozen"
    )
    grad_checkpointing: Annotated[bool, flag()] = Field(
        False, description="finetune: recompute activations in backward (ViTs)"
    )
    train_stages: Annotated[list[str] | None, optional(listing(text(), what="stage names"), "all")] = Field(
        None, description="finetune: the recipe stages in which the backbone trains"
    )

    def factory_kwargs(self) -> dict[str, Any]:
        """``create_backbone(name, **factory_kwargs())``: the options plus the set shortcuts.

        Returns:
            The keyword arguments of the backbone factory.
        """
        out = dict(self.options)
        for key in ("weights", "image_size", "mean", "std"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class AugmentSection(Section):
    preset: Annotated[str, choice(*PRESETS)] = Field(
        "none", description="augmentation preset (mtaffect.train.images.augment)"
    )
    ops: Annotated[dict[str, Any], mapping()] = Field(
        default_factory=dict, description="per-op overrides: {op: {param: value}} or {op: false}"
    )
    per_frame: Annotated[bool, flag()] = Field(
        False, description="true: each frame of a window gets its own transform"
    )


class SearchSection(Section):
    grid: Annotated[list[dict[str, Any]], Rule("list of mappings", "{hparam: value}", grid_check)] = Field(
        default_factory=list, description="mtaffect search: one variant per entry"
    )


class PipelineSection(Section):
    """Recipe 3 as published (:mod:`mtaffect.train.pipeline`); each partial config is merged onto the
    config (:func:`mtaffect.train.pipeline_steps.step_config`)."""

    task_models: Annotated[dict[str, Any], PARTIALS] = Field(
        default_factory=dict, description="task -> its model's partial config (it trains that task alone)"
    )
    task_defaults: Annotated[dict[str, Any], PARTIAL] = Field(
        default_factory=dict, description="merged into every task model"
    )
    export: Annotated[dict[str, Any], mapping(keys=EXPORT_KEYS)] = Field(
        default_factory=dict, description="the task models' export to stores"
    )
    enhanced: Annotated[dict[str, Any], PARTIALS] = Field(
        default_factory=dict, description="the enhanced models, by name"
    )
    enhanced_defaults: Annotated[dict[str, Any], PARTIAL] = Field(
        default_factory=dict, description="merged into every enhanced model"
    )
    combine: Annotated[dict[str, str], mapping(text(), keys=TASKS)] = Field(
        default_factory=dict, description="task -> the enhanced model answering it"
    )

    @property
    def enabled(self) -> bool:
        """True when the config is a pipeline of trainings."""
        return bool(self.task_models or self.enhanced)


class TrainConfig(Section):
    """A training config. ``source`` is the YAML it was read from (not a setting: never written)."""

    model: ModelSection = Field(default_factory=ModelSection, description="the recipe")
    data: DataSection = Field(default_factory=DataSection, description="batches, windows, loading")
    optim: OptimSection = Field(default_factory=OptimSection, description="AdamW and its schedule")
    loss: LossSection = Field(default_factory=LossSection, description="the losses")
    trainer: TrainerSection = Field(default_factory=TrainerSection, description="the loop")
    stages: dict[str, StageSettings] = Field(default_factory=dict, description="per-stage settings by name")
    search: SearchSection = Field(default_factory=SearchSection, description="mtaffect search")
    backbone: BackboneSection = Field(default_factory=BackboneSection, description="training from images")
    augment: AugmentSection = Field(default_factory=AugmentSection, description="image training only")
    pipeline: PipelineSection = Field(default_factory=PipelineSection, description="recipe 3 as published")
    source: str | None = Field(None, exclude=True)

    @property
    def from_images(self) -> bool:
        """True when the config trains from images (it names a backbone), not from a feature store."""
        return bool(self.backbone.name)

    def to_dict(self) -> dict:
        """Every setting, defaults included: ``config_from_dict(cfg.to_dict())`` gives the same config.

        Returns:
            The config as plain YAML-safe values (what a run folder's ``config.yaml`` holds).
        """
        return self.model_dump(mode="python", exclude={"source"})

    # replaces pydantic's deprecated BaseModel.copy(include=..., ...): callers have always meant a deep copy
    def copy(self) -> TrainConfig:  # type: ignore[override]
        """A deep copy (sections and mappings are not shared)."""
        return self.model_copy(deep=True)

    def stage(self, name: str) -> StageSettings:
        """The settings of stage ``name`` (all ``None`` when the config has none for it).

        Args:
            name: a recipe stage name.

        Returns:
            The stage's settings.
        """
        return self.stages.get(name) or StageSettings()


SECTIONS: dict[str, type[BaseModel] | None] = {
    name: (f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None)
    for name, f in TrainConfig.model_fields.items()
    if name != "source"
}
#: Mapping-valued fields whose keys are free (an override may name one entry: ``model.hparams.dim=8``).
FREE_KEYS = {
    ("model", "hparams"),
    ("loss", "weights"),
    ("loss", "va_weights"),
    ("backbone", "options"),
    ("augment", "ops"),
    ("optim", "groups"),
}
