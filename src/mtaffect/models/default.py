"""The embedded default model: works offline right after install, and says exactly what it is.

There is no licensed AU / valence-arousal training data we may ship, so this model is built from what
we have (see docs/model_card.md):

- Expression: the embedded FER2013 mini-Xception (``fer-minixception``) gives 7 class probabilities,
  mapped onto the 8 ABAW classes (``FER_TO_EXPR``). ``Other`` has no FER2013 counterpart; it receives
  the share ``w = clip((tau - p_max) / tau, 0, 1)`` of the mass when fer's top probability ``p_max`` is
  below ``tau`` (0.4): a confident face keeps fer's distribution, an ambiguous one drifts to Other (at
  the uniform distribution, p_max = 1/7, w = 0.64).
- AUs: P(AU | expression) priors (CK+ FACS codes and s-Aff-Wild2 aggregate statistics, combined in
  ``scripts/build_default_priors.py``) mixed by the expression probabilities:
  ``P(AU) = sum_e P(e) P(AU | e)``.
- VA: the per-expression s-Aff-Wild2 valence/arousal means weighted by the expression probabilities.

AU and VA are therefore functions of the expression distribution only: useful for a first look and a
working pipeline, not a substitute for a model trained on s-Aff-Wild2 (``mtaffect train``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Final

import numpy as np
import torch

from mtaffect.features.fer_minixception import FER_CLASS_NAMES, FER_TO_EXPR
from mtaffect.models.base import AffectOutputs, FaceAffectModel
from mtaffect.schema import AU_NAMES, EXPR_NAMES, NUM_AUS, NUM_EXPR

PRIORS_FILE: Final[str] = "default_priors.json"
OTHER_INDEX: Final[int] = EXPR_NAMES.index("Other")


def default_priors_path() -> Path:
    return Path(str(resources.files("mtaffect").joinpath("models", PRIORS_FILE)))


@lru_cache(maxsize=4)
def load_priors(path: str | None = None) -> dict:
    """The priors JSON (checked against the schema's names and orders)."""
    p = Path(path) if path is not None else default_priors_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the default model's priors ({e}); reinstall mtaffect") from e
    if tuple(data.get("expr_names", ())) != EXPR_NAMES or tuple(data.get("au_names", ())) != AU_NAMES:
        raise ValueError(
            f"{p}: expression/AU names differ from mtaffect.schema; rebuild it with "
            "scripts/build_default_priors.py"
        )
    return data


def fer_to_abaw(fer_probs: np.ndarray, tau: float) -> np.ndarray:
    """fer's 7 probabilities (fer order) -> 8 ABAW probabilities (schema order), Other by the tau rule."""
    p = np.asarray(fer_probs, dtype=np.float64)
    out = np.zeros((len(p), NUM_EXPR))
    out[:, list(FER_TO_EXPR)] = p
    w = np.clip((tau - p.max(1)) / tau, 0.0, 1.0) if tau > 0 else np.zeros(len(p))
    out *= (1.0 - w)[:, None]
    out[:, OTHER_INDEX] += w
    return out


class DefaultAffectModel(FaceAffectModel):
    """:class:`~mtaffect.models.base.FaceAffectModel` over fer-minixception logits (see module doc)."""

    backbone: str = "fer-minixception"
    name: str = "mtaffect-default (fer-minixception + priors)"
    #: its AUs are read off the expression: the application combines them with measured facial evidence
    au_source: str = "expression"

    def __init__(self, priors: str | Path | None = None, other_tau: float | None = None) -> None:
        data = load_priors(str(priors) if priors is not None else None)
        self.backbone_kwargs: dict = {}
        self.other_tau = float(data["other_tau"] if other_tau is None else other_tau)
        if not 0.0 <= self.other_tau < 1.0:
            raise ValueError(f"other_tau must lie in [0, 1), got {self.other_tau}")
        #: (8, 12) P(AU | expression), rows in EXPR_NAMES order.
        self.p_au = np.array([data["p_au_given_expression"][e] for e in EXPR_NAMES], dtype=np.float64)
        #: (8, 2) valence/arousal mean per expression.
        self.va_means = np.array([data["va_mean_by_expression"][e] for e in EXPR_NAMES], dtype=np.float64)
        self.au_thresholds = np.asarray(data["au_thresholds"], dtype=np.float64)
        if self.p_au.shape != (NUM_EXPR, NUM_AUS) or self.au_thresholds.shape != (NUM_AUS,):
            raise ValueError(
                "default priors have the wrong shape; rebuild with scripts/build_default_priors.py"
            )
        self.sources: dict = data.get("sources", {})

    def predict(
        self, features: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> AffectOutputs:
        """fer logits (N, 7) -> probabilities; ``features``/``tokens`` are not used by this model."""
        if logits is None or logits.shape[-1] != len(FER_CLASS_NAMES):
            got = None if logits is None else tuple(logits.shape)
            raise ValueError(f"the default model needs fer-minixception's 7 logits, got {got}")
        fer = torch.softmax(logits.detach().double(), -1).cpu().numpy()
        expr = fer_to_abaw(fer, self.other_tau)
        return AffectOutputs(
            va=(expr @ self.va_means).astype(np.float32),
            expr_probs=expr.astype(np.float32),
            au_probs=(expr @ self.p_au).astype(np.float32),
        )

    def card(self) -> dict:
        """A short description for reports."""
        return {
            "name": self.name,
            "backbone": self.backbone,
            "expression": (
                f"fer's 7 classes -> 8 ABAW; Other gets clip((tau - p_max)/tau) with tau={self.other_tau}"
            ),
            "au": "sum_e P(e) P(AU|e) (CK+ FACS + s-Aff-Wild2 priors)",
            "va": "sum_e P(e) VA mean of e (s-Aff-Wild2 statistics)",
            "note": (
                "AU and VA follow the expression only; train on s-Aff-Wild2 (`mtaffect train`) for real AU/VA"
            ),
        }
