"""The exported default model and MTCNN with onnxruntime vs PyTorch: latency, sizes, int8 accuracy.

1. ``mtaffect export --quantize`` of the embedded default model: wall time and file sizes.
2. Single-thread latency per face of the face model (fer-minixception + the default heads) from
   prepared 64x64 greyscale faces to probabilities: PyTorch (``backbone.preprocess`` + forward +
   ``DefaultAffectModel.predict``), onnxruntime float32 and int8; one face per call and batches of 64
   (median of ``--repeats`` timed calls after a warm-up).
3. SMILEsmileD (13,165 real 64x64 faces, smile yes/no; ../shared/data/smilesmiled, read as
   ``bench_fer_smile.py`` reads it): AUROC of P(Happiness) with PyTorch, onnxruntime float32 and int8,
   and the largest |onnxruntime - PyTorch| over all faces.
4. MTCNN on 640x480 one-face frames (``bench_mtcnn.make_frames``), single thread, batches of 16: the
   PyTorch engine vs the onnxruntime engine (same numpy cascade), and whether they find the same faces.

    python benchmarks/bench_export.py [--repeats 200] [--limit N] [--frames 32] [--min-face-size 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling benchmarks, also under run_all.py

from bench_fer_smile import DEFAULT_DATA, TAR_NAME, load_faces  # noqa: E402
from bench_mtcnn import make_frames  # noqa: E402

from mtaffect.export.exporter import export_model, synthetic_faces  # noqa: E402
from mtaffect.features.registry import create_backbone  # noqa: E402
from mtaffect.models.default import DefaultAffectModel  # noqa: E402
from mtaffect.runtime import Runtime  # noqa: E402
from mtaffect.schema import EXPR_NAMES  # noqa: E402

HAPPY = EXPR_NAMES.index("Happiness")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def torch_predict(backbone, model: DefaultAffectModel, faces: np.ndarray):
    """What ``mtaffect predict`` runs per batch of prepared greyscale faces (N, 64, 64)."""
    with torch.inference_mode():
        out = backbone(backbone.preprocess(faces))
        return model.predict(out.features, out.logits)


def latency(folder: Path, repeats: int) -> dict:
    backbone, model = create_backbone("fer-minixception").eval(), DefaultAffectModel()
    rts = {p: Runtime(folder, precision=p, threads=1) for p in ("float32", "int8")}
    faces = synthetic_faces(64, 64, "L", seed=5)
    out = {}
    for n in (1, 64):
        x = faces[:n]
        row = {"torch": _median_ms(lambda x=x: torch_predict(backbone, model, x[..., 0]), repeats) / n}
        for p, rt in rts.items():
            row[f"onnxruntime_{p}"] = _median_ms(lambda x=x, rt=rt: rt.model.run(x), repeats) / n
        out[f"ms_per_face_batch{n}"] = {k: round(v, 4) for k, v in row.items()}
    return out


def smile(folder: Path, limit: int | None) -> dict:
    from sklearn.metrics import roc_auc_score

    images, labels, _ = load_faces(DEFAULT_DATA, limit)
    backbone, model = create_backbone("fer-minixception").eval(), DefaultAffectModel()
    probs = {
        "torch": np.concatenate(
            [
                torch_predict(backbone, model, images[i : i + 512]).expr_probs
                for i in range(0, len(images), 512)
            ]
        )
    }
    for p in ("float32", "int8"):
        rt = Runtime(folder, precision=p)
        probs[f"onnxruntime_{p}"] = np.concatenate(
            [rt.model.run(images[i : i + 512, ..., None])[0].expr_probs for i in range(0, len(images), 512)]
        )
    ref = probs["torch"]
    ort = {k: v for k, v in probs.items() if k != "torch"}
    return {
        "n": len(labels),
        "n_smile": int(labels.sum()),
        "auroc_p_happiness": {k: round(roc_auc_score(labels, v[:, HAPPY]), 4) for k, v in probs.items()},
        "max_abs_diff_vs_torch": {k: float(np.abs(v - ref).max()) for k, v in ort.items()},
        "top1_agreement_vs_torch": {k: float((v.argmax(1) == ref.argmax(1)).mean()) for k, v in ort.items()},
    }


def mtcnn(folder: Path, n_frames: int, min_face: float) -> dict:
    from mtaffect.faces import MTCNN

    frames, _ = make_frames(n_frames)
    engines = {
        "torch": MTCNN(min_face_size=min_face, batch_size=16),
        "onnxruntime": Runtime(folder, threads=1).detector(min_face_size=min_face, batch_size=16),
    }
    out, found = {}, {}
    for name, det in engines.items():
        det.detect(frames[:16])
        t0 = time.perf_counter()
        found[name] = [d for i in range(0, n_frames, 16) for d in det.detect(frames[i : i + 16])]
        out[f"{name}_ms_per_frame"] = round(1000 * (time.perf_counter() - t0) / n_frames, 2)
    a, b = found["torch"], found["onnxruntime"]
    same = all(len(x) == len(y) for x, y in zip(a, b, strict=True))
    out["same_faces"] = same
    if same:
        diffs = [np.abs(x.landmarks - y.landmarks).max() for x, y in zip(a, b, strict=True) if len(x)]
        out["max_landmark_diff_px"] = float(max(diffs, default=0.0))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per latency figure")
    ap.add_argument("--limit", type=int, default=None, help="SMILEsmileD: a fixed random subset")
    ap.add_argument("--frames", type=int, default=32, help="MTCNN: 640x480 frames timed")
    ap.add_argument("--min-face-size", type=float, default=40, help="MTCNN: smallest face (40: video)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result: dict = {"name": "export_onnxruntime"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        t0 = time.perf_counter()
        manifest = export_model("default", folder, quantize=True)
        result["export_seconds"] = round(time.perf_counter() - t0, 1)
        result["file_bytes"] = {k: v["bytes"] for k, v in manifest["files"].items()}
        result["int8_check"] = manifest["checks"]["int8"]
        result["latency"] = latency(folder, args.repeats)
        if (DEFAULT_DATA / TAR_NAME).is_file():
            result["smilesmiled"] = smile(folder, args.limit)
        else:
            print(f"skipping SMILEsmileD: {DEFAULT_DATA / TAR_NAME} not found")
        result["mtcnn_640x480"] = mtcnn(folder, args.frames, args.min_face_size)
    import json

    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
