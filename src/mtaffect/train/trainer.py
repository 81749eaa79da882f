"""Lightning for one stage: the Trainer a stage runs under, this process's place in a distributed run,
its torch threads, and Lightning's output kept quiet. Lightning is imported here (and by the module,
data and loop modules): importing this module is what starts a training's import cost.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
import torch

from mtaffect.train.config import TrainConfig
from mtaffect.train.data import cpus_per_process
from mtaffect.train.training import on_gpu

#: What :func:`_precision` gives Lightning: the config's ``trainer.precision`` choices, "auto" resolved.
Precision = Literal["32-true", "32", "bf16-mixed", "16-mixed"]


def _precision(config: TrainConfig) -> Precision:
    p = config.trainer.precision
    if not on_gpu(config):
        if p not in ("auto", "32", "32-true"):
            warnings.warn(f"precision {p!r} ignored: mixed precision is used on GPU only", stacklevel=3)
        return "32-true"
    if p == "auto":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return cast(Precision, p)  # the config's choice rule keeps it one of PRECISIONS, and "auto" is handled


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


def stage_trainer(
    config: TrainConfig, epochs: int, log_dir: Path | None, stage: str, callbacks: Sequence, validate: bool
) -> L.Trainer:
    """The Trainer one stage runs under (checkpoints are ours: safetensors written by the run recorder).

    Args:
        config: the run's config (``trainer.*``, ``optim.grad_clip``).
        epochs: the stage's remaining epochs (0: nothing to train).
        log_dir: where the CSV logger writes (None: no logger, e.g. on ranks other than 0).
        stage: the stage's name (the logger's folder).
        callbacks: the caller's Lightning callbacks (a progress bar is added when ``trainer.progress``).
        validate: whether validation batches run at all.

    Returns:
        A ``lightning.Trainer``.
    """
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
        precision=_precision(config),
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
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
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
    with quiet_lightning():
        probe = L.Trainer(
            accelerator=config.trainer.accelerator,
            devices=config.trainer.devices,
            num_nodes=config.trainer.num_nodes,
            strategy=_strategy(config),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    return World(probe.global_rank, probe.world_size, max(1, probe.num_devices))


@contextlib.contextmanager
def torch_threads(config: TrainConfig, world: World) -> Iterator[None]:
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
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's banner lines and the warnings our design triggers on purpose (frozen eval modules)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in (
                r".*module\(s\) in eval mode.*",
                r".*number of training batches.*",
                r".*LeafSpec.*",
                r".*does not have many workers.*",
                r".*sync_dist.*",
                r".*limit_val_batches.*",
                r".*max_epochs=0.*",
                r".*You have overridden `.*` in `LightningModule`.*",
            ):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


__all__ = ["World", "quiet_lightning", "resolve_world", "stage_trainer", "torch_threads"]
