"""Test helper: run a training script as two CPU processes (Lightning DDP over gloo) and read back
which training rows each rank saw (the scripts import :class:`Rows` from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L


class Rows(L.Callback):
    """Records the ``index`` of every first-epoch training row; writes ``rows<rank>.json`` into ``out``."""

    def __init__(self, out: str) -> None:
        self.out, self.rows = out, set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.rows.update(batch["index"].tolist())

    def on_train_end(self, trainer, module):
        with open(os.path.join(self.out, f"rows{trainer.global_rank}.json"), "w") as fh:
            json.dump(sorted(self.rows), fh)


def run_two_ranks(script: Path, cwd: Path, timeout: int = 180) -> tuple[set[int], set[int]]:
    """Run ``script`` (it starts a 2-device DDP fit with a :class:`Rows` callback writing into ``cwd``);
    return the row sets of rank 0 and rank 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (set(json.loads((cwd / f"rows{r}.json").read_text())) for r in range(2))
    return r0, r1
