"""Running a training: seeds, the model's stages, Lightning trainers, and the run folder.

:func:`fit` trains a recipe from a :class:`TrainConfig` on a feature store and label tables and returns
a :class:`TrainResult`; with ``out`` it also writes the run folder::

    out/config.yaml               the resolved config
    out/best/                     checkpoint (model.safetensors + config.json) of the best val P
    out/metrics.json              best P and its terms, per-epoch history, row counts, timings
    out/val_predictions.parquet   PredictionTable of the validation rows (best epoch)
    out/stages/<k>-<name>/        checkpoint after each finished stage (what ``resume`` restarts from)
    out/logs/                     Lightning CSV logs

Each :class:`Stage` of ``model.stages()`` gets its own Trainer: all parameters but the stage's
``train_modules`` frozen, only its task losses optimised, its own epochs and early stopping; each
stage ends on its best-P weights, and the run's best model is the final stage's best epoch.

Resuming (``resume=True``): stages whose checkpoint this run wrote (safetensors) are loaded and
skipped; an interrupted stage restarts from its beginning. Lightning's ``last.ckpt`` is a pickle, so
it is never written nor read: resumption never unpickles anything.

Under DDP (``trainer.strategy: ddp``, ``devices``, ``num_nodes``) every process runs :func:`fit`;
ranks train on disjoint shares, the validation metric is merged across ranks, and only rank 0 writes.

What is trained comes from :func:`build_training`: a recipe over a feature store, or, for a config
with a ``backbone:`` section, the backbone in the loop over a dataset's images
(:mod:`mtaffect.train.images`); the loop below is the same for both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.features.store import FeatureStore
from mtaffect.io import OutputExistsError, atomic_open
from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.checkpoint import load_mtl_model, save_checkpoint
from mtaffect.models.losses import MTLLoss
from mtaffect.train.config import TrainConfig
from mtaffect.train.data import MTLDataModule
from mtaffect.train.module import MTLModule, apply_stage

#: Files and folders of a run directory (what ``overwrite`` removes; nothing else is touched).
RUN_ENTRIES = ("config.yaml", "best", "metrics.json", "val_predictions.parquet", "stages", "logs")


@dataclass
class TrainResult:
    """What a training produced: the best model (final stage), its validation metrics and predictions."""

    model: MTLModel
    metrics: dict  # MetricResult.to_dict() of the best epoch ({} without validation)
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    val_predictions: PredictionTable | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    rows: dict = field(default_factory=dict)

    @property
    def P(self) -> float:
        return float(self.metrics.get("P", float("nan")))

    def summary(self) -> str:
        m = self.metrics
        if not m:
            return "no validation set: nothing scored"
        return (
            f"P = {m['P']:.4f}  (CCC_VA {m['va']['mean']:.4f} + F1_EXPR {m['expr']['f1']:.4f} + "
            f"F1_AU {m['au']['f1']:.4f})  best epoch {self.best_epoch}, {self.seconds:.1f}s"
        )


def env_rank() -> int:
    """Global rank of this process from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def build_model(config: TrainConfig, store: Any) -> MTLModel:
    """``create_model(recipe, feature_dim, num_logits, token_shape, **hparams)`` with a clear error.

    ``store`` is anything with those three sizes: a :class:`FeatureStore` or a backbone's spec.
    """
    from mtaffect.models.registry import create_model

    try:
        model = create_model(
            config.model.recipe,
            feature_dim=store.feature_dim,
            num_logits=store.num_logits,
            token_shape=store.token_shape,
            **config.model.hparams,
        )
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a size torch cannot allocate
        where = config.source or "the config"
        raise ValueError(f"{where}: model.hparams do not fit recipe {config.model.recipe!r}: {exc}") from exc
    model.group_settings = dict(config.optim.groups)
    return model


@dataclass
class Training:
    """What :func:`fit` trains: the model, its data module, and how a stage's weights are saved/restored."""

    model: MTLModel
    datamodule: Any  # MTLDataModule (or a subclass)
    save: Callable[[Path, dict | None, bool], Path]  # (folder, metrics, overwrite) -> checkpoint folder
    restore: Callable[[Path], None]  # load a saved stage checkpoint into ``model``


def open_training_data(config: TrainConfig, data: Any) -> Any:
    """The data a config trains on: a :class:`FeatureStore` (opened once), or for a config with a
    ``backbone:`` section the dataset root (its images are read while training)."""
    if config.from_images:
        if isinstance(data, FeatureStore):
            raise ValueError(
                f"{config.source or 'the config'} trains from images (it has a backbone section): give the "
                "dataset root, not a feature store"
            )
        return Path(data)
    return data if isinstance(data, FeatureStore) else FeatureStore.open(data)


def build_training(config: TrainConfig, data: Any, train: LabelTable, val: LabelTable | None) -> Training:
    """The model and data module of ``config`` over ``data`` (see :func:`open_training_data`)."""
    data = open_training_data(config, data)
    if config.from_images:
        from mtaffect.train.images.build import build_image_training

        return build_image_training(config, data, train, val)
    model = build_model(config, data)
    dm = MTLDataModule(
        data, train, val, inputs=model.inputs, temporal=bool(model.temporal),
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size, window=config.data.window, stride=config.data.stride,
        in_memory=config.data.in_memory, memory_limit_gb=config.data.memory_limit_gb,
        seed=config.trainer.seed,
    )  # fmt: skip

    def restore(path: Path) -> None:
        saved, _ = load_mtl_model(path)
        model.load_state_dict(saved.state_dict())

    def save(path: Path, metrics: dict | None, overwrite: bool) -> Path:
        return _save(path, model, config, data, metrics, overwrite)

    return Training(model=model, datamodule=dm, save=save, restore=restore)


def _precision(config: TrainConfig, accelerator: str) -> str:
    p = config.trainer.precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not gpu:
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
    from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    t = config.trainer
    cbs = list(callbacks)
    if t.patience and validate:
        cbs.append(EarlyStopping(monitor="val/P", mode="max", patience=t.patience, check_finite=True))
    if t.progress:
        cbs.append(RichProgressBar())
    logger = CSVLogger(str(log_dir), name=stage) if log_dir is not None else False
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(config),
        precision=_precision(config, t.accelerator),  # type: ignore[arg-type]
        max_epochs=epochs,
        logger=logger,
        callbacks=cbs,
        enable_checkpointing=False,  # best weights are kept in memory and saved as safetensors
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        use_distributed_sampler=False,  # ShardedBatches shards by rank itself
        gradient_clip_val=config.optim.grad_clip or None,
        limit_val_batches=1.0 if validate else 0,
        deterministic=False,
    )


def _prepare_out(out: Path, overwrite: bool, resume: bool) -> None:
    present = [e for e in RUN_ENTRIES if (out / e).exists()]
    if present and not resume:
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a run ({', '.join(present)}); pass --overwrite to replace it or "
                "--resume to continue it"
            )
        for e in present:
            p = out / e
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    with atomic_open(path, "w", overwrite=True, encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, default=float)
        fh.write("\n")


def _stage_dir(out: Path, k: int, stage: Stage) -> Path:
    return out / "stages" / f"{k}-{stage.name}"


def _check_stage_rows(stage: Stage, dm: MTLDataModule) -> None:
    counts = dm.train_labels.task_rows()
    empty = [t for t in stage.tasks if counts.get(t, 0) == 0]
    if len(empty) == len(stage.tasks):
        raise ValueError(
            f"stage {stage.name!r} trains {', '.join(stage.tasks)} but the training rows hold no valid label "
            f"for {'it' if len(empty) == 1 else 'any of them'} (rows per task: {counts}); "
            "check the annotations / the store's failed images"
        )
    if empty:
        warnings.warn(
            f"stage {stage.name!r}: no training label for {empty}; those losses stay 0", stacklevel=3
        )


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
            ):  # fmt: skip
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
) -> TrainResult:
    """Train ``config``'s recipe on ``store`` rows labelled by ``train``; select on ``val``'s P.

    For a config with a ``backbone:`` section, ``store`` is the dataset root: training reads its images.
    """
    t0 = time.perf_counter()
    st = open_training_data(config, store)
    rank0 = env_rank() == 0
    out_path = Path(out) if out is not None else None
    if out_path is not None and rank0:
        _prepare_out(out_path, overwrite, resume)
        saved_cfg = out_path / "config.yaml"
        if resume and saved_cfg.is_file():
            before = yaml.safe_load(saved_cfg.read_text(encoding="utf-8"))
            if before != yaml.safe_load(yaml.safe_dump(config.to_dict())):
                raise ValueError(
                    f"{saved_cfg}: the run was started with another config; resume with the same config "
                    "and overrides, or start over with --overwrite"
                )
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    training = build_training(config, st, train, val)
    model, dm = training.model, training.datamodule
    rows = {
        "train": vars(dm.train_report),
        "val": vars(dm.val_report) if dm.val_report else None,
        "train_units": len(dm.train_set),
        "in_memory": dm.source.in_memory,
    }
    if rank0 and log:
        excl = dm.train_report.excluded_invalid + (dm.val_report.excluded_invalid if dm.val_report else 0)
        log(
            f"rows: train {dm.train_report.used}, val {dm.val_report.used if dm.val_report else 0}; "
            f"excluded {excl} whose image failed extraction"
            + (" or is missing" if config.from_images else "")
        )
    if len(dm.train_set) == 0:
        raise ValueError("no training row: the training labels match no valid image of the store")
    validate = dm.val_set is not None and len(dm.val_set) > 0
    a = dm.train_labels
    loss = MTLLoss.from_labels(config.loss, np.where(a.au_mask, a.au, -1), np.where(a.expr_mask, a.expr, -1))
    if out_path is not None and rank0:
        with atomic_open(out_path / "config.yaml", "w", overwrite=True, encoding="utf-8") as fh:
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
    stages = model.stages()
    for s in stages:
        _check_stage_rows(s, dm)
    history: list[dict] = []
    final: MTLModule | None = None
    world = 1
    for k, stage in enumerate(stages):
        sdir = _stage_dir(out_path, k, stage) if out_path is not None else None
        if resume and sdir is not None and (sdir / "config.json").is_file() and k < len(stages) - 1:
            training.restore(sdir)
            if rank0 and log:
                log(f"stage {stage.name}: resumed from {sdir}")
            continue
        apply_stage(model, stage)
        dm.set_tasks(stage.tasks)
        epochs = stage.epochs or config.trainer.epochs
        with _quiet_lightning():
            trainer = _trainer(
                config, epochs, out_path / "logs" if out_path is not None and rank0 else None, stage.name,
                callbacks, validate,
            )  # fmt: skip
        world = trainer.world_size
        steps = dm.steps_per_epoch(world)
        module = MTLModule(
            model, loss, stage, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
            warmup_steps=round(config.optim.warmup_epochs * steps), total_steps=steps * epochs,
            min_lr_ratio=config.optim.min_lr_ratio, au_threshold=config.trainer.au_threshold,
        )  # fmt: skip
        with _quiet_lightning():
            trainer.fit(module, datamodule=dm)
        if module.best_state is not None:
            model.load_state_dict(module.best_state)
        history.extend(module.history)
        final = module
        if rank0 and log and module.best_result is not None:
            r = module.best_result
            log(f"stage {stage.name}: best P {r.P:.4f} at epoch {module.best_epoch}")
        if sdir is not None and rank0 and k < len(stages) - 1:
            training.save(sdir, None, True)
    if getattr(dm, "failures", None):  # images that failed to decode while training (left out)
        rows["failed_to_decode"] = dict(sorted(dm.failures.items()))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    assert final is not None
    metrics = final.best_result.to_dict() if final.best_result is not None else {}
    preds = None
    if final.best_predictions is not None and dm.val_labels is not None:
        preds = _prediction_table(final.best_predictions, dm.val_labels.images)
    result = TrainResult(
        model=model, metrics=metrics, best_epoch=final.best_epoch, history=history, val_predictions=preds,
        seconds=time.perf_counter() - t0, rows=rows,
    )  # fmt: skip
    if out_path is not None and rank0:
        result.checkpoint = training.save(out_path / "best", metrics, True)
        if preds is not None:
            preds.write(out_path / "val_predictions.parquet", overwrite=True)
        _write_json(
            out_path / "metrics.json",
            {"best": metrics, "best_epoch": result.best_epoch, "history": history, "rows": rows,
             "seconds": result.seconds, "world_size": world, "recipe": config.model.recipe},
        )  # fmt: skip
    return result


def _save(path: Path, model: MTLModel, config: TrainConfig, st: FeatureStore, metrics: dict | None,
          overwrite: bool) -> Path:  # fmt: skip
    return save_checkpoint(
        path, model,
        backbone={"name": st.backbone, "spec": st.spec, "fingerprint": st.fingerprint,
                  "kwargs": st.meta.get("backbone_kwargs", {})},
        feature_dim=st.feature_dim, num_logits=st.num_logits, token_shape=st.token_shape,
        window=config.data.window if model.temporal else 1,
        au_thresholds=[config.trainer.au_threshold] * 12, metrics=metrics, train_config=config.to_dict(),
        overwrite=overwrite,
    )  # fmt: skip


def _prediction_table(preds: dict[str, np.ndarray], images: np.ndarray) -> PredictionTable:
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


def fit_from_root(
    config: TrainConfig, features: str | os.PathLike | None, data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    **kw: Any,
) -> TrainResult:  # fmt: skip
    """:func:`fit` on the official train/val splits of a dataset root (its images without ``features``)."""
    from mtaffect.data.annotations import load_split

    source = data if features is None else features
    return fit(config, source, load_split(data, "train"), load_split(data, "val"), out, **kw)


__all__ = ["TrainResult", "Training", "build_model", "build_training", "fit", "fit_from_root",
           "open_training_data"]  # fmt: skip
