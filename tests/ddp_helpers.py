"""Test helper: run a training script as two CPU processes (Lightning DDP over gloo) and read back
which training rows each rank saw, how many input rows it held and its torch threads (the scripts
import :class:`Rows` from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L


class Rows(L.Callback):
    """Records the ``index`` of every first-epoch training row; writes ``rows<rank>.json`` into ``out``
    with the rows, the input rows the rank's source holds (None: a source that holds none, e.g. images)
    and its torch threads."""

    def __init__(self, out: str) -> None:
        self.out, self.rows = out, set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.rows.update(batch["index"].tolist())

    def on_train_end(self, trainer, module):
        import torch

        held = getattr(trainer.datamodule.source, "held_rows", None)
        info = {
            "rows": sorted(self.rows),
            "held": None if held is None else len(held),
            "threads": torch.get_num_threads(),
        }
        with open(os.path.join(self.out, f"rows{trainer.global_rank}.json"), "w") as fh:
            json.dump(info, fh)


def child_env() -> dict[str, str]:
    """The environment of a training child process: one OpenMP thread that sleeps when idle, and none
    of this process's DDP rank variables (the child starts its own world)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return env


def run_two_ranks(script: Path, cwd: Path, timeout: int = 180) -> tuple[list[dict], str]:
    """Run ``script`` (it starts a 2-device DDP fit with a :class:`Rows` callback writing into ``cwd``);
    return what each rank recorded (rank 0, rank 1) and the processes' standard output."""
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((cwd / f"rows{r}.json").read_text()) for r in range(2)], proc.stdout
