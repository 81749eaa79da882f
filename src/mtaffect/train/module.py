"""The LightningModule: one training stage of an :class:`MTLModel`, scored with the official metric.

- During a training step ``model.active_tasks`` is the stage's tasks (``None`` otherwise): an
  optional hint a recipe may use to skip computing heads whose loss the stage does not optimise
  (all three outputs are still required whenever it is ``None``: validation, prediction).
- Only the stage's ``train_modules`` are trainable (the rest frozen and kept in eval mode every
  epoch, since Lightning puts the whole model back in train mode) and only its task losses optimised.
- AdamW over the trainable parameters, in the groups the model gives (:meth:`MTLModel.param_groups`:
  the config's ``optim.groups``, a fine-tuned backbone's own lr and layer decay); per-step schedule:
  linear warm-up that starts above 0
  (step 0 trains at ``lr / (warmup + 1)``: one peer's warm-up gave lr 0 for the whole first epoch),
  then cosine down to ``min_lr_ratio * lr``.
- Validation accumulates :class:`mtaffect.metrics.MTLMetric` on each rank; at the epoch end the
  ranks' states are gathered (``all_gather_object``) and merged with ``MTLMetric.merge_states``, so
  P equals the single-process metric over the same predictions. The best-P weights and predictions
  are kept in memory (no pickled Lightning checkpoint); the caller saves them as safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from mtaffect.metrics import MetricResult, MTLMetric
from mtaffect.models.base import MTLModel, Stage
from mtaffect.models.losses import MTLLoss
from mtaffect.schema import MISSING_AU, MISSING_EXPR, MISSING_VA


def apply_stage(model: MTLModel, stage: Stage) -> list[str]:
    """Freeze all but ``stage.train_modules`` (dotted names; ``"*"``: all); returns the trainable names."""
    if "*" in stage.train_modules:
        for p in model.parameters():
            p.requires_grad_(True)
        return ["*"]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in stage.train_modules:
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = getattr(model, name, None)
            if not isinstance(target, nn.Parameter):
                children = [n for n, _ in model.named_children()]
                raise ValueError(
                    f"stage {stage.name!r} trains {name!r}, which is not a submodule or parameter of "
                    f"{type(model).__name__} (children: {children})"
                ) from None
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


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the base lr at optimiser step ``s``: > 0 from step 0, warm-up then cosine."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _gather(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class MTLModule(L.LightningModule):
    """Trains one :class:`Stage` of ``model``; tracks the best validation P of the stage."""

    def __init__(
        self, model: MTLModel, loss: MTLLoss, stage: Stage, *, lr: float = 1e-3, weight_decay: float = 1e-2,
        warmup_steps: int = 0, total_steps: int = 1, min_lr_ratio: float = 0.01, au_threshold: float = 0.5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model, self.loss_fn, self.stage = model, loss, stage
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.total_steps, self.min_lr_ratio = (
            warmup_steps,
            max(total_steps, 1),
            min_lr_ratio,
        )
        self.au_threshold = au_threshold
        self.metric = MTLMetric(au_threshold)
        self._preds: list[dict[str, np.ndarray]] = []
        self.best_p = -math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_result: MetricResult | None = None
        self.best_predictions: dict[str, np.ndarray] | None = None
        self.history: list[dict] = []
        self._train_loss: list[torch.Tensor] = []  # detached, so no device sync per step

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    def on_train_epoch_start(self) -> None:
        self.model.train()  # Lightning keeps the modules' modes as it found them: set them explicitly
        set_frozen_eval(self.model)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.model.active_tasks = self.stage.tasks  # a recipe may skip heads the stage does not optimise
        try:
            out = self.model(batch)
        finally:
            self.model.active_tasks = None
        total, parts = self.loss_fn(out, batch, self.stage.tasks)
        n = int(batch["index"].shape[0])
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        for task, value in parts.items():
            self.log(f"train/{task}", value, batch_size=n)
        self._train_loss.append(total.detach())
        return total

    def configure_optimizers(self) -> dict:
        # the model groups its trainable parameters (per-submodule lr / weight decay, a backbone's layers)
        opt = torch.optim.AdamW(
            self.model.param_groups(self.lr, self.weight_decay), lr=self.lr, weight_decay=self.weight_decay
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.warmup_steps, self.total_steps, self.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.metric.reset()
        self._preds = []

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
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
        states = _gather(self.metric.state_dict())
        result = MTLMetric.merge_states(states).compute()
        sync = self.trainer.world_size > 1
        self.log("val/P", result.P, prog_bar=True, sync_dist=sync)
        self.log("val/ccc_va", result.va_mean, sync_dist=sync)
        self.log("val/f1_expr", result.expr_f1, sync_dist=sync)
        self.log("val/f1_au", result.au_f1, sync_dist=sync)
        train_loss = float(torch.stack(self._train_loss).mean()) if self._train_loss else float("nan")
        self._train_loss = []
        self.history.append(
            {
                "stage": self.stage.name,
                "epoch": int(self.current_epoch),
                "train_loss": train_loss,
                "P": result.P,
                "ccc_va": result.va_mean,
                "f1_expr": result.expr_f1,
                "f1_au": result.au_f1,
            }
        )
        if self.best_p < result.P:
            self.best_p, self.best_epoch, self.best_result = result.P, int(self.current_epoch), result
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            parts = _gather(_concat(self._preds))
            self.best_predictions = _concat(parts)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p and len(p["index"])]
    if not parts:
        return {"index": np.zeros(0, np.int64), "va": np.zeros((0, 2)), "expr": np.zeros((0, 8)),
                "au": np.zeros((0, 12))}  # fmt: skip
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
