"""Running a training: seeds, the model's stages, Lightning trainers, and the run folder.

:func:`fit` trains a recipe from a :class:`TrainConfig` on a feature store and label tables and returns
a :class:`TrainResult`; with ``out`` it also writes the run folder::

    out/config.yaml               the resolved config
    out/run.json                  the inputs: store images_sha256 + fingerprint, annotations' sha256
                                  (from images: the digest of the image files, store.images.sha256)
    out/images.sha256             from images: each image's sha256, size, mtime (names a changed one)
    out/best/                     checkpoint (model.safetensors + config.json) of the selected epoch,
                                  rewritten each time the final stage improves
    out/metrics.json              best P and its terms, the tasks scored, per-stage summaries, the full
                                  per-epoch history (every session of a resumed run), row counts
    out/val_predictions.parquet   PredictionTable of the validation rows (selected epoch)
    out/stages/<k>-<name>/        each stage's best checkpoint, rewritten each time the stage improves
    out/per_task/<task>/          trainer.checkpoint_per_task: the final stage's epoch best on that task's
                                  term (and <task>.parquet, its validation predictions); best/ is then
                                  their ensemble (members epoch_<n>), metrics.json's checkpoint_per_task
                                  says which epoch answers which task and "best" is the ensemble's P
    out/state/                    per-epoch resumable state (see :mod:`mtaffect.train.state`)
    out/logs/                     Lightning CSV logs

Each :class:`Stage` of ``model.stages()`` gets its own Trainer: all parameters but the stage's
``train_modules`` frozen, only its task losses optimised, its own epochs, lr and batch size
(``stages.<name>`` in the config), and a seed derived from ``(seed, stage index)``. A stage selects its
epoch on its own tasks' terms of P and ends on those weights; the run's model is the final stage's.
Tasks without any training label (a dataset with no valence/arousal, say) are left out: stages that
train only absent tasks are skipped (and said so), and P is reported over the present tasks.

Robustness: a validation epoch with NaN/inf predictions is recorded and never selected (early stopping
then ends the stage); the best weights reach the disk each time they improve; after every epoch the
whole training state is saved, so ``resume=True`` continues an interrupted stage from its last epoch
and ends bit-identical to an uninterrupted run (CPU). ``resume`` refuses a run folder trained on other
inputs (store, annotations, or images whose bytes changed) or with another config. Nothing is ever
unpickled. Validation labels of which no row can be scored are an error (:class:`NoValidationError`);
``val=None`` trains without validation on purpose.

Under DDP (``trainer.strategy: ddp``, ``devices``, ``num_nodes``; or ``torchrun``) every process runs
:func:`fit`; each rank loads and trains only its share of the rows, torch threads are divided among
the processes of a node, the validation metric is merged across ranks, and only rank 0 writes or logs.

What is trained comes from :func:`mtaffect.train.build.build_training`: a recipe over a feature store,
or, for a config with a ``backbone:`` section, the backbone in the loop over a dataset's images
(:mod:`mtaffect.train.images`); the loop (:class:`StagedFit`) is the same for both. Its parts live
beside it: the stage plan (:mod:`~mtaffect.train.stages`), the Lightning Trainer of a stage
(:mod:`~mtaffect.train.trainer`), selection and non-finite epochs (:mod:`~mtaffect.train.module`), the
run folder and per-epoch writes (:mod:`~mtaffect.train.run`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.features.reader import StoreSet
from mtaffect.features.store import FeatureStore
from mtaffect.io import atomic_open
from mtaffect.metrics import terms_of, terms_row
from mtaffect.models.base import TASKS, MTLModel
from mtaffect.models.losses import MTLLoss
from mtaffect.persist import write_json
from mtaffect.train.build import build_training, named_stores, open_training_data
from mtaffect.train.config import ConfigError, TrainConfig
from mtaffect.train.module import MTLModule, apply_stage
from mtaffect.train.run import RunRecorder, prediction_table, prepare_out, stage_dir
from mtaffect.train.stages import (
    PlannedStage,
    plan_stages,
    present_tasks,
    reuse_stage,
    select_tasks,
    selected_from_summary,
    with_counters,
)
from mtaffect.train.state import (
    EpochState,
    capture_rng,
    data_source,
    read_run,
    run_identity,
    stage_seed,
    write_run,
)
from mtaffect.train.trainer import World, quiet_lightning, resolve_world, stage_trainer, torch_threads


class TrainingDivergedError(ValueError):
    """No validation epoch of the run was finite: there is no model worth saving."""


class NoValidationError(ValueError):
    """Validation labels were given but not one row of them can be scored: selecting on nothing would
    pass for a trained model (a run without validation is asked for with ``val=None``/--no-validation)."""


def _no_validation(val: LabelTable, rows: int, labelled: int, excluded: int) -> str:
    where = val.source or "the validation labels"
    if labelled == 0:
        what = "no data rows" if rows == 0 else f"{rows} rows but not one label"
    else:
        what = f"{labelled} labelled rows, but the image of every one failed extraction or is missing"
    return (
        f"{where}: no validation row to score: it holds {what}; check the file (its line ends and header), "
        "or train without validation on purpose (train --no-validation; in Python fit(..., val=None))"
    )


@dataclass
class TrainResult:
    """What a training produced: the selected model, its validation metrics and predictions."""

    model: MTLModel
    metrics: dict  # MetricResult.to_dict() of the selected epoch ({} without validation)
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    val_predictions: PredictionTable | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    rows: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = TASKS  # tasks trained (with training labels, in trainer.tasks): P's terms
    not_selected: tuple[str, ...] = ()  # tasks the config left out (trainer.tasks), labels or not
    stages: list[dict] = field(default_factory=list)  # per-stage summaries
    rank: int = 0  # global rank of this process (only rank 0 writes and prints)
    trainval: bool = False  # trained on train + val (fit_from_root(trainval=True)), no selection

    @property
    def absent_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in TASKS if t not in self.tasks)

    @property
    def P(self) -> float:
        """P over the present tasks (the official P when the data has all three)."""
        return self.terms()["P"]

    def terms(self) -> dict[str, float]:
        """``P`` (present tasks) and the three terms, as cv/search tables show them (NaN: not scored)."""
        return terms_row(self.metrics, self.tasks)

    def summary(self) -> str:
        m = self.metrics
        if not m:
            if self.trainval:
                return f"trained on train + val without selection ({self.seconds:.1f}s): nothing scored"
            return (
                f"trained without validation, as asked ({self.seconds:.1f}s): the last epoch's model, "
                "nothing scored"
            )
        label = {"va": "CCC_VA", "expr": "F1_EXPR", "au": "F1_AU"}
        t = terms_of(m)
        parts = " + ".join(f"{label[k]} {t[k]:.4f}" for k in ("va", "expr", "au") if k in self.tasks)
        tail = f"best epoch {self.best_epoch}, {self.seconds:.1f}s"
        if not self.absent_tasks:
            return f"P = {self.P:.4f}  ({parts})  {tail}"
        notes = []
        absent = [t for t in self.absent_tasks if t not in self.not_selected]
        if absent:
            notes.append(f"{', '.join(absent)} absent: no training label, not scored")
        if self.not_selected:
            notes.append(f"{', '.join(self.not_selected)} not trained (trainer.tasks), not scored")
        return f"P[{'+'.join(self.tasks)}] = {self.P:.4f}  ({parts}; {'; '.join(notes)})  {tail}"


def env_rank() -> int:
    """Global rank of this process from the launcher's environment (0 when not distributed).

    torchrun and SLURM give the global rank; Lightning's own launcher gives only ``LOCAL_RANK`` and
    ``NODE_RANK`` (a process on another node is never taken for rank 0).
    """
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK") or 0)
    node = int(os.environ.get("NODE_RANK") or 0)
    return local + node * max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


# ---- fit -------------------------------------------------------------------------------------------
def fit(
    config: TrainConfig,
    store: FeatureStore | str | os.PathLike,
    train: LabelTable,
    val: LabelTable | None,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    callbacks: Sequence = (),
    log: Any = print,
    trust_remote_code: bool = False,
    stores: Any = None,
    only_stages: Sequence[str] | None = None,
    reuse: Mapping[str, str | os.PathLike] | None = None,
    trainval: bool | None = None,
) -> TrainResult:
    """Train ``config``'s recipe on ``store`` rows labelled by ``train``; select on ``val``.

    ``only_stages`` trains those of the recipe's stages only; ``reuse`` (``{stage: checkpoint folder}``,
    e.g. another run's ``stages/<k>-<name>/``) takes a stage's trained modules from a checkpoint instead
    of training them (how ``mtaffect search`` trains recipe 3's task models once for every variant).

    For a config with a ``backbone:`` section, ``store`` is the dataset root: training reads its images
    (``trust_remote_code``: see :func:`build_training`). ``stores`` (``{name: store}``) adds named
    feature stores whose arrays the recipe reads as ``features@<name>`` (their image list must be the
    main store's; with images, they must hold every labelled image).

    ``val=None`` trains without validation (the last epoch's model); validation labels of which not one
    row can be scored are a :class:`NoValidationError`, never a silent run without selection.
    ``trainval`` (recorded in metrics.json) says ``train`` holds the validation rows too (default: when
    ``val`` is None).
    """
    t0 = time.perf_counter()
    named = named_stores(stores)
    data = open_training_data(config, store, named)
    world = resolve_world(config)
    with torch_threads(config, world):
        return StagedFit(
            config,
            data,
            train,
            val,
            Path(out) if out is not None else None,
            world,
            t0,
            overwrite=overwrite,
            resume=resume,
            callbacks=callbacks,
            log=log,
            trust_remote_code=trust_remote_code,
            stores=named,
            only_stages=only_stages,
            reuse={k: Path(v) for k, v in (reuse or {}).items()},
            trainval=val is None if trainval is None else trainval,
        ).run()


class StagedFit:
    """One run of :func:`fit`, in the order it happens: :meth:`prepare` (inputs checked, the run folder
    made ready, model and data built, stages planned), :meth:`run_stage` for each planned stage (its own
    Trainer and :class:`~mtaffect.train.module.MTLModule`; selection, non-finite epochs and early stopping
    live in the module, the per-epoch writes in its :class:`~mtaffect.train.run.RunRecorder`), then
    :func:`_finish` (best/, metrics.json, the :class:`TrainResult`).

    Between stages it carries the history, the stage summaries and the stage whose epoch is selected.

    Args:
        config: the run's config.
        data: what :func:`~mtaffect.train.build.open_training_data` opened (a store, or a dataset root).
        train: the training labels.
        val: the validation labels (None: no validation).
        out: the run folder (None: nothing written).
        world: this process's rank and world size.
        t0: ``time.perf_counter()`` when :func:`fit` was called (the run's seconds).
        overwrite, resume, callbacks, log, trust_remote_code, only_stages, trainval: as :func:`fit`'s.
        stores: the named stores (a :class:`StoreSet`), or None.
        reuse: ``{stage: checkpoint folder}`` of stages taken from another run.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: Any,
        train: LabelTable,
        val: LabelTable | None,
        out: Path | None,
        world: World,
        t0: float,
        *,
        overwrite: bool = False,
        resume: bool = False,
        callbacks: Sequence = (),
        log: Any = print,
        trust_remote_code: bool = False,
        stores: StoreSet | None = None,
        only_stages: Sequence[str] | None = None,
        reuse: Mapping[str, Path] | None = None,
        trainval: bool = False,
    ) -> None:
        self.config, self.data, self.train, self.val, self.out = config, data, train, val, out
        self.world, self.t0, self.rank0 = world, t0, world.rank == 0
        self.overwrite, self.resume, self.callbacks, self.log = overwrite, resume, callbacks, log
        self.trust_remote_code, self.stores, self.only_stages = trust_remote_code, stores, only_stages
        self.reuse, self.trainval = dict(reuse or {}), trainval
        self.saved: EpochState | None = None  # the state of an earlier session (resume)
        self.history: list[dict] = []
        self.summaries: list[dict] = []
        self.selected: dict[str, Any] | None = None  # the stage whose best epoch is the run's model

    def say(self, msg: str) -> None:
        if self.rank0 and self.log:
            self.log(msg)

    def run(self) -> TrainResult:
        """Prepare, train every planned stage, finish: the whole of :func:`fit` after the world is known."""
        self.prepare()
        for i, ps in enumerate(self.plan):
            self.run_stage(i, ps)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.eval()
        return _finish(self)

    # ---- before the first stage ------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the inputs, make the run folder ready (rank 0), build model and data, plan the stages."""
        config, out, val = self.config, self.out, self.val
        if val is not None and not val.any_label_mask.any():
            raise NoValidationError(_no_validation(val, len(val), 0, 0))
        identity, images = self._identity() if out is not None else ({}, None)  # identity: for out only
        if out is not None and self.rank0:  # other ranks start (Lightning's launcher) once rank 0 is ready
            prepare_out(out, self.overwrite, self.resume, config, identity)
        self.saved = EpochState.load(out) if self.resume and out is not None else None
        L.seed_everything(config.trainer.seed, workers=True, verbose=False)
        self.training = build_training(
            config,
            self.data,
            self.train,
            val,
            trust_remote_code=self.trust_remote_code,
            stores=self.stores if config.from_images else None,
        )
        self.model, self.dm = self.training.model, self.training.datamodule
        self.model.decay_all = config.optim.decay_all  # read by param_groups (a fine-tuned backbone's too)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._check_rows()
        self._plan()
        if out is not None and self.rank0:
            with atomic_open(out / "config.yaml", "w", overwrite=True, encoding="utf-8") as fh:
                yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
            write_run(out, identity)
            if images is not None:
                images.write(out)
        if self.saved is not None:
            self.history, self.summaries = list(self.saved.history), list(self.saved.stages)
            self.model.load_state_dict(self.saved.model)  # the weights after the last finished epoch/stage

    def _identity(self) -> tuple[dict, Any]:
        """The run's inputs as run.json records them, and (rank 0, from images) the images' digest."""
        identity = run_identity(data_source(self.data, self.stores), self.train, self.val)
        if self.reuse:  # recorded, so a resumed run says where its reused stages came from
            identity["reused"] = {k: str(v) for k, v in self.reuse.items()}
        images = None
        if self.rank0 and self.config.from_images:
            images = image_set(self.data, self.train, self.val)
            # beside images_sha256 (which check_identity compares, and callers such as the pipeline's
            # kept-step check build without hashing): checked here, naming the first changed image
            identity["store"] = {**identity["store"], "images": images.summary()}
            assert self.out is not None  # only a run with a folder records its identity
            saved_run = read_run(self.out) if self.resume else None
            if saved_run is not None:  # before prepare_out: this check names the first changed image
                images.check_resume(self.out, saved_run.get("store") or {})
        return identity, images

    def _check_rows(self) -> None:
        """Say the rows used; refuse a run with no training row or no validation row to score."""
        config, dm, val = self.config, self.dm, self.val
        excl = dm.train_report.excluded_invalid + (dm.val_report.excluded_invalid if dm.val_report else 0)
        missing_too = " or is missing" if config.from_images else ""
        self.say(
            f"rows: train {dm.train_report.used}, val {dm.val_report.used if dm.val_report else 0}; "
            f"excluded {excl} whose image failed extraction{missing_too}"
        )
        if dm.train_report.labelled and len(dm.train_set) == 0:
            missing = list(getattr(dm, "missing", []))
            if config.from_images and missing:
                raise FileNotFoundError(
                    f"{dm.folder}: none of the {dm.train_report.labelled} labelled training images is there "
                    f"(e.g. {', '.join(missing[:3])}); check --data"
                )
            raise ValueError("no training row: the training labels match no valid image of the store")
        named = [i for i in self.model.inputs if "@" in i]
        if config.trainer.checkpoint_per_task and named:
            raise ConfigError(
                f"{config.source or 'the config'}: trainer.checkpoint_per_task makes best/ an ensemble, "
                f"whose members cannot read named feature stores ({named}); set it false"
            )
        self.validate = dm.val_set is not None and len(dm.val_set) > 0
        if val is not None and not self.validate:  # e.g. every validation image failed or is missing
            r = dm.val_report
            raise NoValidationError(
                _no_validation(val, len(val), r.labelled if r else 0, r.excluded_invalid if r else 0)
            )

    def _plan(self) -> None:
        """The tasks trained, the loss weighted on the training labels, and the stages to run."""
        config, dm = self.config, self.dm
        labelled = present_tasks(dm)
        self.present = tuple(t for t in labelled if t in config.trainer.tasks)
        if not self.present:
            raise ValueError(
                f"{config.source or 'the config'}: trainer.tasks {config.trainer.tasks} names no task the "
                f"training rows have a label for (labelled: {list(labelled)})"
            )
        a = dm.train_labels
        self.loss = MTLLoss.from_labels(
            config.loss, np.where(a.au_mask, a.au, -1), np.where(a.expr_mask, a.expr, -1)
        )
        plan = plan_stages(self.model, config, self.present, self.say, labelled)
        if self.only_stages is not None:
            plan = [ps for ps in plan if ps.stage.name in self.only_stages]
        unknown = sorted(set(self.reuse) - {ps.stage.name for ps in plan})
        if unknown:
            raise ValueError(f"stages {unknown} cannot be reused: not stages this run trains")
        self.plan = plan

    # ---- one stage ---------------------------------------------------------------------------------
    def run_stage(self, i: int, ps: PlannedStage) -> None:
        """Train the ``i``-th planned stage (or take it from an earlier session or another run)."""
        k, stage, saved = ps.index, ps.stage, self.saved
        if saved is not None and (k < saved.stage or (k == saved.stage and saved.stage_done)):
            self.say(f"stage {stage.name}: finished in an earlier session")
            self.selected = selected_from_summary(self.summaries, stage.name, self.selected)
            return
        if stage.name in self.reuse:
            folder = self.reuse[stage.name]
            reuse_stage(self.model, stage, self.training.weights(folder), folder)
            self.say(f"stage {stage.name}: taken from {folder} (trained once, reused)")
            self.summaries = [
                *self.summaries,
                {
                    "name": stage.name,
                    "index": k,
                    "tasks": list(stage.tasks),
                    "reused": str(folder),
                    "best_metrics": None,
                },
            ]
            return
        mid = saved if saved is not None and k == saved.stage else None
        if mid is not None:
            self.say(f"stage {stage.name}: resuming at epoch {mid.epoch} of {ps.epochs}")
        L.seed_everything(stage_seed(self.config.trainer.seed, k), workers=True, verbose=False)
        start = self._start_weights(i, mid)
        module = self._train(i, ps, mid)
        self._end_stage(i, ps, module, start, mid.epoch if mid is not None else 0)

    def _start_weights(self, i: int, mid: EpochState | None) -> dict[str, torch.Tensor] | None:
        """The weights the stage starts from (a run's first stage: the model as built); None for a stage
        resumed mid-way after the first (read back from the previous stage's checkpoint, only if needed)."""
        if mid is not None:
            return self.initial if i == 0 else None
        if i == 0 and self.saved is None:
            return self.initial
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _train(self, i: int, ps: PlannedStage, mid: EpochState | None) -> MTLModule:
        """The stage's module trained under its own Trainer (its remaining epochs)."""
        config, model, dm, out = self.config, self.model, self.dm, self.out
        k, stage, final = ps.index, ps.stage, i == len(self.plan) - 1
        done = mid.epoch if mid is not None else 0
        apply_stage(model, stage)
        dm.set_stage(
            stage.tasks,
            batch_size=ps.settings.batch_size or config.data.batch_size,
            seed=stage_seed(config.trainer.seed, k),
            epoch_offset=done,
        )
        remaining = 0 if mid is not None and mid.selection.get("stopped") else ps.epochs - done
        recorder = RunRecorder(
            out, self.rank0, k, stage, final, self.training, self.history, self.summaries, self.say
        )
        logs = out / "logs" if out is not None and self.rank0 else None
        with quiet_lightning():
            trainer = stage_trainer(
                config, max(remaining, 0), logs, stage.name, self.callbacks, self.validate
            )
        steps = dm.steps_per_epoch(trainer.world_size)
        module = MTLModule(
            model,
            self.loss,
            stage,
            lr=ps.settings.lr or config.optim.lr,
            weight_decay=config.optim.weight_decay,
            warmup_steps=round(config.optim.warmup_epochs * steps),
            total_steps=steps * ps.epochs,
            min_lr_ratio=config.optim.min_lr_ratio,
            au_threshold=config.trainer.au_threshold,
            select_tasks=select_tasks(config, stage.tasks),
            patience=config.trainer.patience if self.validate else 0,
            epoch_offset=done,
            resume=mid,
            recorder=recorder,
            log_every_n_steps=config.trainer.log_every_n_steps,
            schedule=config.optim.schedule,
            per_task=stage.tasks if final and self.validate and config.trainer.checkpoint_per_task else (),
        )
        if mid is not None and module.best_epoch >= 0 and out is not None:
            saved_best = self.training.weights(stage_dir(out, k, stage))
            module.best_state = with_counters(saved_best, module.best_counters)
        if remaining > 0:
            with quiet_lightning():
                trainer.fit(module, datamodule=dm)
        return module

    def _end_stage(self, i: int, ps: PlannedStage, module: MTLModule, start: dict | None, done: int) -> None:
        """End on the stage's selected weights (or, with no finite epoch, those it started from), record
        its summary and, on rank 0, its checkpoint and a finished-stage state."""
        config, model, out = self.config, self.model, self.out
        k, stage, final = ps.index, ps.stage, i == len(self.plan) - 1
        self.history = self.history + module.history
        note = ""
        if module.best_state is not None:
            model.load_state_dict(module.best_state)
        elif self.validate:  # no finite epoch: keep the weights the stage started from
            if start is None:
                if i > 0 and out is not None:
                    prev = self.plan[i - 1]
                    start = self.training.weights(stage_dir(out, prev.index, prev.stage))
                else:
                    start = self.initial
            model.load_state_dict(start)
            note = "no finite validation epoch: weights left as before the stage"
            self.say(f"stage {stage.name}: {note} (lower optim.lr, or train in 32-true precision)")
        if module.diverged:
            self.say(
                f"stage {stage.name}: the weights became NaN/inf at epoch {module.epoch}; the stage "
                "ended there"
            )
        summary = {
            "name": stage.name,
            "index": k,
            "tasks": list(stage.tasks),
            "epochs": ps.epochs,
            "lr": ps.settings.lr or config.optim.lr,
            "batch_size": ps.settings.batch_size or config.data.batch_size,
            "epochs_run": done + len(module.history),
            "best_epoch": module.best_epoch,
            "best_score": module.selection()["best_score"],
            "best_metrics": module.best_metrics,
            "stopped_early": module.stopped_early,
            "diverged": module.diverged,
            "note": note,
        }
        if module.per_task:  # checkpoint_per_task: each task's best epoch of the final stage
            summary["per_task"] = module.task_best
        self.summaries = [*self.summaries, summary]
        if module.best_metrics is not None:
            self.selected = {
                "stage": stage.name,
                "metrics": module.best_metrics,
                "epoch": module.best_epoch,
                "predictions": module.best_predictions,
                "final": final,
                "written": module.recorder.best_written == module.best_epoch,
                "task_predictions": module.task_predictions,
            }
        if self.validate and module.best_metrics is not None:
            self.say(
                f"stage {stage.name}: best {'+'.join(module.select_tasks)} score "
                f"{module.best_score:.4f} (P {module.best_metrics['P']:.4f}) at epoch "
                f"{module.best_epoch}"
            )
        if out is not None and self.rank0:
            if not self.validate or module.best_state is None:
                self.training.save(stage_dir(out, k, stage), module.best_metrics, True)
            EpochState(
                stage=k,
                stage_name=stage.name,
                epoch=summary["epochs_run"],
                stage_done=True,
                model=model.state_dict(),
                selection=module.selection(),
                history=self.history,
                stages=self.summaries,
                rng=capture_rng(),
            ).save(out)


def image_set(root: Path, train: LabelTable, val: LabelTable | None) -> Any:
    """The images a run from images reads (every one its annotations name), hashed: see
    :mod:`mtaffect.train.images.digest`."""
    from mtaffect.schema import CROPPED_DIR
    from mtaffect.train.images.digest import ImageSet, image_names

    return ImageSet.scan(Path(root) / CROPPED_DIR, image_names([train, val]))


def _decode_failures(dm: Any) -> dict:
    """Images that failed to decode while training from images (left out of their batches), by name."""
    failures = getattr(dm, "failures", None)
    return {"failed_to_decode": dict(sorted(failures.items()))} if failures else {}


def _finish(fitting: StagedFit) -> TrainResult:
    """Write best/ and val_predictions.parquet where the final stage's recorder has not, and metrics.json
    (rank 0); build the result."""
    config, training, out, world = fitting.config, fitting.training, fitting.out, fitting.world
    t0 = fitting.t0
    history, summaries, selected = fitting.history, fitting.summaries, fitting.selected
    present, validate, trainval = fitting.present, fitting.validate, fitting.trainval and not fitting.validate
    model, dm = training.model, training.datamodule
    rank0 = world.rank == 0
    metrics = selected["metrics"] if selected else {}
    preds = None
    if selected and selected["predictions"] is not None and dm.val_labels is not None:
        preds = prediction_table(selected["predictions"], dm.val_labels.images)
    elif selected and out is not None and (out / "val_predictions.parquet").is_file():
        preds = PredictionTable.read(out / "val_predictions.parquet")  # written in an earlier session
    result = TrainResult(
        model=model,
        metrics=metrics,
        best_epoch=selected["epoch"] if selected else -1,
        history=history,
        val_predictions=preds,
        seconds=time.perf_counter() - t0,
        rows={
            "train": vars(dm.train_report),
            "val": vars(dm.val_report) if dm.val_report else None,
            "train_units": len(dm._all_train),
            "in_memory": bool(dm.source.in_memory) if dm.source else None,
            **_decode_failures(dm),
        },
        tasks=present,
        stages=summaries,
        rank=world.rank,
        trainval=trainval,
        not_selected=tuple(t for t in TASKS if t not in config.trainer.tasks),
    )
    # with validation a diverged stage falls back to its best (or starting) weights; without, nothing can
    diverged = selected is None if validate else any(s["diverged"] for s in summaries)
    per_task = summaries[-1].get("per_task") if summaries and validate and not diverged else None
    if per_task:  # checkpoint_per_task: the model is each task's best epoch, best/ their ensemble
        result.metrics = metrics = combine_metrics({t: v["metrics"] for t, v in per_task.items()})
        result.val_predictions = preds = _per_task_predictions(out, per_task, selected, dm)
    if out is not None and rank0:
        if per_task:
            result.checkpoint = _save_per_task(out, per_task, metrics)
            if preds is not None:
                preds.write(out / "val_predictions.parquet", overwrite=True)
        elif not diverged:
            # best/ holds the selected epoch already when this session's recorder wrote it (the same weights
            # and metrics); else (selected in an earlier session, which may have ended between two writes)
            # it is written from the selected weights now
            if selected and selected["written"]:
                result.checkpoint = out / "best"
            else:
                result.checkpoint = training.save(out / "best", metrics or None, True)
            if preds is not None and not (selected and selected["final"]):
                preds.write(out / "val_predictions.parquet", overwrite=True)
        write_json(
            out / "metrics.json",
            {
                "best": metrics,
                "P_tasks": result.P if metrics else None,
                "tasks": list(present),
                "absent_tasks": list(result.absent_tasks),
                "not_trained": list(result.not_selected),
                "best_epoch": result.best_epoch,
                "selected_stage": selected["stage"] if selected else None,
                "stages": summaries,
                "history": history,
                "rows": result.rows,
                "seconds": result.seconds,
                "world_size": world.size,
                "recipe": config.model.recipe,
                "trainval": result.trainval,
                "diverged": diverged,
                **(
                    {
                        "checkpoint_per_task": {
                            t: {"epoch": v["epoch"], "score": v["score"], "member": _answering(per_task)[t]}
                            for t, v in per_task.items()
                        }
                    }
                    if per_task
                    else {}
                ),
            },
        )
    if diverged:
        what = "no validation epoch was finite" if validate else "the weights became NaN/inf"
        raise TrainingDivergedError(
            f"{what} (training diverged): nothing to save as best/; lower optim.lr (now "
            f"{config.optim.lr:g}) or train in 32-true precision"
            + (f"; the history is in {out / 'metrics.json'}" if out is not None else "")
        )
    return result


def combine_metrics(per_task: Mapping[str, dict]) -> dict:
    """One metrics dict from each task's own epoch (``{task: MetricResult.to_dict()}``): every term of P
    depends only on its task's predictions, so each comes from the epoch answering that task."""
    first = next(iter(per_task.values()))
    out = {**first, **{t: m[t] for t, m in per_task.items()}}
    out["P"] = float(out["va"]["mean"] + out["expr"]["f1"] + out["au"]["f1"])
    return out


def _answering(per_task: Mapping[str, dict]) -> dict[str, str]:
    """task -> ensemble member (``epoch_<n>``): tasks not chosen on their own (not trained in the final
    stage) are answered by the first chosen task's epoch."""
    members = {t: f"epoch_{v['epoch']}" for t, v in per_task.items()}
    first = next(iter(members.values()))
    return {t: members.get(t, first) for t in TASKS}


def _save_per_task(out: Path, per_task: Mapping[str, dict], metrics: dict) -> Path:
    """best/ as an ensemble of the per-task best checkpoints (one member per distinct epoch)."""
    from mtaffect.models.ensemble import save_ensemble
    from mtaffect.train.run import per_task_dir

    tasks = _answering(per_task)
    members: dict[str, Path] = {}
    for t in per_task:
        members.setdefault(tasks[t], per_task_dir(out, t))
    return save_ensemble(out / "best", members, tasks, metrics=metrics, overwrite=True)


def _per_task_predictions(
    out: Path | None, per_task: Mapping[str, dict], selected: dict | None, dm: Any
) -> PredictionTable | None:
    """The validation predictions of the per-task ensemble: each task's columns from its own epoch
    (``per_task/<task>.parquet``, written each time that task improved)."""
    from mtaffect.models.ensemble import combine_tables
    from mtaffect.train.run import PER_TASK

    memory = (selected or {}).get("task_predictions") or {}
    tables = {}
    for t in per_task:
        path = None if out is None else out / PER_TASK / f"{t}.parquet"
        if t in memory and dm.val_labels is not None:
            tables[t] = prediction_table(memory[t], dm.val_labels.images)
        elif path is not None and path.is_file():  # chosen in an earlier session
            tables[t] = PredictionTable.read(path)
        else:
            return None
    answer = _answering(per_task)
    by_member = {f"epoch_{v['epoch']}": tables[t] for t, v in per_task.items()}
    first = next(iter(tables.values()))
    return combine_tables({t: by_member[answer[t]] for t in TASKS}, list(map(str, first.images)))


def fit_from_root(
    config: TrainConfig,
    features: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    trainval: bool = False,
    validation: bool = True,
    **kw: Any,
) -> TrainResult:
    """:func:`fit` on the official train/val splits of a dataset root.

    ``trainval``: refit on train + val for the configured epochs with no selection (no validation, no
    early stopping; the model is the last epoch's), as the published final test models were made.
    ``validation=False``: train on the train split alone without validation (the val split is not
    read); otherwise a val split with no row to score is an error (:class:`NoValidationError`).
    """
    from mtaffect.data.annotations import load_split

    if trainval and not validation:
        raise ValueError(
            "--trainval already trains without validation (on train + val); drop --no-validation"
        )
    train = load_split(data, "train")
    if not validation:
        return fit(config, features, train, None, out, trainval=False, **kw)
    val = load_split(data, "val")
    if trainval:
        return fit(config, features, LabelTable.concat([train, val]), None, out, trainval=True, **kw)
    return fit(config, features, train, val, out, **kw)


__all__ = [
    "NoValidationError",
    "StagedFit",
    "TrainResult",
    "TrainingDivergedError",
    "env_rank",
    "fit",
    "fit_from_root",
]
