"""Token-store reader: seconds per training batch of 64 rows of 289 x 1,536 patch tokens (DINOv2 ViT-g).

A store of ``--rows`` rows of float16 tokens is written once (888 KB a row; ``bench_train.write_store``).
Batches of 64 random rows are read three ways:

- ``before``: the reader as it was (every batch copied to float32 on the host, then gathered again);
- ``main``: ``InputSource`` memory-mapped, the batch's distinct rows read once, in row order, as the
  store's float16 (no float32 host copy: the module casts on its device);
- ``workers_N``: the same through the training ``DataLoader`` with N worker processes that prefetch
  batches (what training uses for memory-mapped inputs; each batch then crosses to the training
  process through shared memory).

Each is measured with the store's pages evicted from the page cache first (``posix_fadvise
DONTNEED``: reads come from the disk, as for a 126 GB store that cannot stay cached) and warm.
``+cast`` adds the float32 cast on the CPU (on a GPU it runs on the device after the copy).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_reader.py     # target: >= 5x faster
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from bench_train import cached_store

TOKENS = (289, 1536)


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (the next reads come from the disk). Pages still mapped
    by a process cannot be dropped, so every measurement maps the store itself and lets go of it."""
    gc.collect()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def legacy_get(store, rows: np.ndarray) -> torch.Tensor:
    """The reader before this change: float32 copy of the unique rows, then a second gather."""
    uniq, inv = np.unique(rows, return_inverse=True)
    return torch.from_numpy(store.tokens(uniq))[torch.from_numpy(inv.reshape(-1))]


def batches(n: int, count: int, size: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size, replace=False) for _ in range(count)]


def measure(path: Path, how: str, ids: list[np.ndarray], workers: int, cast: bool) -> float:
    """Seconds per batch; the store is opened here, so nothing maps it while its pages are evicted."""
    from mtaffect.features.reader import InputSource
    from mtaffect.features.store import FeatureStore
    from mtaffect.train.data import UnitDataset, loader

    store = FeatureStore.open(path)
    if how == "before":
        t0 = time.perf_counter()
        for b in ids:
            legacy_get(store, b)
        return (time.perf_counter() - t0) / len(ids)
    source = InputSource(store, np.arange(len(store)), ("tokens",), in_memory=False)
    if how == "main":  # the dataset hands the reader each batch in row order
        t0 = time.perf_counter()
        for b in ids:
            t = source.get(np.sort(b))["tokens"]
            if cast:
                t.float()
        return (time.perf_counter() - t0) / len(ids)

    class Fixed(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(ids)

        def __len__(self):
            return len(ids)

    ds = UnitDataset(source, np.arange(len(store)))
    t0 = time.perf_counter()  # includes starting the workers and their first batches
    for batch in loader(ds, Fixed(), workers=workers):  # type: ignore[arg-type]
        if cast:
            batch["tokens"].float()
    return (time.perf_counter() - t0) / len(ids)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="token-store reader speed")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    path = cached_store(args.out / f"bench_reader_tokens_{args.rows}", args.rows, TOKENS[1], 0, TOKENS)
    ids = batches(args.rows, args.batches, args.batch)
    result: dict = {"rows": args.rows, "batch": args.batch, "tokens": list(TOKENS), "workers": args.workers}
    ways = [("before", False), ("main", False), ("main", True), ("workers", False), ("workers", True)]
    for cache in ("cold", "warm"):
        for how, cast in ways:
            times = []
            for _ in range(2):
                if cache == "cold":
                    evict(path / "tokens.npy")
                else:
                    measure(path, how, ids[:3], args.workers, False)  # warm the cache
                times.append(measure(path, how, ids, args.workers, cast))
            key = (
                f"{cache}/{how}"
                + (f"_{args.workers}" if how == "workers" else "")
                + ("+cast" if cast else "")
            )
            result[key] = round(statistics.median(times), 4)
            print(f"{key:28s} {result[key]:.4f} s/batch", flush=True)
    for cache in ("cold", "warm"):
        best = min(
            v for k, v in result.items() if k.startswith(cache) and "before" not in k and "+cast" not in k
        )
        result[f"{cache}/speedup"] = round(result[f"{cache}/before"] / best, 1)
        print(f"{cache}: {result[f'{cache}/speedup']}x faster than before (target >= 5x)", flush=True)
    result["load"] = round(os.getloadavg()[0], 2)
    print(f"(load average {result['load']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
