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

What is trained comes from :func:`build_training`: a recipe over a feature store, or, for a config
with a ``backbone:`` section, the backbone in the loop over a dataset's images
(:mod:`mtaffect.train.images`); the loop below is the same for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from mtaffect.models.base import TASKS, MTLModel, Stage
from mtaffect.models.checkpoint import load_weights
from mtaffect.models.losses import MTLLoss
from mtaffect.persist import write_json
from mtaffect.train.config import ConfigError, StageSettings, TrainConfig
from mtaffect.train.data import MTLDataModule, cpus_per_process
from mtaffect.train.module import MTLModule, apply_stage
from mtaffect.train.run import (
    RunRecorder,
    input_store_records,
    prediction_table,
    prepare_out,
    save_model,
    stage_dir,
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
            return (f"trained without validation, as asked ({self.seconds:.1f}s): the last epoch's model, "
                    "nothing scored")
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


def build_model(config: TrainConfig, store: Any, input_dims: dict[str, int] | None = None) -> MTLModel:
    """``create_model(recipe, feature_dim, num_logits, token_shape, **hparams)`` with a clear error.

    ``store`` is anything with those three sizes: a :class:`FeatureStore` or a backbone's spec.
    ``input_dims`` (``{"features@au": 768, ...}``, from named stores) go to recipes that fuse them.
    """
    from mtaffect.models.registry import create_model

    where = config.source or "the config"
    extra = {"input_dims": dict(input_dims)} if input_dims else {}
    try:
        model = create_model(
            config.model.recipe,
            feature_dim=store.feature_dim,
            num_logits=store.num_logits,
            token_shape=store.token_shape,
            **config.model.hparams,
            **extra,
        )
    except TypeError as exc:
        if extra and "input_dims" in str(exc):
            raise ValueError(
                f"{where}: recipe {config.model.recipe!r} reads no named feature stores; drop the "
                f"--features NAME=STORE options ({sorted(input_dims or {})})"
            ) from exc
        raise ValueError(f"{where}: model.hparams do not fit recipe {config.model.recipe!r}: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # e.g. a size torch cannot allocate
        raise ValueError(f"{where}: model.hparams do not fit recipe {config.model.recipe!r}: {exc}") from exc
    model.group_settings = dict(config.optim.groups)
    return model


@dataclass
class Training:
    """What :func:`fit` trains: the model, its data module, and how its checkpoints are written and read.

    ``weights(folder)`` is the full state dict of ``model`` saved in a checkpoint folder (a fine-tuned
    backbone's weights included).
    """

    model: MTLModel
    datamodule: Any  # MTLDataModule (or a subclass)
    save: Callable[[Path, dict | None, bool], Path]  # (folder, metrics, overwrite) -> checkpoint folder
    weights: Callable[[Path], dict[str, torch.Tensor]]


def open_training_data(config: TrainConfig, data: Any, stores: Any = None) -> Any:
    """The data a config trains on: a :class:`FeatureStore` (opened once), or for a config with a
    ``backbone:`` section the dataset root (its images are read while training).

    ``stores`` (``{name: store}``, or a :class:`StoreSet`) adds named stores (inputs ``features@<name>``):
    the store path then reads a :class:`StoreSet` with ``data`` as its main store; image training reads
    them beside the images (:func:`named_stores`).
    """
    if config.from_images:
        if isinstance(data, FeatureStore | StoreSet):
            raise ValueError(
                f"{config.source or 'the config'} trains from images (it has a backbone section): give the "
                "dataset root, not a feature store"
            )
        return Path(data)
    if isinstance(data, StoreSet):
        return data
    main = data if isinstance(data, FeatureStore) else FeatureStore.open(data)
    named = named_stores(stores)
    return StoreSet({"": main, **named.stores}) if named is not None else main


def named_stores(stores: Any) -> StoreSet | None:
    """``{name: store or path}`` (or a :class:`StoreSet`) as a set of named stores; None for none."""
    if not stores:
        return None
    found = stores if isinstance(stores, StoreSet) else StoreSet.open(dict(stores))
    if "" in found.stores:
        raise ValueError("named stores need a name each (au=STORE); the main store is given on its own")
    return found


def build_training(
    config: TrainConfig, data: Any, train: LabelTable, val: LabelTable | None, *,
    trust_remote_code: bool = False, stores: Any = None,
) -> Training:  # fmt: skip
    """The model and data module of ``config`` over ``data`` (see :func:`open_training_data`).

    ``trust_remote_code`` (a person's flag, never a config's) lets an ``hf:`` backbone in the loop run
    the code its repository ships. ``stores``: named stores (see :func:`open_training_data`).
    """
    data = open_training_data(config, data, stores)
    if config.from_images:
        from mtaffect.train.images.build import build_image_training

        return build_image_training(config, data, train, val, trust_remote_code=trust_remote_code,
                                    stores=named_stores(stores))  # fmt: skip
    model = build_model(config, data, data.input_dims() if isinstance(data, StoreSet) else None)
    dm = MTLDataModule(
        data, train, val, inputs=model.inputs, temporal=bool(model.temporal),
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size, window=config.data.window, stride=config.data.stride,
        window_edge=config.data.window_edge,
        in_memory=config.data.in_memory, memory_limit_gb=config.data.memory_limit_gb,
        seed=config.trainer.seed, workers=config.data.workers, pin_memory=on_gpu(config),
    )  # fmt: skip

    record = {"name": data.backbone, "spec": data.spec, "fingerprint": data.fingerprint}
    input_stores = input_store_records(data if isinstance(data, StoreSet) else None, model.inputs)

    def save(path: Path, metrics: dict | None, overwrite: bool) -> Path:
        return save_model(path, model, config, metrics, backbone=record, sizes=data,
                          input_stores=input_stores, overwrite=overwrite)  # fmt: skip

    return Training(model=model, datamodule=dm, save=save, weights=load_weights)


def on_gpu(config: TrainConfig) -> bool:
    """Whether the run trains on CUDA (mixed precision applies; pinned host memory speeds up the copies)."""
    acc = config.trainer.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


# ---- Lightning -------------------------------------------------------------------------------------
def _precision(config: TrainConfig) -> str:
    p = config.trainer.precision
    if not on_gpu(config):
        if p not in ("auto", "32", "32-true"):
            warnings.warn(f"precision {p!r} ignored: mixed precision is used on GPU only", stacklevel=3)
        return "32-true"
    if p == "auto":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return p


def _strategy(config: TrainConfig) -> Any:
    s = config.trainer.strategy
    if s == "ddp":
        # Stages freeze parts of the model and optimise a subset of the heads: unused parameters are normal.
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    if s == "ddp_spawn":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn", find_unused_parameters=True)
    return s


def _trainer(
    config: TrainConfig, epochs: int, log_dir: Path | None, stage: str, callbacks: Sequence, validate: bool
) -> L.Trainer:
    t = config.trainer
    cbs = list(callbacks)
    if t.progress and epochs > 0:
        cbs.append(_progress_bar(refresh_rate=10))
    logger: Any = False
    if log_dir is not None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(str(log_dir), name=stage)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(config),
        precision=_precision(config),  # type: ignore[arg-type]
        max_epochs=epochs,
        logger=logger,
        callbacks=cbs,
        enable_checkpointing=False,  # best weights are saved as safetensors by the run recorder
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        use_distributed_sampler=False,  # the data module shards by rank itself
        gradient_clip_val=config.optim.grad_clip or None,
        limit_val_batches=1.0 if validate else 0,
        deterministic=False,
    )


def _progress_bar(refresh_rate: int) -> Any:
    """Lightning's rich progress bar, redrawn (and its metrics gathered) every ``refresh_rate`` steps only:
    a redraw per step costs about as much as a small head's whole step."""
    from lightning.pytorch.callbacks import RichProgressBar

    class SparseRichProgressBar(RichProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
            if (batch_idx + 1) % self.refresh_rate == 0 or batch_idx + 1 >= self.total_train_batches:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    return SparseRichProgressBar(refresh_rate=refresh_rate)


@dataclass(frozen=True)
class World:
    """This process's place in the run: global rank, number of processes, processes on this node."""

    rank: int
    size: int
    local: int


def resolve_world(config: TrainConfig) -> World:
    """Rank and world size as the configured Trainer sees them (launcher environment included)."""
    with _quiet_lightning():
        probe = L.Trainer(
            accelerator=config.trainer.accelerator, devices=config.trainer.devices,
            num_nodes=config.trainer.num_nodes, strategy=_strategy(config), logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
    return World(probe.global_rank, probe.world_size, max(1, probe.num_devices))


@contextlib.contextmanager
def _threads(config: TrainConfig, world: World) -> Iterator[None]:
    """torch threads for this process: ``trainer.num_threads``, or the CPUs divided among a node's ranks."""
    before = torch.get_num_threads()
    n = config.trainer.num_threads or (cpus_per_process(world.local) if world.local > 1 else 0)
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's banner lines and the warnings our design triggers on purpose (frozen eval modules)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in (
                r".*module\(s\) in eval mode.*", r".*number of training batches.*", r".*LeafSpec.*",
                r".*does not have many workers.*", r".*sync_dist.*", r".*limit_val_batches.*",
                r".*max_epochs=0.*", r".*You have overridden `.*` in `LightningModule`.*",
            ):  # fmt: skip
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---- stages ----------------------------------------------------------------------------------------
@dataclass
class PlannedStage:
    index: int  # position in model.stages() (names the stage folder and seeds the stage)
    stage: Stage  # tasks reduced to the present ones
    settings: StageSettings
    epochs: int


def plan_stages(
    model: MTLModel, config: TrainConfig, present: Sequence[str], say: Callable,
    labelled: Sequence[str] | None = None,
) -> list[PlannedStage]:  # fmt: skip
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
    with _threads(config, world):
        return _fit(config, data, train, val, Path(out) if out is not None else None, world, t0,
                    overwrite=overwrite, resume=resume, callbacks=callbacks, log=log,
                    trust_remote_code=trust_remote_code, stores=named, only_stages=only_stages,
                    reuse={k: Path(v) for k, v in (reuse or {}).items()},
                    trainval=val is None if trainval is None else trainval)  # fmt: skip


def _fit(
    config: TrainConfig, data: Any, train: LabelTable, val: LabelTable | None, out: Path | None,
    world: World, t0: float, *, overwrite: bool, resume: bool, callbacks: Sequence, log: Any,
    trust_remote_code: bool = False, stores: StoreSet | None = None, only_stages: Sequence[str] | None = None,
    reuse: Mapping[str, Path] | None = None, trainval: bool = False,
) -> TrainResult:  # fmt: skip
    rank0 = world.rank == 0
    reuse = dict(reuse or {})

    def say(msg: str) -> None:
        if rank0 and log:
            log(msg)

    if val is not None and not val.any_label_mask.any():
        raise NoValidationError(_no_validation(val, len(val), 0, 0))
    images = None  # training from images: the image files' digest (rank 0, with a run folder)
    if out is not None:
        identity = run_identity(data_source(data, stores), train, val)
        if reuse:  # recorded, so a resumed run says where its reused stages came from
            identity["reused"] = {k: str(v) for k, v in reuse.items()}
        if rank0 and config.from_images:
            images = _image_set(data, train, val)
            # beside images_sha256 (which check_identity compares, and callers such as the pipeline's
            # kept-step check build without hashing): checked here, naming the first changed image
            identity["store"] = {**identity["store"], "images": images.summary()}
            saved_run = read_run(out) if resume else None
            if saved_run is not None:  # before prepare_out: this check names the first changed image
                images.check_resume(out, saved_run.get("store") or {})
        if rank0:  # other ranks start (Lightning's launcher) once rank 0 has prepared the folder
            prepare_out(out, overwrite, resume, config, identity)
    saved = EpochState.load(out) if resume and out is not None else None
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    training = build_training(config, data, train, val, trust_remote_code=trust_remote_code,
                              stores=stores if config.from_images else None)  # fmt: skip
    model, dm = training.model, training.datamodule
    model.decay_all = config.optim.decay_all  # read by param_groups (a fine-tuned backbone's no-decay set)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    excl = dm.train_report.excluded_invalid + (dm.val_report.excluded_invalid if dm.val_report else 0)
    say(
        f"rows: train {dm.train_report.used}, val {dm.val_report.used if dm.val_report else 0}; "
        f"excluded {excl} whose image failed extraction" + (" or is missing" if config.from_images else "")
    )
    if dm.train_report.labelled and len(dm.train_set) == 0:
        missing = list(getattr(dm, "missing", []))
        if config.from_images and missing:
            raise FileNotFoundError(
                f"{dm.folder}: none of the {dm.train_report.labelled} labelled training images is there "
                f"(e.g. {', '.join(missing[:3])}); check --data"
            )
        raise ValueError("no training row: the training labels match no valid image of the store")
    if config.trainer.checkpoint_per_task and any("@" in i for i in model.inputs):
        raise ConfigError(
            f"{config.source or 'the config'}: trainer.checkpoint_per_task makes best/ an ensemble, whose "
            f"members cannot read named feature stores ({[i for i in model.inputs if '@' in i]}); set it "
            "false"
        )
    labelled_tasks = present_tasks(dm)
    present = tuple(t for t in labelled_tasks if t in config.trainer.tasks)
    if not present:
        raise ValueError(
            f"{config.source or 'the config'}: trainer.tasks {config.trainer.tasks} names no task the "
            f"training rows have a label for (labelled: {list(labelled_tasks)})"
        )
    validate = dm.val_set is not None and len(dm.val_set) > 0
    if val is not None and not validate:  # e.g. every validation image failed extraction or is missing
        r = dm.val_report
        raise NoValidationError(_no_validation(val, len(val), r.labelled if r else 0,
                                               r.excluded_invalid if r else 0))  # fmt: skip
    a = dm.train_labels
    loss = MTLLoss.from_labels(config.loss, np.where(a.au_mask, a.au, -1), np.where(a.expr_mask, a.expr, -1))
    plan = plan_stages(model, config, present, say, labelled_tasks)
    if only_stages is not None:
        plan = [ps for ps in plan if ps.stage.name in only_stages]
    unknown = sorted(set(reuse) - {ps.stage.name for ps in plan})
    if unknown:
        raise ValueError(f"stages {unknown} cannot be reused: not stages this run trains")
    if out is not None and rank0:
        with atomic_open(out / "config.yaml", "w", overwrite=True, encoding="utf-8") as fh:
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        write_run(out, identity)
        if images is not None:
            images.write(out)
    history: list[dict] = list(saved.history) if saved else []
    summaries: list[dict] = list(saved.stages) if saved else []
    if saved is not None:
        model.load_state_dict(saved.model)  # the weights after the last finished epoch (or stage)
    selected: dict[str, Any] | None = None  # the stage whose best epoch is the run's model
    for i, ps in enumerate(plan):
        k, stage, final = ps.index, ps.stage, i == len(plan) - 1
        if saved is not None and (k < saved.stage or (k == saved.stage and saved.stage_done)):
            say(f"stage {stage.name}: finished in an earlier session")
            selected = _selected_from_summary(summaries, stage.name, selected)
            continue
        if stage.name in reuse:
            _reuse_stage(model, stage, training.weights(reuse[stage.name]), reuse[stage.name])
            say(f"stage {stage.name}: taken from {reuse[stage.name]} (trained once, reused)")
            summaries = [*summaries, {"name": stage.name, "index": k, "tasks": list(stage.tasks),
                                      "reused": str(reuse[stage.name]), "best_metrics": None}]  # fmt: skip
            continue
        mid = saved if saved is not None and k == saved.stage else None
        done = mid.epoch if mid is not None else 0
        if mid is not None:
            say(f"stage {stage.name}: resuming at epoch {done} of {ps.epochs}")
        L.seed_everything(stage_seed(config.trainer.seed, k), workers=True, verbose=False)
        # the weights the stage starts from (a run's first stage: the model as built); a stage resumed
        # mid-way reads them back below, only if needed
        if mid is not None:
            start = initial if i == 0 else None
        elif i == 0 and saved is None:
            start = initial
        else:
            start = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
        apply_stage(model, stage)
        dm.set_stage(stage.tasks, batch_size=ps.settings.batch_size or config.data.batch_size,
                     seed=stage_seed(config.trainer.seed, k), epoch_offset=done)  # fmt: skip
        remaining = ps.epochs - done
        if mid is not None and mid.selection.get("stopped"):
            remaining = 0
        recorder = RunRecorder(out, rank0, k, stage, final, training, history, summaries, say)
        with _quiet_lightning():
            trainer = _trainer(
                config, max(remaining, 0), out / "logs" if out is not None and rank0 else None, stage.name,
                callbacks, validate,
            )  # fmt: skip
        steps = dm.steps_per_epoch(trainer.world_size)
        module = MTLModule(
            model, loss, stage, lr=ps.settings.lr or config.optim.lr, weight_decay=config.optim.weight_decay,
            warmup_steps=round(config.optim.warmup_epochs * steps), total_steps=steps * ps.epochs,
            min_lr_ratio=config.optim.min_lr_ratio, au_threshold=config.trainer.au_threshold,
            select_tasks=select_tasks(config, stage.tasks),
            patience=config.trainer.patience if validate else 0, epoch_offset=done,
            resume=mid, recorder=recorder, log_every_n_steps=config.trainer.log_every_n_steps,
            schedule=config.optim.schedule,
            per_task=stage.tasks if final and validate and config.trainer.checkpoint_per_task else (),
        )  # fmt: skip
        if mid is not None and module.best_epoch >= 0 and out is not None:
            saved_best = training.weights(stage_dir(out, k, stage))
            module.best_state = _with_counters(saved_best, module.best_counters)
        if remaining > 0:
            with _quiet_lightning():
                trainer.fit(module, datamodule=dm)
        history = history + module.history
        note = ""
        if module.best_state is not None:
            model.load_state_dict(module.best_state)
        elif validate:  # no finite epoch: keep the weights the stage started from
            if start is None:
                prev = plan[i - 1] if i > 0 and out is not None else None
                start = training.weights(stage_dir(out, prev.index, prev.stage)) if prev else initial
            model.load_state_dict(start)
            note = "no finite validation epoch: weights left as before the stage"
            say(f"stage {stage.name}: {note} (lower optim.lr, or train in 32-true precision)")
        if module.diverged:
            say(
                f"stage {stage.name}: the weights became NaN/inf at epoch {module.epoch}; "
                "the stage ended there"
            )
        summary = {
            "name": stage.name, "index": k, "tasks": list(stage.tasks), "epochs": ps.epochs,
            "lr": ps.settings.lr or config.optim.lr,
            "batch_size": ps.settings.batch_size or config.data.batch_size,
            "epochs_run": done + len(module.history), "best_epoch": module.best_epoch,
            "best_score": module.selection()["best_score"], "best_metrics": module.best_metrics,
            "stopped_early": module.stopped_early, "diverged": module.diverged, "note": note,
        }  # fmt: skip
        if module.per_task:  # checkpoint_per_task: each task's best epoch of the final stage
            summary["per_task"] = module.task_best
        summaries = [*summaries, summary]
        if module.best_metrics is not None:
            selected = {"stage": stage.name, "metrics": module.best_metrics, "epoch": module.best_epoch,
                        "predictions": module.best_predictions, "final": final,
                        "written": recorder.best_written == module.best_epoch,
                        "task_predictions": module.task_predictions}  # fmt: skip
        if validate and module.best_metrics is not None:
            say(f"stage {stage.name}: best {'+'.join(module.select_tasks)} score {module.best_score:.4f} "
                f"(P {module.best_metrics['P']:.4f}) at epoch {module.best_epoch}")  # fmt: skip
        if out is not None and rank0:
            if not validate or module.best_state is None:
                training.save(stage_dir(out, k, stage), module.best_metrics, True)
            EpochState(
                stage=k, stage_name=stage.name, epoch=summary["epochs_run"], stage_done=True,
                model=model.state_dict(), selection=module.selection(), history=history, stages=summaries,
                rng=capture_rng(),
            ).save(out)  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return _finish(config, training, out, world, t0, history, summaries, selected, present, validate,
                   trainval and not validate)


def _with_counters(state: dict[str, torch.Tensor], counters: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``state`` (read from a checkpoint) with the integer buffers the selection recorded: a checkpoint
    may leave BatchNorm's ``num_batches_tracked`` out, which would come back as 0 after a resume."""
    for key, value in counters.items():
        if key in state:
            state[key] = torch.full_like(state[key], int(value))
    return state


def _image_set(root: Path, train: LabelTable, val: LabelTable | None) -> Any:
    """The images a run from images reads (every one its annotations name), hashed: see
    :mod:`mtaffect.train.images.digest`."""
    from mtaffect.schema import CROPPED_DIR
    from mtaffect.train.images.digest import ImageSet, image_names

    return ImageSet.scan(Path(root) / CROPPED_DIR, image_names([train, val]))


def select_tasks(config: TrainConfig, stage_tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The tasks whose terms choose a stage's epoch: ``trainer.select`` among the stage's tasks, else
    the stage's own tasks."""
    owner = {"valence": "va", "arousal": "va"}  # one CCC of the VA term: selected when VA trains
    chosen = tuple(t for t in config.trainer.select if owner.get(t, t) in stage_tasks)
    return chosen or stage_tasks


def _reuse_stage(model: MTLModel, stage: Stage, saved: dict[str, torch.Tensor], folder: Path) -> None:
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


def _selected_from_summary(summaries: list[dict], name: str, before: dict | None) -> dict | None:
    for s in summaries:
        if s["name"] == name and s.get("best_metrics") is not None:
            return {"stage": name, "metrics": s["best_metrics"], "epoch": s["best_epoch"],
                    "predictions": None, "final": False, "written": False}  # fmt: skip
    return before


def _decode_failures(dm: Any) -> dict:
    """Images that failed to decode while training from images (left out of their batches), by name."""
    failures = getattr(dm, "failures", None)
    return {"failed_to_decode": dict(sorted(failures.items()))} if failures else {}


def _finish(
    config: TrainConfig, training: Training, out: Path | None, world: World, t0: float, history: list[dict],
    summaries: list[dict], selected: dict | None, present: tuple[str, ...], validate: bool,
    trainval: bool = False,
) -> TrainResult:  # fmt: skip
    """Write best/ and val_predictions.parquet where the final stage's recorder has not, and metrics.json
    (rank 0); build the result."""
    model, dm = training.model, training.datamodule
    rank0 = world.rank == 0
    metrics = selected["metrics"] if selected else {}
    preds = None
    if selected and selected["predictions"] is not None and dm.val_labels is not None:
        preds = prediction_table(selected["predictions"], dm.val_labels.images)
    elif selected and out is not None and (out / "val_predictions.parquet").is_file():
        preds = PredictionTable.read(out / "val_predictions.parquet")  # written in an earlier session
    result = TrainResult(
        model=model, metrics=metrics, best_epoch=selected["epoch"] if selected else -1, history=history,
        val_predictions=preds, seconds=time.perf_counter() - t0,
        rows={"train": vars(dm.train_report), "val": vars(dm.val_report) if dm.val_report else None,
              "train_units": len(dm._all_train),
              "in_memory": bool(dm.source.in_memory) if dm.source else None,
              **_decode_failures(dm)},
        tasks=present, stages=summaries, rank=world.rank, trainval=trainval,
        not_selected=tuple(t for t in TASKS if t not in config.trainer.tasks),
    )  # fmt: skip
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
            {"best": metrics, "P_tasks": result.P if metrics else None, "tasks": list(present),
             "absent_tasks": list(result.absent_tasks), "not_trained": list(result.not_selected),
             "best_epoch": result.best_epoch,
             "selected_stage": selected["stage"] if selected else None, "stages": summaries,
             "history": history, "rows": result.rows, "seconds": result.seconds, "world_size": world.size,
             "recipe": config.model.recipe, "trainval": result.trainval,
             "diverged": diverged,
             **({"checkpoint_per_task": {t: {"epoch": v["epoch"], "score": v["score"],
                                             "member": _answering(per_task)[t]}
                                         for t, v in per_task.items()}} if per_task else {})},
        )  # fmt: skip
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
    members = {}
    for t in per_task:
        members.setdefault(tasks[t], per_task_dir(out, t))
    return save_ensemble(out / "best", members, tasks, metrics=metrics, overwrite=True)


def _per_task_predictions(out: Path | None, per_task: Mapping[str, dict], selected: dict | None,
                          dm: Any) -> PredictionTable | None:  # fmt: skip
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
    config: TrainConfig, features: str | os.PathLike, data: str | os.PathLike,
    out: str | os.PathLike | None = None, *, trainval: bool = False, validation: bool = True,
    **kw: Any,
) -> TrainResult:  # fmt: skip
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
    "NoValidationError", "TrainResult", "TrainingDivergedError", "build_model", "fit", "fit_from_root",
    "resolve_world",
]  # fmt: skip
