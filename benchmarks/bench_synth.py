"""Speed of the synthetic s-Aff-Wild2 generator: ``generate`` at the default size and 4x (linear?).

Run: ``python benchmarks/bench_synth.py [--scale 4] [--workers 1]``. Generates into a temporary folder
(deleted afterwards) and prints images/s. Also times the renderer alone (render + JPEG encode, one
core, realistic AU intensities from the label process; target >= 1,000 images/s). Returns
``{"name": "synth", "images_per_s": ..., "default_seconds": ..., ...}``; ``*_cpu_*`` figures use
process CPU time, which stays meaningful on a shared machine (wall time is what a user waits).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mtaffect.data.synth import SynthConfig, generate, label_model, sample_video_labels
from mtaffect.data.synth_faces import FaceIdentity, render_jpeg


def _time_generate(config: SynthConfig, workers: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        summary = generate(Path(tmp) / "set", config, workers=workers)
        return time.perf_counter() - wall, time.process_time() - cpu, summary.images


def _time_render(n: int, seed: int = 0) -> tuple[float, float]:
    """(wall, cpu) images/s of render + JPEG encode over 10 identities."""
    rng = np.random.default_rng(seed)
    segments = [(c % 8, 40) for c in range(n // 40 + 1)]
    intensity = sample_video_labels(rng, n, segments, "val", label_model()).intensity
    identities = [FaceIdentity.sample(np.random.default_rng(seed + i)) for i in range(10)]
    for ident in identities:  # static layers are built once per identity (per video): not timed
        render_jpeg(intensity[0], ident, rng)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        render_jpeg(intensity[i], identities[i % len(identities)], rng)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, help="size of the second run, in default sets")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--render", type=int, default=2000, help="images for the renderer-only timing")
    args = parser.parse_args(argv)

    label_model()  # one-off calibration (~0.2 s per process), not part of the per-image cost
    base = SynthConfig()
    big = SynthConfig(videos=base.videos * args.scale, frames=base.frames, seed=base.seed)
    d_wall, d_cpu, d_images = _time_generate(base, args.workers)
    b_wall, b_cpu, b_images = _time_generate(big, args.workers)
    r_wall, r_cpu = _time_render(args.render)
    # linear scaling: time per image of the big run relative to the default run (1.0 = linear); the
    # CPU-time ratio is the one to trust on a shared machine
    scaling = (b_wall / b_images) / (d_wall / d_images)
    cpu_scaling = (b_cpu / b_images) / (d_cpu / d_images)
    print(
        f"synth: default {d_images} images in {d_wall:.2f} s ({d_images / d_wall:.0f} images/s, cpu "
        f"{d_images / d_cpu:.0f}/s); x{args.scale} {b_images} images in {b_wall:.2f} s "
        f"({b_images / b_wall:.0f} images/s, cpu {b_images / b_cpu:.0f}/s); per-image time ratio "
        f"{scaling:.2f} (cpu {cpu_scaling:.2f}); render+JPEG alone {r_wall:.0f} images/s "
        f"(cpu {r_cpu:.0f}/s); workers={args.workers}"
    )
    return {
        "name": "synth",
        "images_per_s": b_images / b_wall,
        "cpu_images_per_s": b_images / b_cpu,
        "default_seconds": d_wall,
        "default_images": d_images,
        "scaled_seconds": b_wall,
        "scaled_images": b_images,
        "scale": args.scale,
        "per_image_time_ratio": scaling,
        "per_image_cpu_ratio": cpu_scaling,
        "render_images_per_s": r_wall,
        "render_cpu_images_per_s": r_cpu,
        "workers": args.workers,
    }


if __name__ == "__main__":
    main()
