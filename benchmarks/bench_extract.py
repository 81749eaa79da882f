"""Feature extraction throughput (fer-minixception, CPU) against its ceiling, the JPEG decode rate.

Measures on a synthetic set of 112x112 face JPEGs (generated once into ``--data``, then reused):
- the raw decode rate of the same files, single process: PIL open + decode to a full-size RGB array
  (``decode_per_s``, the ceiling), and with the extractor's own decoding (draft + luma + resize to 64);
- the backbone's inference rate alone on preprocessed batches;
- the pipeline alone (decode in workers, preprocess, float16 writes, progress records) with a no-op
  backbone of the same shapes;
- end-to-end ``extract()`` for a small grid of settings (decoding workers, inference threads, batch
  size), reporting the best, re-run on all images, as ``images_per_s``.

Targets: >= 1,000 images/s and >= 50% of the decode rate. Wall-clock rates vary with machine load;
each run also reports its CPU milliseconds per image (this process plus its decoding workers).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtaffect.features.base import Backbone, BackboneOutput
from mtaffect.features.decode import decode_image
from mtaffect.features.extract import collect_images, extract
from mtaffect.features.registry import create_backbone
from mtaffect.schema import CROPPED_DIR, TRAIN_ANNOTATIONS

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "bench_out" / "extract_data"


class NullBackbone(Backbone):
    """Same spec and output shapes as ``like``, (almost) no compute: isolates the pipeline's cost."""

    def __init__(self, like: Backbone) -> None:
        super().__init__()
        self.spec = like.spec
        self._pre = like.preprocess

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        return self._pre(images)

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        m = x.mean(dim=(1, 2, 3))[:, None]
        return BackboneOutput(
            features=m.expand(-1, self.spec.feature_dim), logits=m.expand(-1, self.spec.num_logits)
        )


def ensure_data(root: Path, videos: int, frames: int) -> Path:
    """Reuse a synthetic set in ``root`` or generate one (112x112 faces, official layout)."""
    if (root / TRAIN_ANNOTATIONS).is_file() and (root / CROPPED_DIR).is_dir():
        return root
    from mtaffect.data.synth import SynthConfig, generate

    t0 = time.perf_counter()
    summary = generate(root, SynthConfig(videos=videos, frames=frames, seed=0, image_size=112))
    print(f"generated {summary.images} images in {time.perf_counter() - t0:.1f}s into {root}")
    return root


def decode_rates(paths: list[str], size: int, colour: str) -> tuple[float, float]:
    """(full-size RGB decode, extractor decode) images/s, single process, best of 2 passes."""

    def full(p: str) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))

    rates = []
    for fn in (full, lambda p: decode_image(p, size, colour)):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            best = min(best, time.perf_counter() - t0)
        rates.append(len(paths) / best)
    return rates[0], rates[1]


def inference_rate(bb: Backbone, batch: int, threads: int, seconds: float = 3.0) -> float:
    """Forward passes alone on a preprocessed random batch (images/s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    grey = bb.spec.colour == "L"
    s = bb.spec.input_size
    pix = np.random.default_rng(0).integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
    if grey:
        pix[..., 1] = pix[..., 2] = pix[..., 0]
    x = bb.preprocess(pix)
    try:
        with torch.inference_mode():
            bb(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                bb(x)
                n += batch
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (decoding workers): steadier than wall time
    on a shared machine."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cache folder for the synthetic set")
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--frames", type=int, default=200, help="mean rows per video (20 x 200 ~ 4,100 images)")
    ap.add_argument("--backbone", default="fer-minixception")
    ap.add_argument("--sweep-images", type=int, default=2048, help="images per run of the settings sweep")
    ap.add_argument("--quick", action="store_true", help="one setting only (workers 1, threads 1, batch 64)")
    args = ap.parse_args(argv)

    root = ensure_data(args.data, args.videos, args.frames)
    names = collect_images(root)
    paths = [os.path.join(root, CROPPED_DIR, n) for n in names]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    plain = create_backbone(args.backbone)
    spec = plain.spec
    decode_full, decode_extractor = decode_rates(paths[:2000], spec.input_size, spec.colour)
    print(
        f"{len(names)} images; {cores} cores, load {load:.1f}; decode: full RGB {decode_full:,.0f}/s, "
        f"extractor ({spec.colour} {spec.input_size}px, draft) {decode_extractor:,.0f}/s"
    )

    # Oversubscribed settings (workers + threads > cores) are left out: they only lose on a busy machine.
    grid = (
        [(1, 1, 64)] if args.quick else [(0, 1, 64), (1, 1, 64), (0, cores, 64), (1, max(cores - 1, 1), 256)]
    )
    grid = list(dict.fromkeys(grid))
    sweep = names[: args.sweep_images]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:

        def run(bb: Backbone, label: str, workers: int, threads: int, batch: int, images: list[str]) -> dict:
            cpu0 = _cpu_seconds()
            res = extract(
                root,
                bb,
                Path(tmp) / "store",
                images=images,
                batch_size=batch,
                workers=workers,
                threads=threads,
                progress=False,
                overwrite=True,
            )
            cpu_ms = (_cpu_seconds() - cpu0) * 1000 / len(images)
            row = {
                "backbone": label,
                "workers": workers,
                "threads": threads,
                "batch_size": batch,
                "images": len(images),
                "images_per_s": round(res.images_per_s, 1),
                "cpu_ms_per_image": round(cpu_ms, 3),
            }
            print(f"  {row}", flush=True)
            return row

        print("pipeline alone (no-op backbone):")
        pipeline = run(NullBackbone(plain), "null", 1, 1, 64, names)
        print(f"sweep on {len(sweep)} images:")
        for workers, threads, batch in grid:
            runs.append(run(plain, args.backbone, workers, threads, batch, sweep))
        top = max(runs, key=lambda r: r["images_per_s"])
        print(f"best setting on all {len(names)} images:")
        best = run(plain, args.backbone, *[top[k] for k in ("workers", "threads", "batch_size")], names)
    infer = inference_rate(plain, best["batch_size"], best["threads"])
    ratio = best["images_per_s"] / decode_full
    print(
        f"best: {best['images_per_s']:,.0f} images/s ({best}); inference alone {infer:,.0f}/s; "
        f"pipeline alone {pipeline['images_per_s']:,.0f}/s; ratio to decode {ratio:.2f} "
        f"(targets: >= 1,000 images/s, >= 0.5)"
    )
    return {
        "name": "extract_fer",
        "images_per_s": best["images_per_s"],
        "decode_per_s": round(decode_full, 1),
        "ratio": round(ratio, 3),
        "decode_extractor_per_s": round(decode_extractor, 1),
        "inference_per_s": round(infer, 1),
        "pipeline_per_s": pipeline["images_per_s"],
        "best_setting": {k: best[k] for k in ("workers", "threads", "batch_size")},
        "sweep": runs,
        "images": len(names),
        "cores": cores,
        "load_average": round(load, 2),
    }


if __name__ == "__main__":
    main()
