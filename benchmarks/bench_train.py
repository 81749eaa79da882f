"""Training speed: recipe 4 (emotinet heads) for 20 epochs on 142,000 rows x 1,290 inputs, and every
recipe's time per epoch at that size (recipe 1 on a reduced token set on CPU).

Random features are fine for speed: a store of 142,000 training + 14,200 validation rows with 1,280
features + 10 logits (float16, the store's format) is written once under bench_out/, with random
labels (20% missing per task). Training goes through the real path: ``fit`` (Lightning, the in-memory
input source, validation with the official metric every epoch).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_train.py            # target: < 60 s
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_train.py --per-recipe
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from recipe_configs import config_path

REPO = Path(__file__).resolve().parents[1]


def write_store(
    path: Path, n: int, dim: int, logits: int, tokens: tuple[int, int] | None, seed: int = 0
) -> None:
    """A finished feature store in the documented format (see mtaffect.features.store), random values."""
    from mtaffect.persist import FEATURE_STORE

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, tuple] = {"features": (n, dim)}
    if logits:
        arrays["logits"] = (n, logits)
    if tokens:
        arrays["tokens"] = (n, *tokens)
    for name, shape in arrays.items():
        mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float16, shape=shape)
        step = max(1, 2**24 // int(np.prod(shape[1:])))  # rows per chunk: ~64 MB of float32 at a time
        for s in range(0, n, step):
            e = min(n, s + step)
            mm[s:e] = rng.standard_normal((e - s, *shape[1:]), dtype=np.float32)
        mm.flush()
        del mm
    np.save(tmp / "valid.npy", np.ones(n, dtype=bool))
    videos = 400
    names = [f"vid{i % videos:03d}/{i // videos + 1:05d}.jpg" for i in range(n)]
    (tmp / "images.txt").write_text("".join(f"{x}\n" for x in names), encoding="utf-8")
    (tmp / "failed.csv").write_text("image,reason\n")
    meta = {
        "format": FEATURE_STORE.name,
        "format_version": 1,
        "backbone": "random",
        "spec": {"name": "random"},
        "fingerprint": "random0",
        "dtype": "float16",
        "arrays": {**{k: list(v) for k, v in arrays.items()}, "valid": [n]},
        "counts": {"images": n, "valid": n, "failed": 0},
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.rename(tmp, path)


def random_labels(images: list[str], seed: int = 1, missing: float = 0.2):
    import pandas as pd

    from mtaffect.data.annotations import LabelTable
    from mtaffect.schema import AU_NAMES

    rng = np.random.default_rng(seed)
    n = len(images)
    va = rng.uniform(-1, 1, (n, 2)).round(3)
    va[rng.random(n) < missing] = -5
    expr = rng.integers(0, 8, n)
    expr[rng.random(n) < missing] = -1
    aus = (rng.random((n, 12)) < 0.3).astype(np.int64)
    aus[rng.random(n) < missing] = -1
    df = pd.DataFrame({"image": images, "valence": va[:, 0], "arousal": va[:, 1], "expression": expr})
    for j, au in enumerate(AU_NAMES):
        df[au] = aus[:, j]
    return LabelTable.from_frame(df)


def cached_store(
    path: Path, n: int, dim: int = 1280, logits: int = 10, tokens: tuple[int, int] | None = None
) -> Path:
    """:func:`write_store` once: a store already at ``path`` (its meta.json written) is reused."""
    if not (path / "meta.json").is_file():
        write_store(path, n, dim, logits, tokens)
    return path


def open_with_labels(path: str | Path, n_train: int):
    """(store, train, val): the store at ``path`` with :func:`random_labels` for its images, the first
    ``n_train`` rows for training and the rest for validation."""
    from mtaffect.features.store import FeatureStore

    st = FeatureStore.open(path)
    labels = random_labels(st.images.tolist())
    return st, labels.subset(np.arange(n_train)), labels.subset(np.arange(n_train, len(st)))


def prepare(out: Path, n_train: int, n_val: int, tokens: tuple[int, int] | None, tag: str):
    store = cached_store(out / f"bench_train_{tag}_{n_train}_{n_val}", n_train + n_val, tokens=tokens)
    return open_with_labels(store, n_train)


def run(recipe: str, st, train, val, overrides: list[str]) -> dict:
    from mtaffect.train.config import load_config
    from mtaffect.train.fit import fit

    cfg = load_config(config_path(recipe), ["trainer.progress=false", "trainer.patience=0", *overrides])
    t0 = time.perf_counter()
    res = fit(cfg, st, train, val, None, log=None)
    seconds = time.perf_counter() - t0
    epochs = len(res.history)  # epochs over all stages
    return {
        "seconds": seconds,
        "epochs_total": epochs,
        "stages": len({h["stage"] for h in res.history}),
        "seconds_per_epoch": seconds / max(epochs, 1),
        "P": res.P,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="training speed benchmark")
    ap.add_argument("--rows", type=int, default=142_000)
    ap.add_argument("--val-rows", type=int, default=14_200)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--per-recipe", action="store_true", help="also time one epoch of every recipe")
    ap.add_argument("--token-rows", type=int, default=14_200, help="recipe 1 rows on CPU (tokens 16 x 128)")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    result: dict = {
        "rows": args.rows,
        "val_rows": args.val_rows,
        "inputs": 1290,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    t0 = time.perf_counter()
    st, train, val = prepare(args.out, args.rows, args.val_rows, None, "feat")
    result["prepare_s"] = time.perf_counter() - t0
    bs = [f"data.batch_size={args.batch_size}", "data.eval_batch_size=16384"]
    r4 = run("emotinet", st, train, val, [f"trainer.epochs={args.epochs}", *bs])
    result["emotinet_20_epochs"] = r4
    print(
        f"emotinet heads: {args.epochs} epochs per head ({r4['epochs_total']} epochs, {r4['stages']} stages) "
        f"on {args.rows:,} rows x 1,290 in {r4['seconds']:.1f}s (target < 60 s)",
        flush=True,
    )
    if args.per_recipe:
        per: dict = {}
        for recipe in ("emotinet", "au-graph", "progressive"):
            per[recipe] = run(recipe, st, train, val, ["trainer.epochs=1", *bs])
            r = per[recipe]
            print(
                f"{recipe}: {r['seconds_per_epoch']:.1f}s per epoch ({r['stages']} stages)",
                flush=True,
            )
        n_tok = args.token_rows
        st_t, tr_t, va_t = prepare(args.out, n_tok, max(1, n_tok // 10), (16, 128), "tok")
        r1 = run("queries-gcn", st_t, tr_t, va_t, ["trainer.epochs=1", "data.batch_size=256"])
        r1["rows"] = n_tok
        r1["extrapolated_seconds_per_epoch_at_full_size"] = r1["seconds_per_epoch"] * args.rows / n_tok
        per["queries-gcn"] = r1
        full = r1["extrapolated_seconds_per_epoch_at_full_size"]
        print(
            f"queries-gcn: {r1['seconds_per_epoch']:.1f}s per epoch on {n_tok:,} rows of 16x128 tokens "
            f"(~{full:.0f}s at {args.rows:,})",
            flush=True,
        )
        result["per_recipe"] = per
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
