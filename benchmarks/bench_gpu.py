"""GPU figures in one run (under 8 minutes on one H100): random-init models of the real sizes, no downloads.

Sections (each recorded on its own: one that fails is an ``error`` in the JSON and the rest still run):

- ``dinov2_giant``: DINOv2 ViT-g/14 (hidden 1536, 40 layers, 24 heads, SwiGLU) in bfloat16 at 238 px
  (289 tokens), batch 64: the frozen backbone's forward on the fly (images/s, peak memory), and recipe 1's
  training step on it (``configs/queries_gcn.yaml``: frozen backbone, queries-gcn head, bf16-mixed);
- ``vit_b16_finetune``: ViT-B/16 (768/12/12) fine-tuned with recipe 3's settings
  (``configs/progressive_published.yaml``: its task model, AdamW at its lr and weight decay, batch 50,
  224 px, bf16-mixed as training on a GPU runs), with and without gradient checkpointing;
- ``bf16_agreement``: every recipe of ``configs/*.yaml`` (``create_model`` with the config's hparams) on
  one random batch of its real input sizes, fp32 against bf16 autocast (bf16-mixed training and
  validation): largest output differences, AU decision and EXPR argmax agreement;
- ``token_reader``: a temporary token store (DINOv2-g tokens, 289 x 1,536 float16 a row) read by the
  training reader (``InputSource``, memory-mapped) and by the training ``DataLoader`` with workers, each
  batch copied to the device and cast to float32 there: rows/s, cold (page cache dropped) and warm;
- ``onnxruntime``: the default model exported (``export_model("default")``) and run by ``Runtime`` with
  the CUDA provider and the CPU provider (faces/s per batch size, largest difference between the two);
  the CUDA part is skipped, with the reason, where onnxruntime has no CUDA provider (onnxruntime-gpu).

``--smoke`` runs the same code on the CPU with tiny models and sizes (seconds; a test runs it). Without a
CUDA device and without ``--smoke`` (or ``--device cpu``) nothing runs: ``run_all.py`` stays CPU-cheap.

    .venv/bin/python benchmarks/bench_gpu.py         # on a CUDA machine -> bench_out/bench_gpu.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_gpu.py --smoke --json /tmp/gpu_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-init models only: never reach the hub

import numpy as np
import torch
from bench_train import write_store
from recipe_configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("dinov2_giant", "vit_b16_finetune", "bf16_agreement", "token_reader", "onnxruntime")

#: facebook/dinov2-giant's architecture, by hand (no download): SwiGLU FFN (4096 wide), layer scale 1,
#: position embeddings trained at 518 px and interpolated to the 238 px recipe 1 runs at.
DINOV2_GIANT = {
    "hidden_size": 1536,
    "num_hidden_layers": 40,
    "num_attention_heads": 24,
    "mlp_ratio": 4,
    "use_swiglu_ffn": True,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
}
#: ViT-B/16 (the shape of recipe 3's MAE ViT-B/16 backbone).
VIT_B16 = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "patch_size": 16,
    "image_size": 224,
    "layer_norm_eps": 1e-6,
}


class Sizes(NamedTuple):
    """Model and batch sizes of one run: :data:`FULL` (the real ones) or :data:`SMOKE` (CPU seconds).
    (A NamedTuple, not a dataclass: run_all and the tests load this file without registering it.)"""

    dino: dict
    dino_image: int
    dino_batch: int
    vit: dict
    vit_batch: int | None  # None: the config's data.batch_size (recipe 3: 50)
    warmup: int
    iters: int
    #: recipe -> (feature_dim, num_logits, token_shape): the inputs each recipe is built for
    recipes: dict
    agree_batch: int | None  # frames; None: each config's data.batch_size
    reader_rows: int
    reader_tokens: tuple[int, int]
    reader_batch: int
    reader_batches: int
    reader_workers: int
    onnx_batches: tuple[int, ...]
    onnx_check_faces: int = 8
    #: collect garbage between parts (memory freed, stores unmapped): ~1 s a time with transformers
    #: and dynamo loaded, so not in the smoke run
    collect: bool = True


def _recipes(tokens: tuple[int, int], feats: int, small: int) -> dict:
    """Recipe 1 on DINOv2-g tokens (features: CLS + mean, 2 x 1536), recipe 2 on EfficientNet-B0
    features + its 8 EXPR logits (1,288, as recipe 2's peer), recipe 4 on EfficientNet-B0 features + 10
    logits (8 EXPR + VA, as bench_train), recipe 3 on ViT-B/16 features (768; its published variant
    fuses three more of them, exported by the task models)."""
    return {
        "queries-gcn": (2 * tokens[1], 0, tokens),
        "au-graph": (feats, 8, None),
        "progressive": (small, 0, None),
        "emotinet": (feats, 10, None),
    }


def recipe_configs() -> dict[str, Path]:
    """Every ``configs/*.yaml`` that names a recipe, by file stem (variants included: each is a
    differently built model)."""
    found = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if re.search(r"^\s+recipe:\s*\S", path.read_text(encoding="utf-8"), re.MULTILINE):
            found[path.stem] = path
    return found


FULL = Sizes(
    dino=DINOV2_GIANT,
    dino_image=238,
    dino_batch=64,
    vit=VIT_B16,
    vit_batch=None,
    warmup=3,
    iters=10,
    recipes=_recipes((289, 1536), 1280, 768),
    agree_batch=None,
    reader_rows=2048,
    reader_tokens=(289, 1536),
    reader_batch=64,
    reader_batches=24,
    reader_workers=4,
    onnx_batches=(1, 64, 256),
)
SMOKE = Sizes(
    dino={
        **DINOV2_GIANT,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
    },
    dino_image=28,
    dino_batch=2,
    vit={
        **VIT_B16,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
    },
    vit_batch=2,
    warmup=1,
    iters=1,
    recipes=_recipes((4, 16), 16, 16),
    agree_batch=4,
    reader_rows=32,
    reader_tokens=(4, 16),
    reader_batch=4,
    reader_batches=4,
    reader_workers=1,
    onnx_batches=(1, 4),
    onnx_check_faces=1,
    collect=False,
)


# ---- shared helpers -----------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    """What every section records: the device and the versions its numbers depend on."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    cudnn = torch.backends.cudnn.version() if cuda else None
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Mean seconds per call after ``warmup`` calls (kernels chosen, allocator grown), device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict that gets ``peak_mem_gb``: the most allocated on the device inside the block (None
    on the CPU: no per-block peak there)."""
    out: dict = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    out["peak_mem_gb"] = (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
    )


def allocated_gb(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16-mixed as Lightning runs it on a GPU (``_precision``: bf16-mixed where supported)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def random_labels(n: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Labels of every task for ``n`` rows, none missing (the loss then costs what a full batch does)."""
    return {
        "au": (torch.rand(n, 12, generator=gen) < 0.3).float().to(device),
        "au_mask": torch.ones(n, 12, dtype=torch.bool, device=device),
        "expr": torch.randint(0, 8, (n,), generator=gen).to(device),
        "expr_mask": torch.ones(n, dtype=torch.bool, device=device),
        "va": (torch.rand(n, 2, generator=gen) * 2 - 1).to(device),
        "va_mask": torch.ones(n, 2, dtype=torch.bool, device=device),
    }


def make_optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The training loop's AdamW over the model's groups (mtaffect.train.module)."""
    from mtaffect.train.module import make_optimizer as make

    return make(model.param_groups(lr, weight_decay), lr, weight_decay)


class TrainStep:
    """One optimiser step of a model's first stage: forward + multi-task loss under bf16 autocast,
    backward, AdamW (what a training batch costs, data loading excluded)."""

    def __init__(self, model: Any, lr: float, weight_decay: float, device: torch.device) -> None:
        from mtaffect.models.losses import MTLLoss
        from mtaffect.train.module import apply_stage

        self.model, self.stage, self.device = model, model.stages()[0], device
        model.train()
        apply_stage(model, self.stage)
        self.loss = MTLLoss().to(device)
        self.opt = make_optimizer(model, lr, weight_decay)

    def __call__(self, batch: dict) -> None:
        self.opt.zero_grad(set_to_none=True)
        with bf16_autocast(self.device):
            loss, _ = self.loss(self.model(batch), batch, self.stage.tasks)
        loss.backward()
        self.opt.step()


def per_s(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def time_steps(step: TrainStep, batch: dict, s: Sizes) -> dict:
    """images/s, seconds per batch and peak device memory of training steps on one ready batch."""
    with peak_memory(step.device) as mem:
        sec = seconds_per_call(lambda: step(batch), step.device, s.warmup, s.iters)
    n = len(batch["pixels"])
    return {"images_per_s": per_s(n, sec), "seconds_per_batch": round(sec, 4), **mem}


# ---- sections ---------------------------------------------------------------------------------------
def bench_dinov2(s: Sizes, device: torch.device, work: Path) -> dict:
    """DINOv2-g in bf16 on the fly: the backbone forward, then recipe 1's step (frozen backbone + head)."""
    from mtaffect.features.dinov2 import create_dinov2
    from mtaffect.models.image_model import ImageMTLModel
    from mtaffect.train.config import load_config
    from mtaffect.train.training import build_model

    with torch.device(device):  # built where it runs: 1.1 B parameters initialise much faster there
        backbone = create_dinov2("giant", config=dict(s.dino), image_size=s.dino_image, dtype="bfloat16")
    backbone.to(device)
    b, size = s.dino_batch, s.dino_image
    out: dict = {
        "dtype": "bfloat16",
        "batch": b,
        "image_size": size,
        "tokens": list(backbone.spec.token_shape or ()),
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "weights_gb": allocated_gb(device),
    }
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(b, 3, size, size, generator=gen).to(device)

    def forward() -> None:
        with torch.inference_mode():
            backbone(pixels, tokens=True)

    with peak_memory(device) as mem:
        sec = seconds_per_call(forward, device, s.warmup, s.iters)
    out["forward"] = {"images_per_s": per_s(b, sec), "seconds_per_batch": round(sec, 4), **mem}

    cfg = load_config(CONFIG_DIR / "queries_gcn.yaml", ["trainer.progress=false"])
    head = build_model(cfg, backbone.spec)
    model = ImageMTLModel(backbone, head, mode="frozen").to(device)
    step = TrainStep(model, cfg.optim.lr, cfg.optim.weight_decay, device)
    batch = {"pixels": pixels, **random_labels(b, device, gen)}
    out["recipe1_train_step"] = {
        **time_steps(step, batch, s),
        "precision": "backbone bfloat16 (frozen), head bf16-mixed",
        "config": "configs/queries_gcn.yaml",
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "lr": cfg.optim.lr,
    }
    return out


def bench_vit(s: Sizes, device: torch.device, work: Path) -> dict:
    """ViT-B/16 + recipe 3's task model, fine-tuned with the published settings; checkpointing off/on."""
    import transformers

    from mtaffect.models.image_model import ImageMTLModel
    from mtaffect.train.config import load_config
    from mtaffect.train.images.build import build_backbone
    from mtaffect.train.training import build_model

    transformers.utils.logging.disable_progress_bar()  # no save/load bars in the output
    out: dict = {"dtype": "bf16-mixed", "config": "configs/progressive_published.yaml (its task model)"}
    with tempfile.TemporaryDirectory(dir=work, prefix="bench_gpu_vit") as tmp:
        folder = Path(tmp) / "vit_b16_random"
        torch.manual_seed(0)
        transformers.ViTModel(transformers.ViTConfig(**s.vit)).save_pretrained(str(folder))
        over = [
            f"backbone.name=hf:{folder}",
            f"backbone.image_size={s.vit['image_size']}",
            "trainer.progress=false",
        ]
        cfg = load_config(CONFIG_DIR / "progressive_published.yaml", over)
        cfg.model.hparams.update(fusion_tasks=[], temporal="none")  # pipeline.task_defaults: no task inputs
        b = s.vit_batch or cfg.data.batch_size
        size = cfg.backbone.image_size
        bb_cfg = cfg.backbone
        out.update(
            batch=b,
            image_size=size,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            backbone_lr=bb_cfg.lr,
            backbone_weight_decay=bb_cfg.weight_decay,
        )
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(b, 3, size, size, generator=gen).to(device)
        batch = {"pixels": pixels, **random_labels(b, device, gen)}
        for ckpt in (False, True):
            backbone = build_backbone(cfg)
            head = build_model(cfg, backbone.spec)
            model = ImageMTLModel(
                backbone,
                head,
                mode=bb_cfg.mode,
                frozen_blocks=bb_cfg.frozen_blocks,
                lr=bb_cfg.lr,
                weight_decay=bb_cfg.weight_decay,
                layer_decay=bb_cfg.layer_decay,
                grad_checkpointing=ckpt,
            ).to(device)
            key = "grad_checkpointing" if ckpt else "no_checkpointing"
            out[key] = time_steps(TrainStep(model, cfg.optim.lr, cfg.optim.weight_decay, device), batch, s)
            out[key]["parameters"] = sum(p.numel() for p in model.parameters())
            del model, backbone, head
            free(device, s)
    return out


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """fp32 outputs ``a`` against bf16 ``b``: largest differences and the decisions that change."""
    au32, au16 = a["au"].float(), b["au"].float()
    ex32, ex16 = a["expr"].float(), b["expr"].float()
    return {
        "au_max_abs_logit_diff": float((au32 - au16).abs().max()),
        "au_decision_agreement": float(((au32 > 0) == (au16 > 0)).float().mean()),
        "expr_max_abs_logit_diff": float((ex32 - ex16).abs().max()),
        "expr_argmax_agreement": float((ex32.argmax(-1) == ex16.argmax(-1)).float().mean()),
        "va_max_abs_diff": float((a["va"].float() - b["va"].float()).abs().max()),
    }


def bench_agreement(s: Sizes, device: torch.device, work: Path) -> dict:
    """Each recipe on one random batch of its inputs: eval mode, fp32 vs bf16 autocast. One recipe that
    fails is recorded as an error there; the others still run."""
    from mtaffect.train.config import load_config
    from mtaffect.train.training import build_model

    out: dict = {"dtype": "float32 vs bf16 autocast", "recipes": {}}
    for name, path in recipe_configs().items():
        try:
            cfg = load_config(path, ["trainer.progress=false"])
            if cfg.model.recipe not in s.recipes:
                raise ValueError(f"no input sizes for recipe {cfg.model.recipe!r}: add them to _recipes()")
            feats, logits, tokens = s.recipes[cfg.model.recipe]
            sizes = SimpleNamespace(feature_dim=feats, num_logits=logits, token_shape=tokens)
            hp = cfg.model.hparams
            fused = hp.get("fusion_tasks", []) if hp.get("variant") == "published" else []
            dims = {f"features@{t}": feats for t in fused}  # the task models' exported features
            torch.manual_seed(0)
            model = build_model(cfg, sizes, dims or None).to(device).eval()
            frames = s.agree_batch or cfg.data.batch_size
            window = cfg.data.window if model.temporal else None
            lead = (max(1, frames // window), window) if window else (frames,)
            gen = torch.Generator().manual_seed(1)
            shapes = {"features": (feats,), "logits": (logits,), "tokens": tuple(tokens or ())}
            shapes.update({k: (v,) for k, v in dims.items()})
            batch = {i: torch.randn(*lead, *shapes[i], generator=gen).to(device) for i in model.inputs}
            with torch.no_grad():
                ref = model(batch)
                with bf16_autocast(device):
                    low = model(batch)
            out["recipes"][name] = {
                "recipe": cfg.model.recipe,
                "batch": list(lead),
                "inputs": {k: list(v.shape) for k, v in batch.items()},
                **_agreement(ref, low),
            }
            del model, batch, ref, low
        except Exception as exc:  # recorded; the next recipe still runs
            out["recipes"][name] = error_record(exc)
        free(device, s)
    return out


class _Fixed(torch.utils.data.Sampler):
    """The batches of row ids given, in order (the loader's sampler, without shuffling)."""

    def __init__(self, ids: list[np.ndarray]) -> None:
        self.ids = ids

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def bench_reader(s: Sizes, device: torch.device, work: Path) -> dict:
    """The token store read batch by batch into the device: direct (the reader alone) and through the
    training DataLoader with workers (pinned memory on a GPU), cold and warm page cache."""
    from bench_reader import batches, evict

    from mtaffect.features.reader import InputSource
    from mtaffect.features.store import FeatureStore
    from mtaffect.train.data import UnitDataset, loader

    cuda = device.type == "cuda"
    n, b = s.reader_rows, s.reader_batch
    row_bytes = 2 * int(np.prod(s.reader_tokens))
    out: dict = {
        "dtype": "float16 store -> float32 on the device",
        "batch": b,
        "rows": n,
        "tokens": list(s.reader_tokens),
        "row_bytes": row_bytes,
        "workers": s.reader_workers,
    }
    with tempfile.TemporaryDirectory(dir=work, prefix="bench_gpu_store") as tmp:
        path = Path(tmp) / "tokens"
        t0 = time.perf_counter()
        write_store(path, n, 2 * s.reader_tokens[1], 0, s.reader_tokens)
        out["write_seconds"] = round(time.perf_counter() - t0, 2)
        ids = batches(n, s.reader_batches, b)

        def direct() -> None:
            source = InputSource(FeatureStore.open(path), np.arange(n), ("tokens",), in_memory=False)
            for rows in ids:
                source.get(np.sort(rows))["tokens"].to(device).float()

        def workers() -> None:
            source = InputSource(FeatureStore.open(path), np.arange(n), ("tokens",), in_memory=False)
            ds = UnitDataset(source, np.arange(n))
            for batch in loader(ds, _Fixed(ids), workers=s.reader_workers, pin_memory=cuda):  # type: ignore[arg-type]
                batch["tokens"].to(device, non_blocking=True).float()

        rows_read = len(ids) * b
        for cache in ("cold", "warm"):
            for how, fn in (("direct", direct), (f"workers_{s.reader_workers}", workers)):
                if cache == "cold":
                    if s.collect:  # no store map left, so that its pages can be dropped
                        gc.collect()
                    evict(path / "tokens.npy")
                else:
                    fn()  # the whole store's pages in the cache
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                sec = time.perf_counter() - t0
                gb_s = round(rows_read * row_bytes / 2**30 / sec, 4)
                out[f"{cache}/{how}"] = {"rows_per_s": per_s(rows_read, sec), "gb_per_s": gb_s}
    if cuda:  # the copy alone, from pinned memory: the ceiling of any reader
        host = torch.empty(b, *s.reader_tokens, dtype=torch.float16).pin_memory()
        sec = seconds_per_call(lambda: host.to(device, non_blocking=True), device, 2, 10)
        out["pinned_copy_gb_per_s"] = round(b * row_bytes / 2**30 / sec, 3)
    return out


def bench_onnx(s: Sizes, device: torch.device, work: Path) -> dict:
    """The default model's export run by onnxruntime: CUDA provider vs CPU provider on the same faces."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install 'mtaffect[export]')"}
    from mtaffect.export.exporter import export_model
    from mtaffect.runtime.engine import Runtime

    available = ort.get_available_providers()
    out: dict = {
        "dtype": "float32",
        "onnxruntime": ort.__version__,
        "available_providers": available,
        "batches": list(s.onnx_batches),
    }
    runs = {"cpu": ["CPUExecutionProvider"]}
    if "CUDAExecutionProvider" in available:
        runs["cuda"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        out["cuda"] = {
            "skipped": "onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu "
            "(matching the CUDA version) in place of onnxruntime"
        }
    with tempfile.TemporaryDirectory(dir=work, prefix="bench_gpu_onnx") as tmp:
        folder = Path(tmp) / "default"
        t0 = time.perf_counter()
        export_model("default", folder, detector=False, check_faces=s.onnx_check_faces)
        out["export_seconds"] = round(time.perf_counter() - t0, 2)
        results = {}
        for name, providers in runs.items():
            try:
                rt = Runtime(folder, providers=providers)
                m = rt.model
                out["face_size"], out["channels"] = m.size, m.channels
                faces = np.random.default_rng(0).integers(
                    0, 256, (max(s.onnx_batches), m.size, m.size, m.channels), dtype=np.uint8
                )
                row: dict = {"providers_used": m._face.get_providers(), "faces_per_s": {}}
                for b in s.onnx_batches:
                    sec = seconds_per_call(lambda: m.run(faces[:b]), device, s.warmup, s.iters)  # noqa: B023
                    row["faces_per_s"][str(b)] = per_s(b, sec)
                results[name] = m.run(faces)[0]
                out[name] = row
            except Exception as exc:  # the CPU figures stand without it
                out[name] = error_record(exc)
    if len(results) == 2:
        a, c = results["cpu"], results["cuda"]
        out["cuda_vs_cpu_max_abs_diff"] = {
            "expr_probs": float(np.abs(a.expr_probs - c.expr_probs).max()),
            "au_probs": float(np.abs(a.au_probs - c.au_probs).max()),
            "va": float(np.abs(a.va - c.va).max()),
        }
    return out


BENCHES: dict[str, Callable[[Sizes, torch.device, Path], dict]] = {
    "dinov2_giant": bench_dinov2,
    "vit_b16_finetune": bench_vit,
    "bf16_agreement": bench_agreement,
    "token_reader": bench_reader,
    "onnxruntime": bench_onnx,
}


def error_record(exc: BaseException) -> dict:
    """A failure as the JSON records it: the error and where it came from (the last frames)."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": "".join(tb)[-3000:]}


def free(device: torch.device, s: Sizes) -> None:
    """Drop what a section left, so the next one's peak memory is its own."""
    if s.collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_section(name: str, s: Sizes, device: torch.device, work: Path, env: dict) -> dict:
    """One section, timed; an exception (out of memory included) becomes its ``error``."""
    t0 = time.perf_counter()
    try:
        result = BENCHES[name](s, device, work)
    except Exception as exc:  # recorded; the other sections still run
        result = error_record(exc)
    free(device, s)
    return {**env, **result, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU (seconds)")
    ap.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    ap.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", type=Path, default=REPO / "bench_out", help="scratch folder (temporary files)")
    ap.add_argument("--json", type=Path, default=None, help="results (default: OUT/bench_gpu[_smoke].json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not args.smoke and args.device is None:
        reason = "no CUDA device: run it on a GPU machine, or --smoke (tiny, CPU), or --device cpu (slow)"
        print(f"bench_gpu skipped: {reason}")
        return {"skipped": reason}
    sizes = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    result: dict = {"smoke": args.smoke, **env, "python": platform.python_version(), "sections": {}}
    t0 = time.perf_counter()
    for name in args.sections:
        print(f"== {name}", flush=True)
        section = run_section(name, sizes, device, args.out, env)
        result["sections"][name] = section
        print(json.dumps({k: v for k, v in section.items() if k not in env and k != "traceback"}), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    path = args.json or args.out / ("bench_gpu_smoke.json" if args.smoke else "bench_gpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    failed = [k for k, v in result["sections"].items() if "error" in v]
    print(f"wrote {path} in {result['seconds']} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return result


if __name__ == "__main__":
    main()
