"""The LightningModule: one training stage of an :class:`MTLModel`, scored with the official metric.

- Inputs arrive as the store's float16 (or float32 from RAM) and are cast to float32 on the device
  (:meth:`mtaffect.train.data.MTLDataModule.float32_inputs`), so the host never makes a float32 copy.
- During a training step ``model.active_tasks`` is the stage's tasks (``None`` otherwise): an
  optional hint a recipe may use to skip computing heads whose loss the stage does not optimise
  (all three outputs are still required whenever it is ``None``: validation, prediction).
- Only the stage's ``train_modules`` are trainable (the rest frozen and kept in eval mode every
  epoch, since Lightning puts the whole model back in train mode) and only its task losses optimised.
- AdamW (multi-tensor) over the trainable parameters, in the groups the model gives
  (:meth:`MTLModel.param_groups`: the config's ``optim.groups``, a fine-tuned backbone's own lr and
  layer decay); per-step schedule (``optim.schedule``): ``cosine`` (default) a linear warm-up that
  starts above 0 (step 0 trains at ``lr / (warmup + 1)``: one peer's warm-up gave lr 0 for the whole
  first epoch), then cosine down to ``min_lr_ratio * lr``; ``warmup_constant`` the same warm-up, then
  ``lr`` to the end (recipe 1's peer); ``constant`` ``lr`` from the first step (recipe 3's peer).
- Bookkeeping stays off the per-step path: the training loss is kept as detached tensors and logged
  every ``log_every_n_steps`` steps and as epoch means (a ``self.log`` per step costs about as much
  as a small head's whole step).
- Validation accumulates :class:`mtaffect.metrics.MTLMetric` on each rank; at the epoch end the
  ranks' states are gathered (``all_gather_object``) and merged with ``MTLMetric.merge_states``, so
  P equals the single-process metric over the same predictions.
- Selection: an epoch is scored on the stage's own tasks (``select_tasks``: a single-task stage on its
  term of P, so untrained heads of other tasks never move the choice). An epoch whose validation
  predictions hold NaN/inf is recorded as non-finite and never selected; it counts as an epoch
  without improvement, so early stopping (``patience``) ends the stage; weights that became
  non-finite end it at once. The best weights and predictions are kept in memory and handed to a
  ``recorder`` (which writes them to disk as safetensors) each time they improve; the recorder also
  writes the per-epoch resumable state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn

from mtaffect.metrics import MTLMetric
from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.losses import MTLLoss
from mtaffect.schema import MISSING_AU, MISSING_EXPR, MISSING_VA
from mtaffect.train.config import SCHEDULES

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig


def apply_stage(model: MTLModel, stage: Stage) -> list[str]:
    """Freeze all but ``stage.train_modules`` (dotted names; ``"*"``: all); returns the trainable names."""
    if "*" in stage.train_modules:
        for p in model.parameters():
            p.requires_grad_(True)
        return ["*"]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in stage.train_modules:
        target: nn.Module | nn.Parameter
        try:
            target = model.get_submodule(name)
        except AttributeError:
            param = getattr(model, name, None)
            if not isinstance(param, nn.Parameter):
                children = [n for n, _ in model.named_children()]
                raise ValueError(
                    f"stage {stage.name!r} trains {name!r}, which is not a submodule or parameter of "
                    f"{type(model).__name__} (children: {children})"
                ) from None
            target = param
        if isinstance(target, nn.Parameter):
            target.requires_grad_(True)
        else:
            for p in target.parameters():
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"stage {stage.name!r} leaves no trainable parameter")
    return list(stage.train_modules)


def set_frozen_eval(module: nn.Module) -> None:
    """Put subtrees whose parameters are all frozen in eval mode (BN statistics and dropout stay fixed)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        set_frozen_eval(child)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float, schedule: str = "cosine"):
    """Multiplier of the base lr at optimiser step ``s`` (> 0 from step 0) for ``schedule``: ``cosine``
    (warm-up, then cosine to ``min_ratio``), ``warmup_constant`` (warm-up, then 1) or ``constant`` (1)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid values: {', '.join(SCHEDULES)}")

    def f(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "warmup_constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def select_score(result: Any, terms: tuple[str, ...]) -> float:
    """The selection score: the sum of the named terms of P (``au``, ``expr``, ``va``) and of single CCCs
    (``valence``, ``arousal``: the recipe-3 peer summed CCC_V and CCC_A, not their mean)."""
    single = {"valence": "ccc_v", "arousal": "ccc_a"}
    return float(sum(getattr(result, single[t]) if t in single else result.P_of((t,)) for t in terms))


def _gather(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def make_optimizer(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW updating all parameters with multi-tensor kernels instead of a Python loop over them (the
    CPU default). Not ``fused``: that one unscales gradients itself, which Lightning's 16-mixed
    gradient clipping refuses."""
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class MTLModule(L.LightningModule):
    """Trains one :class:`Stage` of ``model``; selects its best epoch on the stage's tasks."""

    def __init__(
        self,
        model: MTLModel,
        loss: MTLLoss,
        stage: Stage,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        total_steps: int = 1,
        min_lr_ratio: float = 0.01,
        au_threshold: float = 0.5,
        select_tasks: tuple[str, ...] | None = None,
        patience: int = 0,
        epoch_offset: int = 0,
        resume: Any = None,
        recorder: Any = None,
        log_every_n_steps: int = 50,
        schedule: str = "cosine",
        per_task: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.model, self.loss_fn, self.stage = model, loss, stage
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.total_steps, self.min_lr_ratio = (
            warmup_steps,
            max(total_steps, 1),
            min_lr_ratio,
        )
        self.schedule = schedule
        self.au_threshold = au_threshold
        self.select_tasks = tuple(select_tasks or stage.tasks)
        self.patience = patience
        self.epoch_offset = epoch_offset  # epochs of this stage finished before this session (resume)
        self.resume = resume  # an EpochState to continue from (optimizer, scheduler, RNG, selection)
        self.recorder = recorder
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.metric = MTLMetric(au_threshold)
        self._preds: list[dict[str, np.ndarray]] = []
        self._nonfinite = 0
        sel = dict(resume.selection) if resume is not None else {}
        self.best_score = sel["best_score"] if sel.get("best_score") is not None else -math.inf
        self.best_epoch: int = sel.get("best_epoch", -1)
        self.best_metrics: dict | None = sel.get("best_metrics")
        # the best weights' integer buffers (BatchNorm num_batches_tracked): a checkpoint may leave them
        # out (fer-minixception's file layout), so a resumed run restores them from here
        self.best_counters: dict[str, int] = dict(sel.get("best_counters") or {})
        self.wait: int = sel.get("wait", 0)
        # trainer.checkpoint_per_task: each task's own best epoch (on its term of P) besides the selection
        self.per_task = tuple(per_task)
        self.task_best: dict[str, dict] = {t: dict(v) for t, v in (sel.get("per_task") or {}).items()}
        self.task_predictions: dict[str, dict[str, np.ndarray]] = {}  # this session's, by task
        self.improved_tasks: tuple[str, ...] = ()  # tasks whose best epoch is the one just validated
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_predictions: dict[str, np.ndarray] | None = None
        self.history: list[dict] = []  # this session's epochs of the stage
        self.diverged = False
        self.stopped_early = False
        self._validated = -1
        self._train_loss: list[torch.Tensor] = []  # detached, so no device sync per step

    @property
    def epoch(self) -> int:
        """Epoch of the stage (counting epochs finished before a resume)."""
        return self.epoch_offset + int(self.current_epoch)

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Our batches are flat dicts of CPU tensors: nothing to do on a CPU, one async copy each on a GPU."""
        if device.type == "cpu":
            return batch
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def on_train_start(self) -> None:
        if self.resume is not None and self.resume.optimizer is not None:
            from mtaffect.train.state import restore_rng

            self.trainer.optimizers[0].load_state_dict(self.resume.optimizer)
            if self.resume.scheduler is not None:
                self.trainer.lr_scheduler_configs[0].scheduler.load_state_dict(self.resume.scheduler)
            if self.resume.rng is not None:
                restore_rng(*self.resume.rng)

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _start_epoch(self, phase: str) -> None:
        dm = self._datamodule()
        if hasattr(dm, "start_epoch"):
            dm.start_epoch(phase)

    def _check_decoded(self, phase: str) -> None:
        """Stop the run when not one input of this epoch's ``phase`` could be read (training from images:
        every image unreadable), before the epoch is recorded or its weights saved."""
        dm = self._datamodule()
        if not hasattr(dm, "epoch_counts"):
            return
        counts = _gather(dm.epoch_counts(phase))
        decoded, read = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if read and not decoded:
            raise dm.unreadable_error(phase, read, self.epoch)

    def on_train_epoch_start(self) -> None:
        self._start_epoch("train")
        self.model.train()  # Lightning keeps the modules' modes as it found them: set them explicitly
        set_frozen_eval(self.model)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.model.active_tasks = self.stage.tasks  # a recipe may skip heads the stage does not optimise
        try:
            out = self.model(batch)
        finally:
            self.model.active_tasks = None
        total, _ = self.loss_fn(out, batch, self.stage.tasks)
        self._train_loss.append(total.detach())
        if batch_idx % self.log_every_n_steps == 0:
            self.log(
                "train/loss", self._train_loss[-1], prog_bar=True, batch_size=int(batch["index"].shape[0])
            )
        return total

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        groups = self.model.param_groups(self.lr, self.weight_decay)
        opt = make_optimizer(groups, self.lr, self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.warmup_steps, self.total_steps, self.min_lr_ratio, self.schedule)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _epoch_train_loss(self) -> float | None:
        return _finite(float(torch.stack(self._train_loss).mean())) if self._train_loss else None

    def on_train_epoch_end(self) -> None:
        self._check_decoded("train")
        train_loss = self._epoch_train_loss()
        if train_loss is not None:
            self.log("train/loss_epoch", train_loss)
        if self._validated != self.current_epoch:  # no validation (e.g. --trainval): the loss is the record
            self.history.append({"stage": self.stage.name, "epoch": self.epoch, "train_loss": train_loss})
        self._train_loss = []
        state = self.model.state_dict().values()  # weights and buffers (e.g. BatchNorm statistics)
        if not all(bool(torch.isfinite(t).all()) for t in state if t.is_floating_point()):
            self.diverged = True  # no later epoch can recover: end the stage now
            self.trainer.should_stop = True
        if self.recorder is not None:
            self.recorder.epoch_end(self)

    # ---- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._start_epoch("val")
        self.metric.reset()
        self._preds = []
        self._nonfinite = 0

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if batch["index"].shape[0] == 0:  # every image of the batch failed to decode: nothing to score
            return
        out = self.model(batch)
        va = out["va"].float()
        expr = torch.softmax(out["expr"].float(), -1)
        au = torch.sigmoid(out["au"].float())
        index = batch["index"]
        va_mask, expr_mask, au_mask = batch["va_mask"], batch["expr_mask"], batch["au_mask"]
        va_true, expr_true, au_true = batch["va"], batch["expr"], batch["au"]
        if "step_mask" in batch:  # temporal: keep real steps only (padding is neither scored nor predicted)
            keep = batch["step_mask"]
            va, expr, au, index = va[keep], expr[keep], au[keep], index[keep]
            va_mask, expr_mask, au_mask = va_mask[keep], expr_mask[keep], au_mask[keep]
            va_true, expr_true, au_true = va_true[keep], expr_true[keep], au_true[keep]
        finite = torch.isfinite(va).all(-1) & torch.isfinite(expr).all(-1) & torch.isfinite(au).all(-1)
        bad = int((~finite).sum())
        if bad:  # the epoch is marked non-finite; scoring the rest would only hide it
            self._nonfinite += bad
            return
        va_codes = torch.where(va_mask, va_true, torch.full_like(va_true, MISSING_VA))
        self.metric.update(
            valence_true=va_codes[:, 0],
            arousal_true=va_codes[:, 1],
            expr_true=torch.where(expr_mask, expr_true, torch.full_like(expr_true, MISSING_EXPR)),
            au_true=torch.where(au_mask, au_true, torch.full_like(au_true, MISSING_AU)).to(torch.int8),
            valence_pred=va[:, 0],
            arousal_pred=va[:, 1],
            expr_pred=expr,
            au_pred=au,
        )
        self._preds.append(
            {
                "index": index.cpu().numpy(),
                "va": va.cpu().numpy(),
                "expr": expr.cpu().numpy(),
                "au": au.cpu().numpy(),
            }
        )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self._check_decoded("train")  # the epoch's training ran before (nothing read when validating alone)
        self._check_decoded("val")
        gathered = _gather((self.metric.state_dict(), self._nonfinite))
        nonfinite = sum(n for _, n in gathered)
        self._validated = self.current_epoch
        entry: dict[str, Any] = {
            "stage": self.stage.name,
            "epoch": self.epoch,
            "train_loss": self._epoch_train_loss(),
        }
        improved = False
        self.improved_tasks = ()
        if nonfinite:
            entry.update(
                P=None,
                ccc_va=None,
                f1_expr=None,
                f1_au=None,
                score=None,
                finite=False,
                nonfinite_rows=nonfinite,
            )
            self.wait += 1
        else:
            result = MTLMetric.merge_states([s for s, _ in gathered]).compute()
            score = select_score(result, self.select_tasks)
            entry.update(
                P=result.P,
                ccc_va=result.va_mean,
                f1_expr=result.expr_f1,
                f1_au=result.au_f1,
                score=score,
                finite=True,
            )
            self.log("val/P", result.P, prog_bar=True)
            self.log("val/score", score)
            self.log("val/ccc_va", result.va_mean)
            self.log("val/f1_expr", result.expr_f1)
            self.log("val/f1_au", result.au_f1)
            if self.best_score < score:
                improved = True
                self.best_score, self.best_epoch = score, self.epoch
                self.best_metrics = result.to_dict()
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                self.best_counters = {
                    k: int(v) for k, v in self.best_state.items() if k.endswith("num_batches_tracked")
                }
                self.best_predictions = _concat(_gather(_concat(self._preds)))
                self.wait = 0
            else:
                self.wait += 1
            self._select_per_task(result, improved)
        self.history.append(entry)
        self._preds = []
        if self.recorder is not None:
            self.recorder.validated(self, entry, improved)
        if self.patience and self.wait >= self.patience:
            self.stopped_early = True
            self.trainer.should_stop = True

    def _select_per_task(self, result: Any, improved: bool) -> None:
        """``per_task``: keep each task's best epoch on its own term (its metrics and predictions)."""
        better = []
        for t in self.per_task:
            score = result.P_of((t,))
            best = (self.task_best.get(t) or {}).get("score")
            if math.isfinite(score) and (best is None or best < score):
                self.task_best[t] = {"score": float(score), "epoch": self.epoch, "metrics": result.to_dict()}
                better.append(t)
        if better:
            if improved:
                assert self.best_predictions is not None  # set by this validation
                preds = self.best_predictions
            else:
                preds = _concat(_gather(_concat(self._preds)))
            self.task_predictions.update({t: preds for t in better})
        self.improved_tasks = tuple(better)

    def selection(self) -> dict:
        """What a resumed run needs to continue this stage's selection (JSON-able)."""
        return {
            "best_score": _finite(self.best_score) if self.best_epoch >= 0 else None,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "best_metrics": self.best_metrics,
            "select_tasks": list(self.select_tasks),
            "best_counters": self.best_counters,
            **({"per_task": self.task_best} if self.per_task else {}),
        }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p and len(p["index"])]
    if not parts:
        return {
            "index": np.zeros(0, np.int64),
            "va": np.zeros((0, 2)),
            "expr": np.zeros((0, 8)),
            "au": np.zeros((0, 12)),
        }
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


__all__ = ["MTLModule", "apply_stage", "lr_lambda", "make_optimizer", "select_score", "set_frozen_eval"]
