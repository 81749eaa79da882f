"""The run folder: what a training writes, when, and the checks before it continues one.

Layout (see :mod:`mtaffect.train.fit` for what each entry holds)::

    config.yaml  run.json  best/  metrics.json  val_predictions.parquet  stages/<k>-<name>/  state/  logs/
    per_task/<task>/  per_task/<task>.parquet     (trainer.checkpoint_per_task: each task's best epoch)

Only rank 0 writes. :class:`RunRecorder` is what a stage's module reports to: it writes the stage's
best checkpoint each time the selection improves (the final stage's also as ``best/`` with the
validation predictions; with ``trainer.checkpoint_per_task`` the final stage's best epoch of each task in
``per_task/``, and ``best/`` is written at the end as their ensemble) and the resumable state after every
epoch; :func:`prepare_out` refuses to
replace a run without ``overwrite`` and to continue one trained on other inputs or with another config.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from mtaffect.data.predictions import PredictionTable
from mtaffect.features.reader import StoreSet, store_names
from mtaffect.io import OutputExistsError
from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.checkpoint import save_checkpoint
from mtaffect.persist import NotOursError
from mtaffect.schema import NUM_AUS
from mtaffect.train.config import ConfigError, TrainConfig, config_from_dict
from mtaffect.train.state import EpochState, ResumeError, capture_rng, check_identity, read_run

if TYPE_CHECKING:
    from mtaffect.train.module import MTLModule
    from mtaffect.train.training import Training

#: Files and folders of a run directory (what ``overwrite`` removes; nothing else is touched).
RUN_ENTRIES = (
    "config.yaml",
    "run.json",
    "best",
    "metrics.json",
    "val_predictions.parquet",
    "stages",
    "state",
    "logs",
    "images.sha256",
    "per_task",
)
PER_TASK = "per_task"


def per_task_dir(out: Path, task: str) -> Path:
    """The checkpoint of the final stage's epoch best on ``task``'s term (``trainer.checkpoint_per_task``)."""
    return out / PER_TASK / task


def prepare_out(out: Path, overwrite: bool, resume: bool, config: TrainConfig, identity: dict) -> None:
    """Make ``out`` ready for a run: a new run needs it empty of runs; ``overwrite`` removes only what a
    run of ours (its ``run.json`` validates) wrote there (:data:`RUN_ENTRIES`), never anything else."""
    present = [e for e in RUN_ENTRIES if (out / e).exists() or (out / e).is_symlink()]
    if present and not resume:
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a run ({', '.join(present)}); pass --overwrite to replace it or "
                "--resume to continue it"
            )
        check_ours(out, present)
        for e in present:
            p = out / e
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif present:
        check_same_run(out, config, identity)
    out.mkdir(parents=True, exist_ok=True)


def check_ours(out: Path, present: list[str]) -> None:
    """Refuse to delete ``present`` unless ``out`` is a run of ours (the ownership rule of
    :mod:`mtaffect.persist`: its ``run.json`` validates)."""
    if not present:
        return
    try:
        ours = read_run(out) is not None
    except ValueError:
        ours = False
    if not ours:
        raise NotOursError(
            f"{out} holds {', '.join(present)} but no run.json of an mtaffect run: not a run of ours, so "
            "nothing is replaced, even with --overwrite; move those away or choose another --out"
        )


def remove_run(out: Path) -> None:
    """Delete the run in ``out`` (only if it is ours: :func:`check_ours`): its :data:`RUN_ENTRIES`, and
    the folder itself once nothing else is left in it (a user's files stay)."""
    present = [e for e in RUN_ENTRIES if (out / e).exists() or (out / e).is_symlink()]
    check_ours(out, present)
    for e in present:
        p = out / e
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if not any(out.iterdir()):
        out.rmdir()


def check_same_run(out: Path, config: TrainConfig, identity: dict) -> None:
    """Refuse to continue (or reuse) the run in ``out`` unless it was started with ``config`` on the
    inputs ``identity`` names (:func:`~mtaffect.train.state.run_identity`)."""
    saved_run = read_run(out)
    if saved_run is None:
        raise ResumeError(
            f"{out} holds a run without run.json (an older mtaffect, or not a run folder): its inputs "
            "cannot be checked; start over with --overwrite"
        )
    check_identity(saved_run, identity, out)
    saved_cfg = out / "config.yaml"
    if saved_cfg.is_file():
        before = _settings(yaml.safe_load(saved_cfg.read_text(encoding="utf-8")), saved_cfg)
        if before != yaml.safe_load(yaml.safe_dump(config.to_dict())):
            raise ResumeError(
                f"{saved_cfg}: the run was started with another config; resume with the same config "
                "and overrides, or start over with --overwrite"
            )


def _settings(saved: Any, where: Path) -> Any:
    """Every setting of a saved ``config.yaml``: an older run's file lists only what differed from the
    defaults, so it is read through the schema (its defaults filled in) before being compared."""
    if not isinstance(saved, dict):
        return saved
    try:
        return yaml.safe_load(yaml.safe_dump(config_from_dict(saved, str(where)).to_dict()))
    except ConfigError as e:
        raise ResumeError(
            f"{e}; this run was saved with settings this version no longer reads: start over with --overwrite"
        ) from None


def run_status(out: Path) -> str:
    """``new`` (nothing there), ``finished`` (metrics.json and best/ written at the end of a run) or
    ``started`` (an interrupted run, or one that ended without a model)."""
    present = [e for e in RUN_ENTRIES if (out / e).exists()]
    if not present:
        return "new"
    metrics = out / "metrics.json"
    if metrics.is_file() and (out / "best").is_dir():
        try:
            done = not json.loads(metrics.read_text(encoding="utf-8")).get("diverged", False)
        except (OSError, ValueError):
            done = False
        if done:
            return "finished"
    return "started"


def stage_dir(out: Path, k: int, stage: Stage) -> Path:
    return out / "stages" / f"{k}-{stage.name}"


def save_model(
    path: Path,
    model: MTLModel,
    config: TrainConfig,
    metrics: dict | None,
    *,
    backbone: Mapping[str, Any],
    sizes: Any,
    input_stores: Mapping[str, dict] | None = None,
    backbone_weights: Any = None,
    overwrite: bool = True,
) -> Path:
    """A trained ``model``'s checkpoint as training writes it (both paths): ``backbone`` the record of
    what it reads, ``sizes`` anything with its input sizes (a store, or a backbone's spec), the config's
    window, window edge and AU threshold; ``backbone_weights``: a fine-tuned backbone (see
    :func:`~mtaffect.models.checkpoint.save_checkpoint`)."""
    return save_checkpoint(
        path,
        model,
        backbone=backbone,
        feature_dim=sizes.feature_dim,
        num_logits=sizes.num_logits,
        token_shape=sizes.token_shape,
        window=config.data.window if model.temporal else 1,
        au_thresholds=[config.trainer.au_threshold] * NUM_AUS,
        metrics=metrics,
        train_config=config.to_dict(),
        overwrite=overwrite,
        backbone_weights=backbone_weights,
        window_edge=config.data.window_edge if model.temporal else "pad",
        input_stores=input_stores,
    )


def input_store_records(stores: StoreSet | None, inputs: tuple[str, ...]) -> dict[str, dict]:
    """What a checkpoint records of the named stores its model reads (``features@<name>``): each store's
    backbone and fingerprint, checked when the model later predicts from stores."""
    if stores is None:
        return {}
    keys = store_names(inputs)
    return {
        k: {"backbone": stores.stores[k].backbone, "fingerprint": stores.stores[k].fingerprint} for k in keys
    }


def prediction_table(preds: dict[str, np.ndarray], images: np.ndarray) -> PredictionTable:
    """Validation predictions (gathered across ranks) as a table in label order, one row per image."""
    idx = preds["index"]
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = idx[1:] != idx[:-1]
    sel = order[first]
    return PredictionTable.from_arrays(
        images[idx[first]], preds["va"][sel, 0], preds["va"][sel, 1], preds["expr"][sel], preds["au"][sel]
    )


class RunRecorder:
    """Writes what a stage produces (rank 0 only): its best weights each time they improve (the final
    stage's also as ``best/`` with the validation predictions) and the resumable state after each epoch."""

    def __init__(
        self,
        out: Path | None,
        rank0: bool,
        k: int,
        stage: Stage,
        final: bool,
        training: Training,
        earlier: list[dict],
        summaries: list[dict],
        say: Callable,
    ) -> None:
        self.out, self.rank0, self.k, self.stage, self.final = out, rank0, k, stage, final
        self.training, self.dm = training, training.datamodule
        self.earlier, self.summaries, self.say = earlier, summaries, say
        self.best_written: int | None = None  # the epoch whose checkpoint this session wrote as best/

    def validated(self, module: MTLModule, entry: dict, improved: bool) -> None:
        if not self.rank0:
            return
        if entry.get("finite") is False:
            self.say(
                f"stage {self.stage.name} epoch {entry['epoch']}: {entry['nonfinite_rows']} validation rows "
                "predicted NaN/inf: non-finite epoch, not selected"
            )
        if self.out is None:
            return
        if self.final:  # checkpoint_per_task: each task's best epoch so far, its weights and predictions
            for t in module.improved_tasks:
                self.training.save(per_task_dir(self.out, t), module.task_best[t]["metrics"], True)
                self._write_predictions(module.task_predictions.get(t), self.out / PER_TASK / f"{t}.parquet")
        if not improved:
            return
        # the live model holds the improved weights: its checkpoint (a fine-tuned backbone's included)
        self.training.save(stage_dir(self.out, self.k, self.stage), module.best_metrics, True)
        if self.final and not module.per_task:  # per task: best/ is the ensemble written at the end
            self.training.save(self.out / "best", module.best_metrics, True)
            self.best_written = module.best_epoch
            self._write_predictions(module.best_predictions, self.out / "val_predictions.parquet")

    def _write_predictions(self, preds: dict[str, np.ndarray] | None, path: Path) -> None:
        if preds is not None and self.dm.val_labels is not None:
            prediction_table(preds, self.dm.val_labels.images).write(path, overwrite=True)

    def epoch_end(self, module: MTLModule) -> None:
        if not self.rank0 or self.out is None:
            return
        trainer = module.trainer
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        selection = {**module.selection(), "stopped": bool(module.stopped_early or module.diverged)}
        EpochState(
            stage=self.k,
            stage_name=self.stage.name,
            epoch=module.epoch + 1,
            stage_done=False,
            model=module.model.state_dict(),
            optimizer=trainer.optimizers[0].state_dict(),
            scheduler=None if sched is None else sched.state_dict(),
            selection=selection,
            history=self.earlier + module.history,
            stages=self.summaries,
            rng=capture_rng(),
        ).save(self.out)


__all__ = [
    "PER_TASK",
    "RUN_ENTRIES",
    "RunRecorder",
    "check_same_run",
    "input_store_records",
    "per_task_dir",
    "prediction_table",
    "prepare_out",
    "run_status",
    "save_model",
    "stage_dir",
]
