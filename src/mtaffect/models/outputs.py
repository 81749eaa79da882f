"""Per-face predictions as probabilities (imports without torch: the onnxruntime engine returns them too)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AffectOutputs:
    """Per-face predictions as probabilities: what a PredictionTable row holds."""

    va: np.ndarray  # (N, 2) valence, arousal in [-1, 1]
    expr_probs: np.ndarray  # (N, 8), rows sum to 1
    au_probs: np.ndarray  # (N, 12)
