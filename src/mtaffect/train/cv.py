"""K-fold cross-validation over train + validation, split by video, with a fold ensemble for the test set.

Folds never put one video on both sides. The group key is the video id with a trailing ``_left`` /
``_right`` removed, so the two faces of one source video (s-Aff-Wild2 names them ``<id>_left`` and
``<id>_right``) always stay together. Groups are dealt to folds largest first, each to the fold with
the fewest rows so far (ties broken by a seeded shuffle), which balances fold sizes.

``out/`` receives ``fold<k>/`` (a full run folder: best checkpoint, metrics, val predictions),
``cv.json`` (per-fold and mean ± std of P and its three terms) and, when test images are given,
``test_predictions.parquet``: the ensemble of the fold models (mean of the expression and AU
probabilities and of valence/arousal).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.features.store import FeatureStore
from mtaffect.io import atomic_open, check_writable
from mtaffect.metrics import TERM_COLUMNS
from mtaffect.train.config import TrainConfig
from mtaffect.train.fit import env_rank, fit, named_stores, open_training_data

_SIDE = re.compile(r"_(left|right)$")
TERMS = ("P", *TERM_COLUMNS.values())


def group_key(video: str) -> str:
    """Source-video id: ``12-24-1920x1080_left`` and ``..._right`` are one group."""
    return _SIDE.sub("", str(video))


def video_folds(labels: LabelTable, k: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of each fold's validation part; groups (source videos) never straddle folds."""
    videos = labels.frame["video"].to_numpy(dtype=object)
    groups = np.array([group_key(v) for v in videos], dtype=object)
    uniq, inverse, sizes = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(uniq) < k:
        raise ValueError(f"{k} folds need at least {k} source videos; the labels hold {len(uniq)}")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(uniq))
    order = np.lexsort((tiebreak, -sizes))  # largest first, ties in seeded random order
    fold_of = np.empty(len(uniq), dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    row_fold = fold_of[inverse]
    return [np.flatnonzero(row_fold == f) for f in range(k)]


@dataclass
class CVResult:
    folds: list[dict]  # per fold: terms, rows, videos, checkpoint
    mean: dict[str, float]
    std: dict[str, float]
    test_predictions: PredictionTable | None = None
    checkpoints: list[Path] = field(default_factory=list)

    def table(self):  # -> rich.table.Table
        from rich.table import Table

        t = Table(title=f"{len(self.folds)}-fold cross-validation", title_justify="left")
        t.add_column("fold")
        for name in TERMS:
            t.add_column(name, justify="right")
        t.add_column("val rows", justify="right")
        for i, f in enumerate(self.folds):
            t.add_row(str(i), *(f"{f[n]:.4f}" for n in TERMS), str(f["val_rows"]))
        t.add_section()
        t.add_row("mean ± std", *(f"{self.mean[n]:.4f} ± {self.std[n]:.4f}" for n in TERMS), "")
        return t

    def to_dict(self) -> dict:
        return {"folds": self.folds, "mean": self.mean, "std": self.std}


def ensemble(predictions: Sequence[PredictionTable], images: Sequence[str]) -> PredictionTable:
    """Mean of several models' probabilities and VA for ``images`` (the fold ensemble)."""
    if not predictions:
        raise ValueError("an ensemble needs at least one prediction table")
    aligned = [p.align_to(images) for p in predictions]
    va = np.mean([np.stack([p.valence, p.arousal], 1) for p in aligned], axis=0)
    expr = np.mean([p.expr_probs for p in aligned], axis=0)
    au = np.mean([p.au_probs for p in aligned], axis=0)
    return PredictionTable.from_arrays(list(images), va[:, 0], va[:, 1], expr, au)


def cross_validate(
    config: TrainConfig,
    store: FeatureStore | str | os.PathLike,
    labels: LabelTable,
    k: int = 5,
    out: str | os.PathLike | None = None,
    *,
    test_images: Sequence[str] | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    allow_missing: bool = False,
    log=print,
    trust_remote_code: bool = False,
    stores=None,
) -> CVResult:
    """Train one model per fold (``labels`` = train + val rows), report mean ± std, ensemble the test set.

    For a config with a ``backbone:`` section, ``store`` is the dataset root (training from its images).
    ``stores`` (``{name: store}``): named stores the recipe fuses (see :func:`~mtaffect.train.fit.fit`).
    Test images whose extraction failed (or that cannot be read) are an error unless ``allow_missing``
    (then the ensemble has a ``valid`` column, 0 for them). With tasks absent from the data, ``P`` is
    over the present tasks.
    """
    named = named_stores(stores)
    st = open_training_data(config, store, named)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_writable(out_path / "cv.json", overwrite)
    folds = video_folds(labels, k, config.trainer.seed if seed is None else seed)
    rows: list[dict] = []
    models = []
    checkpoints: list[Path] = []
    for i, val_idx in enumerate(folds):
        train_mask = np.ones(len(labels), dtype=bool)
        train_mask[val_idx] = False
        train, val = labels.subset(train_mask), labels.subset(val_idx)
        if log and env_rank() == 0:
            log(f"fold {i + 1}/{k}: {len(train)} train rows, {len(val)} val rows ({len(val.videos)} videos)")
        fold_out = out_path / f"fold{i}" if out_path is not None else None
        result = fit(
            config,
            st,
            train,
            val,
            fold_out,
            overwrite=overwrite,
            log=log,
            trust_remote_code=trust_remote_code,
            stores=named if config.from_images else None,
        )
        entry = {**result.terms(), "tasks": list(result.tasks), "val_rows": len(val)}
        entry.update(val_videos=val.videos, best_epoch=result.best_epoch, seconds=result.seconds)
        if result.checkpoint is not None:
            entry["checkpoint"] = str(result.checkpoint)
            checkpoints.append(result.checkpoint)
        rows.append(entry)
        models.append(result)
        if log and result.rank == 0:
            log(f"fold {i + 1}/{k}: {result.summary()}")
    mean = {n: float(np.mean([r[n] for r in rows])) for n in TERMS}
    std = {n: float(np.std([r[n] for r in rows])) for n in TERMS}
    test_pred = None
    if test_images is not None:
        from mtaffect.models.checkpoint import TrainedAffectModel

        preds = []
        for result in models:
            if not isinstance(st, FeatureStore):  # trained from images: predict the test images
                from mtaffect.schema import CROPPED_DIR
                from mtaffect.train.images.build import image_affect_model

                tm = image_affect_model(result.model, config)  # type: ignore[arg-type]
                kw = {"stores": named} if named is not None else {}
                preds.append(
                    tm.predict_images(st / CROPPED_DIR, list(test_images), allow_missing=allow_missing, **kw)
                )
                continue
            tm = TrainedAffectModel(
                result.model, {"backbone": {"name": st.backbone, "fingerprint": st.fingerprint},
                               "temporal": bool(result.model.temporal), "window": config.data.window,
                               "window_edge": config.data.window_edge, "inputs": list(result.model.inputs)},
            )  # fmt: skip
            preds.append(tm.predict_store(st, list(test_images), allow_missing=allow_missing))
        test_pred = ensemble(preds, list(test_images))
        if allow_missing:
            test_pred = test_pred.with_columns({"valid": preds[0].align_to(list(test_images)).frame["valid"]})
    res = CVResult(rows, mean, std, test_pred, checkpoints)
    if out_path is not None and env_rank() == 0:
        if test_pred is not None:
            test_pred.write(out_path / "test_predictions.parquet", overwrite=overwrite)
        with atomic_open(out_path / "cv.json", "w", overwrite=overwrite, encoding="utf-8") as fh:
            json.dump({**res.to_dict(), "k": k, "recipe": config.model.recipe}, fh, indent=1, default=float)
            fh.write("\n")
    return res
