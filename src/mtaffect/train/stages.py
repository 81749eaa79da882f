"""A recipe's stages as a run trains them: which stages run (absent tasks dropped, said so), with which
settings and epochs, which tasks choose each stage's epoch, and a stage taken from another run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mtaffect.models.base import TASKS, MTLModel, Stage
from mtaffect.train.config import ConfigError, StageSettings, TrainConfig
from mtaffect.train.data import MTLDataModule


@dataclass
class PlannedStage:
    index: int  # position in model.stages() (names the stage folder and seeds the stage)
    stage: Stage  # tasks reduced to the present ones
    settings: StageSettings
    epochs: int


def plan_stages(
    model: MTLModel,
    config: TrainConfig,
    present: Sequence[str],
    say: Callable,
    labelled: Sequence[str] | None = None,
) -> list[PlannedStage]:
    """The recipe's stages with their settings; stages of absent tasks dropped (and said so).

    ``present``: the tasks trained; ``labelled``: those with training labels (a task labelled but not
    present was left out by ``trainer.tasks``).
    """
    labelled = present if labelled is None else labelled

    def why(tasks: Sequence[str]) -> str:
        no_label = [t for t in tasks if t not in labelled]
        unlisted = [t for t in tasks if t in labelled]
        parts = [f"no {'/'.join(no_label)} label in the training rows"] if no_label else []
        parts += [f"{'/'.join(unlisted)} not in trainer.tasks"] if unlisted else []
        return "; ".join(parts)

    stages = model.stages()
    names = [s.name for s in stages]
    unknown = sorted(set(config.stages) - set(names))
    if unknown:
        raise ConfigError(
            f"{config.source or 'the config'}: stages {unknown} are not stages of recipe "
            f"{config.model.recipe!r} (its stages: {names})"
        )
    planned = []
    for k, s in enumerate(stages):
        tasks = tuple(t for t in s.tasks if t in present)
        missing = [t for t in s.tasks if t not in present]
        if not tasks:
            say(f"stage {s.name} skipped: {why(missing)}")
            continue
        if missing:
            say(f"stage {s.name}: trains {'/'.join(tasks)} only ({why(missing)})")
        settings = config.stage(s.name)
        epochs = settings.epochs or s.epochs or config.trainer.epochs
        planned.append(PlannedStage(k, dataclasses.replace(s, tasks=tasks), settings, epochs))
    return planned


def present_tasks(dm: MTLDataModule) -> tuple[str, ...]:
    """Tasks with at least one training label (a dataset may carry only some tasks)."""
    counts = dm.train_labels.task_rows()
    tasks = tuple(t for t in TASKS if counts.get(t, 0) > 0)
    if not tasks:
        raise ValueError(
            f"the training rows hold no label of any task (rows per task: {counts}); check the annotations "
            "and the store's failed images"
        )
    return tasks


def select_tasks(config: TrainConfig, stage_tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The tasks whose terms choose a stage's epoch: ``trainer.select`` among the stage's tasks, else
    the stage's own tasks."""
    owner = {"valence": "va", "arousal": "va"}  # one CCC of the VA term: selected when VA trains
    chosen = tuple(t for t in config.trainer.select if owner.get(t, t) in stage_tasks)
    return chosen or stage_tasks


def reuse_stage(model: MTLModel, stage: Stage, saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Load the weights of ``stage``'s trainable modules from ``saved`` (the checkpoint ``folder``'s)."""
    prefixes = tuple(f"{m}." for m in stage.train_modules if m != "*")
    if not prefixes:
        raise ValueError(f"stage {stage.name} trains the whole model: nothing to reuse from {folder}")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    bad = [k for k, v in own.items() if k not in saved or saved[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"{folder} does not hold stage {stage.name}'s weights for this model (e.g. {bad[:3]}); train the "
            "stage with the same recipe settings"
        )
    model.load_state_dict({k: saved[k] for k in own}, strict=False)


def selected_from_summary(summaries: list[dict], name: str, before: dict | None) -> dict | None:
    """The selection of a stage finished in an earlier session, from its summary.

    Args:
        summaries: the stage summaries saved in the resumable state.
        name: the stage's name.
        before: the selection so far (kept when the stage selected no epoch).

    Returns:
        The selection record :func:`mtaffect.train.fit.fit` keeps (no predictions: they are on disk).
    """
    for s in summaries:
        if s["name"] == name and s.get("best_metrics") is not None:
            return {
                "stage": name,
                "metrics": s["best_metrics"],
                "epoch": s["best_epoch"],
                "predictions": None,
                "final": False,
                "written": False,
            }
    return before


def with_counters(state: dict[str, torch.Tensor], counters: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``state`` (read from a checkpoint) with the integer buffers the selection recorded: a checkpoint
    may leave BatchNorm's ``num_batches_tracked`` out, which would come back as 0 after a resume."""
    for key, value in counters.items():
        if key in state:
            state[key] = torch.full_like(state[key], int(value))
    return state


__all__ = [
    "PlannedStage",
    "plan_stages",
    "present_tasks",
    "reuse_stage",
    "select_tasks",
    "selected_from_summary",
    "with_counters",
]
