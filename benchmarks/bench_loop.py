"""Per-step cost of the Lightning training loop against a bare PyTorch loop, in one process.

The workload is the emotinet (recipe 4) AU head: Dense(128, ReLU) -> 12 over 1,280 features + 10
logits (published input), batches of 1,024 rows (``configs/emotinet.yaml``) read from the in-memory
input source, the masked per-AU weighted BCE, AdamW and the per-step schedule. Both loops use the very
same data module, model (same initial weights), loss, optimiser and schedule; the Lightning side is
``MTLModule`` under the ``Trainer`` that ``fit`` builds (progress bar and CSV logger on, as a CLI run
has them), the bare side is the textbook ``for batch: forward, backward, step`` loop. Each loop runs
``--epochs`` epochs (the first is a warm-up, not timed); the loops alternate ``--repeats`` times and the
medians are compared. ``before`` is the module as it was (a ``self.log`` per step and per task,
single-tensor AdamW, Lightning's batch transfer, the progress bar redrawn every step), rebuilt here.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_loop.py      # target: ratio <= 1.3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from bench_train import cached_store, open_with_labels


class _StepTimer:
    """Lightning callback: seconds per step of every epoch but the first."""

    def __init__(self) -> None:
        import lightning as L

        class Timer(L.Callback):
            def __init__(self) -> None:
                self.t0 = 0.0
                self.per_step: list[float] = []

            def on_train_epoch_start(self, trainer, module) -> None:
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                n = trainer.num_training_batches
                if batch_idx == n - 1 and trainer.current_epoch > 0:
                    self.per_step.append((time.perf_counter() - self.t0) / n)

        self.callback = Timer()


def _setup(store, train, batch_size: int):
    from mtaffect.models.base import Stage
    from mtaffect.models.losses import LossConfig, MTLLoss
    from mtaffect.models.registry import create_model
    from mtaffect.train.data import MTLDataModule
    from mtaffect.train.module import apply_stage

    model = create_model("emotinet", feature_dim=store.feature_dim, num_logits=store.num_logits)
    stage = Stage("au", ("au",), ("au_head",))
    apply_stage(model, stage)
    dm = MTLDataModule(store, train, None, inputs=model.inputs, temporal=False, batch_size=batch_size)
    dm.set_stage(stage.tasks)
    dm.load()
    a = dm.train_labels
    loss = MTLLoss.from_labels(LossConfig(), np.where(a.au_mask, a.au, -1), np.where(a.expr_mask, a.expr, -1))
    return model, stage, dm, loss


def bare_loop(store, train, batch_size: int, epochs: int, init: dict) -> list[float]:
    """Seconds per step of the plain loop, one value per epoch after the first."""
    import torch

    from mtaffect.train.data import loader
    from mtaffect.train.module import lr_lambda, make_optimizer

    model, stage, dm, loss = _setup(store, train, batch_size)
    model.load_state_dict(init)
    steps_per_epoch = dm.steps_per_epoch()
    opt = make_optimizer(model.param_groups(3e-3, 1e-4), 3e-3, 1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(steps_per_epoch // 2, steps_per_epoch * epochs, 0.01)
    )
    sampler = dm.train_sampler()
    data = loader(dm.train_set, sampler)
    model.train()
    per_step: list[float] = []
    for epoch in range(epochs):
        steps = 0
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in data:
            for key in model.inputs:
                batch[key] = batch[key].float()
            model.active_tasks = stage.tasks
            out = model(batch)
            model.active_tasks = None
            total, _ = loss(out, batch, stage.tasks)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            steps += 1
        if epoch > 0:
            per_step.append((time.perf_counter() - t0) / steps)
    return per_step


def _legacy_module():
    """``MTLModule`` with the per-step bookkeeping it had before (for the ``before`` column)."""
    import lightning as L
    import torch

    from mtaffect.train.module import MTLModule, lr_lambda

    class Legacy(MTLModule):
        transfer_batch_to_device = L.LightningModule.transfer_batch_to_device

        def training_step(self, batch, batch_idx):
            self.model.active_tasks = self.stage.tasks
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

        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(self.warmup_steps, self.total_steps, self.min_lr_ratio)
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Legacy


def lightning_loop(
    store, train, batch_size: int, epochs: int, init: dict, progress: bool, legacy: bool = False
) -> list[float]:
    """Seconds per step of ``MTLModule`` under the Trainer ``fit`` builds, per epoch after the first."""
    from mtaffect.train.config import config_from_dict
    from mtaffect.train.module import MTLModule
    from mtaffect.train.trainer import quiet_lightning, stage_trainer

    model, stage, dm, loss = _setup(store, train, batch_size)
    model.load_state_dict(init)
    steps = dm.steps_per_epoch()
    cfg = config_from_dict({"model": {"recipe": "emotinet"}, "trainer": {"progress": progress}})
    timer = _StepTimer().callback
    cls = _legacy_module() if legacy else MTLModule
    with tempfile.TemporaryDirectory() as logs, quiet_lightning():
        trainer = stage_trainer(cfg, epochs, Path(logs), "au", [timer], validate=False)
        if legacy and progress:  # the plain rich bar, redrawn every step
            from lightning.pytorch.callbacks import RichProgressBar

            bars = [i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, RichProgressBar)]
            trainer.callbacks[bars[0]] = RichProgressBar()
        module = cls(
            model,
            loss,
            stage,
            lr=3e-3,
            weight_decay=1e-4,
            warmup_steps=steps // 2,
            total_steps=steps * epochs,
        )
        trainer.fit(module, datamodule=dm)
    return timer.per_step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Lightning loop vs bare PyTorch loop, per step")
    ap.add_argument("--rows", type=int, default=32 * 1024)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-progress", action="store_true", help="Lightning without the progress bar")
    ap.add_argument("--no-before", action="store_true", help="skip the module as it was before")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import lightning as L
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    store, train, _ = open_with_labels(
        cached_store(args.out / f"bench_loop_{args.rows}", args.rows), args.rows
    )
    L.seed_everything(0, verbose=False)
    init = {k: v.clone() for k, v in _setup(store, train, args.batch_size)[0].state_dict().items()}
    runs: dict[str, list[float]] = {"bare": [], "lightning": [], "before": []}
    progress = not args.no_progress
    for _ in range(args.repeats):
        runs["bare"] += bare_loop(store, train, args.batch_size, args.epochs, init)
        runs["lightning"] += lightning_loop(store, train, args.batch_size, args.epochs, init, progress)
        if not args.no_before:
            runs["before"] += lightning_loop(store, train, args.batch_size, args.epochs, init, progress, True)
    result: dict = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "progress_bar": progress,
        "epochs_timed": len(runs["bare"]),
    }
    for name, times in runs.items():
        if times:
            result[f"{name}_ms_median"] = round(statistics.median(times) * 1e3, 3)
            result[f"{name}_ms_min"] = round(min(times) * 1e3, 3)
    for name in ("lightning", "before"):
        if runs[name]:
            result[f"{name}_ratio_median"] = round(result[f"{name}_ms_median"] / result["bare_ms_median"], 3)
            result[f"{name}_ratio_min"] = round(result[f"{name}_ms_min"] / result["bare_ms_min"], 3)
    result["load"] = round(os.getloadavg()[0], 2)
    print(
        f"emotinet AU head, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{result['epochs_timed']} epochs each (median / best): "
        f"bare PyTorch {result['bare_ms_median']:.2f} / {result['bare_ms_min']:.2f} ms per step",
        flush=True,
    )
    for name, label in (("lightning", "Lightning loop"), ("before", "Lightning loop before this change")):
        if runs[name]:
            print(
                f"  {label}: {result[f'{name}_ms_median']:.2f} / {result[f'{name}_ms_min']:.2f} ms per step, "
                f"ratio {result[f'{name}_ratio_median']:.2f} / {result[f'{name}_ratio_min']:.2f} "
                "(target <= 1.3)",
                flush=True,
            )
    print(f"  (load average {result['load']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
