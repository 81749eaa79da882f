"""A config's ``pipeline:`` expanded into one checked :class:`TrainConfig` per training step.

Each step's config is the config without its pipeline, with partial configs merged onto it
(:func:`merge_config`: mappings key by key, ``model.hparams`` included): ``pipeline.task_defaults`` then
``pipeline.task_models.<t>`` for task model ``t`` (which trains ``t`` alone), ``pipeline.enhanced_defaults``
then ``pipeline.enhanced.<name>`` for an enhanced model. :mod:`mtaffect.train.pipeline` runs the steps;
this module only plans their configs, so checking them costs no training import.
"""

from __future__ import annotations

import copy

from mtaffect.models.base import TASKS
from mtaffect.train.config import ConfigError, TrainConfig, config_from_dict

_PER_STEP = (
    "trainer.checkpoint_per_task applies to one training, not a pipeline step (each step's best/ must be "
    "one checkpoint: pipeline.combine already answers each task with its own model)"
)


def merge_config(base: dict, override: dict) -> dict:
    """``override`` (a partial config) merged onto a copy of ``base``.

    Args:
        base: a config as a mapping of sections.
        override: a partial config; mappings merge key by key, any other value replaces.

    Returns:
        The merged copy.
    """
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def step_config(cfg: TrainConfig, *overrides: dict, where: str = "<config>") -> TrainConfig:
    """The config of one pipeline step.

    Args:
        cfg: the pipeline config.
        *overrides: partial configs merged in order onto ``cfg`` without its pipeline and search.
        where: what messages name (file and pipeline key).

    Returns:
        The step's checked config.
    """
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

    Args:
        cfg: a config with a ``pipeline:`` section.
        where: what messages name (default: the config's file).

    Returns:
        The step configs, task models first.

    Raises:
        ConfigError: the pipeline or a step's config is wrong.
    """
    where = where or cfg.source or "<config>"
    p = cfg.pipeline
    out: dict[str, TrainConfig] = {}
    if not cfg.from_images:
        raise ConfigError(
            f"{where}: a pipeline fine-tunes task models from images: it needs a backbone section"
        )
    if cfg.trainer.checkpoint_per_task:
        raise ConfigError(f"{where}: {_PER_STEP}")
    for task, o in p.task_models.items():
        if task not in TASKS:
            raise ConfigError(f"{where}: pipeline.task_models names {task!r}; tasks are au, expr, va")
        here = f"{where}: pipeline.task_models.{task}"
        out[f"task_{task}"] = step_config(cfg, p.task_defaults, o, {"trainer": {"tasks": [task]}}, where=here)
    if not p.enhanced:
        raise ConfigError(f"{where}: pipeline.enhanced lists no enhanced model (e.g. au: {{}}, va: {{...}})")
    for name, o in p.enhanced.items():
        here = f"{where}: pipeline.enhanced.{name}"
        if not str(name).isidentifier():
            raise ConfigError(f"{here}: step names are plain names (au, expr, va, all)")
        step = step_config(cfg, p.enhanced_defaults, o, where=here)
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
            kind, _, step_name = name.partition("_")
            raise ConfigError(
                f"{where}: pipeline.{'task_models' if kind == 'task' else 'enhanced'}.{step_name}: "
                f"{_PER_STEP}"
            )
    for task, name in combine_map(cfg, where).items():
        if f"enhanced_{name}" not in out:
            raise ConfigError(
                f"{where}: pipeline.combine.{task} names {name!r}, not a model of pipeline.enhanced "
                f"({sorted(p.enhanced)})"
            )
    return out


def fused_tasks(step: TrainConfig) -> tuple[str, ...]:
    """The task models whose exported features an enhanced model fuses.

    Args:
        step: an enhanced model's config (``model.hparams.fusion_tasks``; the recipe's default: all three).

    Returns:
        The tasks in canonical order.
    """
    fused = step.model.hparams.get("fusion_tasks", list(TASKS))
    fused = [fused] if isinstance(fused, str) else list(fused or [])
    return tuple(t for t in TASKS if t in fused)


def combine_map(cfg: TrainConfig, where: str | None = None) -> dict[str, str]:
    """Which enhanced model answers each task.

    Args:
        cfg: the pipeline config.
        where: what messages name (default: the config's file).

    Returns:
        ``pipeline.combine``; by default the model named after the task (``au``, ``expr``, ``va``), else the
        only one.
    """
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
    return out


def check_pipeline(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` after checking every pipeline step's config (now, not hours into the run).

    Args:
        cfg: a loaded config (with or without a pipeline).

    Returns:
        ``cfg`` itself.
    """
    if cfg.pipeline.enabled:
        pipeline_configs(cfg)
    return cfg
