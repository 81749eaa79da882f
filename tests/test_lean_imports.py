"""Training processes import Lightning without torchmetrics' optional integrations (startup time)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys
import mtaffect.train.fit  # imports Lightning (and torchmetrics) through the lean hook
skipped = [m for m in ("transformers", "matplotlib", "scipy.signal") if m in sys.modules]
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # our own code still imports them normally afterwards
import lightning as L
print("skipped" if not skipped else f"imported {skipped}", plt.figure.__name__, L.Trainer.__name__)
"""


def test_training_imports_skip_transformers_matplotlib_and_scipy_signal():
    env = {k: v for k, v in os.environ.items() if k != "MTAFFECT_LEAN_IMPORTS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["skipped", "figure", "Trainer"], out.stdout
