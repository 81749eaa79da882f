"""K-fold cross-validation over train + validation, split by video, with a fold ensemble for the test set.

Folds never put one video on both sides. The group key is the video id with a trailing ``_left`` /
``_right`` removed, so the two faces of one source video (s-Aff-Wild2 names them ``<id>_left`` and
``<id>_right``) always stay together. Groups are dealt to folds largest first, each to the fold with
the fewest rows so far (ties broken by a seeded shuffle), which balances fold sizes.

``out/`` receives ``fold<k>/`` (a full run folder: best checkpoint, metrics, val predictions),
``cv.json`` (per-fold and mean ± std of P and its three terms) and, when test images are given,
``test_predictions.parquet``: the ensemble of the fold models (mean of the expression and AU
probabilities and of valence/arousal).

A pipeline config (``pipeline:``, recipe 3 as published) runs its whole pipeline inside each fold:
``fold<k>/`` is a pipeline folder (:mod:`mtaffect.train.pipeline`) whose task models see the fold's
training videos only and whose stores are exported by those task models, so no validation video gets
features from a model trained on its own labels. Finished folds and steps are kept on a rerun (checked
against the fold's labels), an interrupted step continues with ``resume``. :func:`fold_split` is the
one fold assignment (``mtaffect train --fold K`` uses it too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.features.store import FeatureStore
from mtaffect.io import OutputExistsError, check_writable
from mtaffect.metrics import TERM_COLUMNS
from mtaffect.persist import write_json
from mtaffect.train.build import named_stores, open_training_data, pipeline_root
from mtaffect.train.config import TrainConfig
from mtaffect.train.fit import TrainResult, env_rank, fit

if TYPE_CHECKING:
    from mtaffect.train.pipeline import PipelineResult

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


def fold_split(labels: LabelTable, k: int, fold: int, seed: int = 0) -> tuple[LabelTable, LabelTable]:
    """(training rows, validation rows) of fold ``fold`` (0-based) of :func:`video_folds`; their
    ``source`` names the fold, so a run's ``run.json`` says which rows it trained on."""
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} does not exist: folds are numbered 0 to {k - 1} (with {k} folds)")
    val_idx = video_folds(labels, k, seed)[fold]
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    src = labels.source or "labels"
    where = f"{src} (fold {fold} of {k}, split seed {seed}"
    train = replace(labels.subset(train_mask), source=f"{where}: training rows)")
    return train, replace(labels.subset(val_idx), source=f"{where}: validation rows)")


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
    resume: bool = False,
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

    A pipeline config runs its whole pipeline per fold into ``out/fold<k>/`` (``out`` is then required,
    ``store`` is the dataset root and ``stores`` must be None: see the module docstring); ``resume``
    continues an interrupted step, finished folds and steps are kept.
    """
    from mtaffect.train.pipeline import check_no_features

    pipeline = config.pipeline.enabled
    check_no_features(config, stores is not None)
    if resume and not pipeline:
        raise ValueError(
            f"resume applies to pipeline configs in cv; {config.source or 'the config'} has no pipeline "
            "section: rerun the cross-validation with another out (or overwrite)"
        )
    named = None if pipeline else named_stores(stores)
    st = pipeline_root(store) if pipeline else open_training_data(config, store, named)
    out_path = Path(out) if out is not None else None
    if pipeline and out_path is None:
        raise ValueError("cross-validating a pipeline needs an out folder (its steps are written there)")
    if out_path is not None:
        if pipeline and not overwrite:  # a rerun keeps the finished folds and rewrites the summary
            _check_summary(out_path / "cv.json")
        else:
            check_writable(out_path / "cv.json", overwrite)
    split_seed = config.trainer.seed if seed is None else seed
    video_folds(labels, k, split_seed)  # too few videos: say so before anything is trained
    rows: list[dict] = []
    models: list[TrainResult | PipelineResult] = []
    checkpoints: list[Path] = []
    result: TrainResult | PipelineResult
    for i in range(k):
        train, val = fold_split(labels, k, i, split_seed)
        if log and env_rank() == 0:
            n = f"{len(train)} train rows, {len(val)} val rows ({len(val.videos)} videos)"
            log(f"fold{i} ({i + 1}/{k}): {n}")
        fold_out = out_path / f"fold{i}" if out_path is not None else None
        if pipeline:
            from mtaffect.train.pipeline import Pipeline

            assert fold_out is not None
            result = Pipeline(
                config,
                st,
                fold_out,
                resume=resume,
                overwrite=overwrite,
                log=log,
                trust_remote_code=trust_remote_code,
                train=train,
                val=val,
            ).run()
            entry = {
                **result.terms(),
                "tasks": list(result.tasks),
                "val_rows": len(val),
                "val_videos": val.videos,
                "seconds": result.seconds,
                "steps": {n: r.get("status") for n, r in result.steps.items()},
            }
        else:
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
            log(f"fold{i} ({i + 1}/{k}): {result.summary()}")
    mean = {n: float(np.mean([r[n] for r in rows])) for n in TERMS}
    std = {n: float(np.std([r[n] for r in rows])) for n in TERMS}
    test_pred = None
    if test_images is not None:
        from mtaffect.models.loading import load_model
        from mtaffect.models.trained import TrainedAffectModel
        from mtaffect.schema import CROPPED_DIR

        preds = []
        for result in models:
            if pipeline or config.trainer.checkpoint_per_task:  # best/ is an ensemble folder
                if result.checkpoint is None:
                    raise ValueError("test predictions of an ensemble model read its best/ folder: give out")
                m = load_model(result.checkpoint, trust_remote_code=trust_remote_code)
                images = list(test_images)
                if isinstance(st, FeatureStore):
                    preds.append(m.predict_store(st, images, allow_missing=allow_missing))
                else:
                    preds.append(m.predict_images(st / CROPPED_DIR, images, allow_missing=allow_missing))
                continue
            assert isinstance(result, TrainResult)  # not a pipeline: fit's result
            if not isinstance(st, FeatureStore):  # trained from images: predict the test images
                from mtaffect.models.image_model import ImageMTLModel
                from mtaffect.train.images.build import image_affect_model

                assert isinstance(result.model, ImageMTLModel)  # what image training builds
                tm = image_affect_model(result.model, config)
                preds.append(
                    tm.predict_images(
                        st / CROPPED_DIR, list(test_images), allow_missing=allow_missing, stores=named
                    )
                )
                continue
            tm = TrainedAffectModel(
                result.model,
                {
                    "backbone": {"name": st.backbone, "fingerprint": st.fingerprint},
                    "temporal": bool(result.model.temporal),
                    "window": config.data.window,
                    "window_edge": config.data.window_edge,
                    "inputs": list(result.model.inputs),
                },
            )
            preds.append(tm.predict_store(st, list(test_images), allow_missing=allow_missing))
        test_pred = ensemble(preds, list(test_images))
        if allow_missing:
            test_pred = test_pred.with_columns({"valid": preds[0].align_to(list(test_images)).frame["valid"]})
    res = CVResult(rows, mean, std, test_pred, checkpoints)
    if out_path is not None and env_rank() == 0:
        replace_ok = overwrite or pipeline  # a pipeline's rerun rewrites what it derives from its folds
        if test_pred is not None:
            test_pred.write(out_path / "test_predictions.parquet", overwrite=replace_ok)
        write_json(
            out_path / "cv.json",
            {
                **res.to_dict(),
                "k": k,
                "seed": split_seed,
                "recipe": config.model.recipe,
                "pipeline": pipeline,
            },
            overwrite=replace_ok,
        )
    return res


def _check_summary(path: Path) -> None:
    """``path`` may be (re)written by a pipeline's cross-validation: absent, or a cv.json of ours."""
    if not path.exists():
        return
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(d, dict) and "folds" in d and "k" in d
    except (OSError, ValueError):
        ours = False
    if path.is_dir() or not ours:
        raise OutputExistsError(
            f"{path} is not the summary of a cross-validation of ours; move it away or choose another --out"
        )
