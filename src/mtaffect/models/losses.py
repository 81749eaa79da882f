"""Masked multi-task losses: every term is computed on its own labelled rows only.

A batch may hold no labelled row for a task (the labels are sparse): that task's loss is then an exact
0 that still belongs to the graph (``sum() * 0``), never NaN and never an error.

A peer's bug fixed here on purpose: the VA loss uses the *target* mean from the targets (recipe 2's
peer took it from the predictions) and population moments (ddof 0), as the official CCC does.

``weights`` multiply the optimised loss. (Recipe 3's peer names task weights in its configs but applies
them to the logged validation loss only: its training loss is the unweighted sum, which weights 1/1/1
reproduce.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtaffect.schema import MISSING_AU, MISSING_EXPR, NUM_AUS, NUM_EXPR

AU_LOSSES: tuple[str, ...] = ("bce", "wal")


# ---- weights from the training labels --------------------------------------------------------------
def au_pos_weight(aus: np.ndarray, max_weight: float = 50.0) -> torch.Tensor:
    """Per-AU ``negatives / positives`` over labelled rows (BCE ``pos_weight``), clipped to ``max_weight``.

    An AU with no positive (or no labelled row) gets weight 1: there is nothing to rebalance.
    """
    a = np.asarray(aus)
    valid = a != MISSING_AU
    pos = ((a == 1) & valid).sum(axis=0).astype(np.float64)
    neg = ((a == 0) & valid).sum(axis=0).astype(np.float64)
    w = np.ones(a.shape[1] if a.ndim == 2 else NUM_AUS)
    ok = pos > 0
    w[ok] = np.clip(neg[ok] / pos[ok], 1.0 / max_weight, max_weight)
    return torch.tensor(w, dtype=torch.float32)


def au_occurrence_weight(aus: np.ndarray) -> torch.Tensor:
    """Weights of the weighted asymmetric loss: ``w_i = N (1/r_i) / sum_j (1/r_j)`` with occurrence rate r_i.

    Rare AUs weigh more; the weights average 1. An AU never positive takes the smallest observed rate.
    """
    a = np.asarray(aus)
    valid = a != MISSING_AU
    n = valid.sum(axis=0).astype(np.float64)
    pos = ((a == 1) & valid).sum(axis=0).astype(np.float64)
    rate = np.divide(pos, n, out=np.zeros_like(pos), where=n > 0)
    seen = rate > 0
    if not seen.any():
        return torch.ones(a.shape[1] if a.ndim == 2 else NUM_AUS)
    rate[~seen] = rate[seen].min()
    inv = 1.0 / rate
    return torch.tensor(len(inv) * inv / inv.sum(), dtype=torch.float32)


def expr_class_weights(expression: np.ndarray, num_classes: int = NUM_EXPR) -> torch.Tensor:
    """Inverse-frequency class weights ``n / (K * count_c)`` over labelled rows; absent classes get 1."""
    e = np.asarray(expression)
    e = e[e != MISSING_EXPR]
    counts = np.bincount(e.astype(np.int64), minlength=num_classes).astype(np.float64)
    w = np.ones(num_classes)
    ok = counts > 0
    w[ok] = counts.sum() / (num_classes * counts[ok])
    return torch.tensor(w, dtype=torch.float32)


# ---- the three task losses -------------------------------------------------------------------------
def _zero(x: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps ``x`` in the graph (so backward and DDP's gradient sync still see the parameters)."""
    return x.sum() * 0.0


def au_bce_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean BCE-with-logits over the labelled (row, AU) entries; ``pos_weight`` (12,) scales positives."""
    m = mask.bool()
    if not m.any():
        return _zero(logits)
    pw = None if pos_weight is None else pos_weight.to(logits.device, torch.float32)
    el = F.binary_cross_entropy_with_logits(
        logits.float(), target.float().clamp(0, 1), reduction="none", pos_weight=pw
    )
    return el[m].mean()


def au_wal_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted asymmetric loss (Luo et al., used by Nguyen et al.): rare AUs weigh more, easy negatives less.

    ``-w_i [y log p + (1 - y) p log(1 - p)]`` averaged over the labelled entries: a negative's term is
    scaled by its own probability, so confidently rejected AUs contribute little.
    """
    m = mask.bool()
    if not m.any():
        return _zero(logits)
    x = logits.float()
    y = target.float().clamp(0, 1)
    p = torch.sigmoid(x)
    el = -(y * F.logsigmoid(x) + (1 - y) * p * F.logsigmoid(-x))
    if weight is not None:
        el = el * weight.to(x.device, torch.float32)
    return el[m].mean()


def expr_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Class-weighted cross-entropy over labelled rows: ``sum w_y CE / sum w_y`` (PyTorch's weighted mean)."""
    m = mask.bool()
    if not m.any():
        return _zero(logits)
    w = None if weight is None else weight.to(logits.device, torch.float32)
    return F.cross_entropy(logits[m].float(), target[m].long(), weight=w)


def ccc_torch(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CCC of two 1-D series with population moments; each mean from its own series."""
    x = pred.float()
    y = target.float()
    mx, my = x.mean(), y.mean()  # the target mean comes from the targets (a peer used the predictions')
    vx = ((x - mx) ** 2).mean()  # population moments (ddof 0), as the official metric
    vy = ((y - my) ** 2).mean()
    cov = ((x - mx) * (y - my)).mean()
    return 2 * cov / (vx + vy + (mx - my) ** 2 + eps)


def va_ccc_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: tuple[float, float] = (1.0, 1.0)
) -> torch.Tensor:
    """``w_V (1 - CCC_V) + w_A (1 - CCC_A)``, each on its own labelled rows; a dimension with no row (or
    weight 0) adds 0."""
    p = pred.reshape(-1, 2)
    t = target.reshape(-1, 2)
    m = mask.reshape(-1, 2).bool()
    total = _zero(p)
    for j in range(2):
        if weights[j] and m[:, j].any():
            total = total + float(weights[j]) * (1.0 - ccc_torch(p[m[:, j], j], t[m[:, j], j]))
    return total


# ---- the combined loss -----------------------------------------------------------------------------
@dataclass
class LossConfig:
    """Which losses and how much each task weighs in the optimised sum."""

    weights: dict[str, float] = field(default_factory=lambda: {"au": 1.0, "expr": 1.0, "va": 1.0})
    au_loss: str = "bce"  # "bce" (with per-AU pos_weight) or "wal" (weighted asymmetric loss)
    au_pos_weight: bool = True  # bce: negatives/positives per AU; wal: occurrence weights
    expr_class_weights: bool = True
    # the two terms of the VA loss (e.g. {valence: 1, arousal: 0}: a valence-only auxiliary loss)
    va_weights: dict[str, float] = field(default_factory=lambda: {"valence": 1.0, "arousal": 1.0})


class LossSettings(Protocol):
    """What :class:`MTLLoss` reads of its settings: a :class:`LossConfig`, or a training config's
    ``loss`` section (the same fields)."""

    @property
    def weights(self) -> Mapping[str, float]: ...
    @property
    def au_loss(self) -> str: ...
    @property
    def au_pos_weight(self) -> bool: ...
    @property
    def expr_class_weights(self) -> bool: ...
    @property
    def va_weights(self) -> Mapping[str, float]: ...


class MTLLoss(nn.Module):
    """Weighted sum of the masked task losses; returns the optimised total and each (unweighted) term.

    Outputs may carry a time axis (B, T, ...); ``batch["step_mask"]`` (B, T) then drops padded steps.
    """

    au_weight: torch.Tensor  # buffers (they follow the module to its device)
    expr_weight: torch.Tensor

    def __init__(
        self,
        config: LossSettings | None = None,
        au_weight: torch.Tensor | None = None,
        expr_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config: LossSettings = config or LossConfig()
        if self.config.au_loss not in AU_LOSSES:
            raise ValueError(f"loss.au_loss must be one of {AU_LOSSES}, got {self.config.au_loss!r}")
        unknown = set(self.config.weights) - {"au", "expr", "va"}
        if unknown:
            raise ValueError(f"loss.weights has unknown task(s) {sorted(unknown)}; tasks are au, expr, va")
        unknown = set(self.config.va_weights) - {"valence", "arousal"}
        if unknown:
            raise ValueError(f"loss.va_weights has unknown key(s) {sorted(unknown)}; keys: valence, arousal")
        vw = self.config.va_weights
        self.va_weights = (float(vw.get("valence", 1.0)), float(vw.get("arousal", 1.0)))
        self.register_buffer("au_weight", au_weight if au_weight is not None else torch.ones(NUM_AUS))
        self.register_buffer("expr_weight", expr_weight if expr_weight is not None else torch.ones(NUM_EXPR))

    @classmethod
    def from_labels(cls, config: LossSettings, aus: np.ndarray, expression: np.ndarray) -> MTLLoss:
        """Weights computed from the training labels, as configured."""
        au_w = None
        if config.au_pos_weight:
            au_w = au_pos_weight(aus) if config.au_loss == "bce" else au_occurrence_weight(aus)
        ex_w = expr_class_weights(expression) if config.expr_class_weights else None
        return cls(config, au_w, ex_w)

    def forward(
        self, out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], tasks: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step = batch.get("step_mask")
        parts: dict[str, torch.Tensor] = {}
        if "au" in tasks:
            m = batch["au_mask"] if step is None else batch["au_mask"] & step[..., None]
            fn = au_bce_loss if self.config.au_loss == "bce" else au_wal_loss
            parts["au"] = fn(out["au"], batch["au"], m, self.au_weight)
        if "expr" in tasks:
            m = batch["expr_mask"] if step is None else batch["expr_mask"] & step
            parts["expr"] = expr_ce_loss(out["expr"], batch["expr"], m, self.expr_weight)
        if "va" in tasks:
            m = batch["va_mask"] if step is None else batch["va_mask"] & step[..., None]
            parts["va"] = va_ccc_loss(out["va"], batch["va"], m, self.va_weights)
        if not parts:
            raise ValueError(f"no task to optimise: stage tasks {tasks} name none of au, expr, va")
        weighted = [float(self.config.weights.get(t, 1.0)) * v for t, v in parts.items()]
        total = weighted[0]
        for term in weighted[1:]:
            total = total + term
        return total, parts
