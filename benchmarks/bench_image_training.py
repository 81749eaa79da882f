"""Training from images on CPU: is the loader (decode + augment) or the model step the bottleneck?

For each backbone in the loop, with ``data.workers`` 0, 1 and 2, on a synthetic set's face crops:

- **loader**: the :class:`~mtaffect.train.images.data.ImageDataModule`'s training batches (JPEG decode in
  the workers, then uint8 -> float, augmentation and normalisation in this process, as on a device),
  without the model: the most images per second the pipeline can supply;
- **model step**: forward + loss + backward + AdamW step on ready batches (no loading): the most the
  model can consume;
- **train step**: both together, loader feeding the model (what an epoch runs at).

Backbones: ``fer-minixception`` fine-tuned (configs/finetune_fer.yaml: its augmentation, recipe 4's joint
heads), and a small random-init ViT (ViT-Ti/16 shape: width 192, 12 blocks, 3 heads) fine-tuned at
112 px (the crop size) with the liu2024 augmentation and recipe 4's joint heads.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_image_training.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_image_training.py --batches 6 --only vit
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_recipes import synth_set
from recipe_configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
VIT_TI = {
    "hidden_size": 192,
    "num_hidden_layers": 12,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "image_size": 112,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
}


def prepare(out: Path, videos: int, frames: int) -> tuple[Path, Path]:
    """The synthetic set and a random-init ViT-Ti folder, built once under ``out``."""
    import torch
    import transformers

    root = synth_set(out, videos, frames, seed=0)
    vit = out / "vit_ti_112_random"
    if not (vit / "model.safetensors").is_file():
        torch.manual_seed(0)
        transformers.ViTModel(transformers.ViTConfig(**VIT_TI)).save_pretrained(vit)
        proc = {
            "do_resize": True,
            "size": {"height": 112, "width": 112},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
        (vit / "preprocessor_config.json").write_text(json.dumps(proc))
    return root, vit


def configs(vit: Path) -> dict:
    from mtaffect.train.config import load_config

    fer = load_config(CONFIG_DIR / "finetune_fer.yaml", ["trainer.progress=false"])
    vit_cfg = load_config(
        CONFIG_DIR / "finetune_fer.yaml",
        [
            f"backbone.name=hf:{vit}",
            "backbone.lr=0.0001",
            "augment.preset=liu2024",
            "augment.ops={}",
            "data.batch_size=32",
            "trainer.progress=false",
        ],
    )
    return {"fer-minixception finetune": fer, "ViT-Ti/16 112px finetune": vit_cfg}


def _batches(dm, n: int):
    """``n`` training batches as the model sees them (decoded, augmented, normalised)."""
    loader = dm.train_dataloader()
    for batch in itertools.islice(itertools.cycle(loader), n):
        yield dm.device_batch(batch, training=True)


class _Step:
    """One optimiser step of the model's first stage: forward, masked multi-task loss, backward, AdamW."""

    def __init__(self, model, cfg) -> None:
        import torch

        from mtaffect.models.losses import MTLLoss
        from mtaffect.train.module import apply_stage

        self.model, self.stage = model, model.stages()[0]
        apply_stage(model, self.stage)
        model.train()
        self.loss = MTLLoss()
        self.opt = torch.optim.AdamW(model.param_groups(cfg.optim.lr, cfg.optim.weight_decay))

    def __call__(self, batch: dict) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.loss(self.model(batch), batch, self.stage.tasks)
        loss.backward()
        self.opt.step()


def measure(name: str, cfg, root: Path, workers: list[int], batches: int) -> dict:
    from mtaffect.data.annotations import load_split
    from mtaffect.train.build import build_training

    train = load_split(root, "train")
    rows: dict = {"workers": {}}
    for w in workers:
        cfg.data.workers = w
        t = build_training(cfg, root, train, None)
        dm, step = t.datamodule, _Step(t.model, cfg)
        bs = dm.batch_size
        list(_batches(dm, 2))  # warm up (worker start, first kornia call)
        t0 = time.perf_counter()
        ready = list(_batches(dm, batches))
        loader_s = time.perf_counter() - t0
        if "model" not in rows:  # the model step does not depend on the workers
            step(ready[0])
            t0 = time.perf_counter()
            for b in ready:
                step(b)
            rows["model"] = bs * len(ready) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in _batches(dm, batches):
            step(b)
        train_s = time.perf_counter() - t0
        rows["workers"][w] = r = {"loader": bs * batches / loader_s, "train": bs * batches / train_s}
        print(
            f"{name:28s} workers {w}: loader {r['loader']:7.0f} img/s   model step "
            f"{rows['model']:7.0f} img/s   train step {r['train']:7.0f} img/s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--batches", type=int, default=10, help="batches timed per measurement")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--only", choices=["fer", "vit"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0))))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root, vit = prepare(args.out, args.videos, args.frames)
    result: dict = {"threads": torch.get_num_threads(), "data": str(root), "backbones": {}}
    for name, cfg in configs(vit).items():
        if args.only and not name.lower().startswith(args.only):
            continue
        result["backbones"][name] = measure(name, cfg, root, args.workers, args.batches)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
