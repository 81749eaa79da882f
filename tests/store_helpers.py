"""Test helpers: write a finished feature store by hand, exactly as ``mtaffect.features.store`` documents
the on-disk format (so the reader is tested against the documentation, not against our own writer), and
edit its meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT_NAME = "mtaffect-feature-store"  # as docs/formats.md names it


def write_store_by_hand(
    path: Path,
    names: list[str],
    features: np.ndarray,
    *,
    logits: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    reason: str = "unreadable",
) -> None:
    """Features (and logits) are stored as float16; rows where ``valid`` is False are listed as failed."""
    path.mkdir(parents=True)
    valid = np.ones(len(names), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    arrays = {"features": np.asarray(features, np.float16), "valid": valid}
    if logits is not None:
        arrays["logits"] = np.asarray(logits, np.float16)
    for name, arr in arrays.items():
        np.save(path / f"{name}.npy", arr)
    (path / "images.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    bad = np.array(names)[~valid]
    (path / "failed.csv").write_text("image,reason\n" + "".join(f"{n},{reason}\n" for n in bad))
    meta = {
        "format": FORMAT_NAME,
        "format_version": 1,
        "backbone": "hand-made",
        "spec": {"name": "hand-made"},
        "fingerprint": "abc123",
        "dtype": "float16",
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "counts": {"images": len(names), "valid": int(valid.sum()), "failed": int((~valid).sum())},
    }
    (path / "meta.json").write_text(json.dumps(meta))


def set_meta(path: Path, **changes) -> dict:
    """Change fields of the store's meta.json (as a user or another version might); returns the meta as it
    was before."""
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))
    return meta
