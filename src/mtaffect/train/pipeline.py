"""Recipe 3 as published (Liu et al., ABAW7 first place): a pipeline of ordinary trainings.

A config with a ``pipeline:`` section (``configs/progressive_published.yaml``) lists the steps; each is
one of the pieces the toolkit already has, run in order and each resumable on its own:

1. ``task_<t>`` (``pipeline.task_models``): the backbone fine-tuned from images for task ``t`` alone
   (``trainer.tasks: [t]``), a normal run folder (per-epoch resumable state, best/, metrics.json).
2. ``export_<t>``: that model's fine-tuned backbone run over every image of the dataset into a feature
   store (``mtaffect extract --backbone run:<task run>``; resumable by chunks).
3. ``enhanced_<name>`` (``pipeline.enhanced``): a model trained from images with its own backbone
   (fine-tuned again) fusing the exported task features (``features@<t>`` from the stores), e.g. AU on
   frames, EXPR on 5-frame windows, VA with an LSTM over 30 frames. A normal run folder.
4. ``combine``: the ensemble folder ``best/`` answering each task with its own enhanced model
   (``pipeline.combine``; :mod:`mtaffect.models.ensemble`), the combined validation predictions and P.

Run folder::

    out/config.yaml  out/pipeline.json        the config; the steps with their status and scores
    out/task_<t>/  out/enhanced_<name>/       run folders (mtaffect train's layout)
    out/stores/<t>/                           exported task-model features (feature stores)
    out/best/                                 the combined model (load_model, infer, predict-free)
    out/val_predictions.parquet  out/metrics.json

A finished step is never redone: rerunning the command checks it (same step config, same inputs, else
an error naming both) and keeps it. An interrupted step continues with ``resume=True`` (CLI
``--resume``) from its last epoch or chunk. ``only`` (CLI ``--step``, repeatable) runs some steps,
provided the steps they need have finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mtaffect.data.annotations import LabelTable, load_split
from mtaffect.data.predictions import PredictionTable
from mtaffect.features.reader import StoreSet
from mtaffect.features.store import FeatureStore, StoreError
from mtaffect.io import OutputExistsError, atomic_open
from mtaffect.metrics import terms_row
from mtaffect.models.base import TASKS
from mtaffect.persist import (
    CHECKPOINT,
    ENSEMBLE,
    FEATURE_STORE,
    PIPELINE,
    NotOursError,
    check_replaceable,
    folder_format,
    header,
    read_json,
    write_json,
)
from mtaffect.train.config import TrainConfig
from mtaffect.train.fit import env_rank, fit
from mtaffect.train.pipeline_steps import combine_map, fused_tasks, pipeline_configs
from mtaffect.train.run import RUN_ENTRIES, check_ours, check_same_run, remove_run, run_status
from mtaffect.train.state import ResumeError, data_source, labels_digest, read_run, run_identity

PIPELINE_FILE = str(PIPELINE.marker)
STORES_DIR = "stores"
#: Entries of a pipeline folder besides its step folders (what ``overwrite`` removes).
PIPELINE_ENTRIES = (
    "config.yaml",
    PIPELINE_FILE,
    "best",
    "metrics.json",
    "val_predictions.parquet",
    STORES_DIR,
)


def _is_store_of_ours(folder: Path) -> bool:
    """A finished feature store, or an unfinished one (``<name>.partial``, its plan.json), of ours."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if folder_format(folder, (FEATURE_STORE,)) is not None:
        return True
    try:
        plan = read_json(folder / "plan.json", "extraction plan")
        return folder.name.endswith(".partial") and plan.get("format") == FEATURE_STORE.name
    except ValueError:
        return False


def check_no_features(config: TrainConfig, given: bool) -> None:
    """Refuse feature stores given to a pipeline (``train``, ``cv``): it exports its own from its own task
    models; stores made by task models trained on other rows (e.g. the whole training split) would give
    validation videos features learnt from their own labels."""
    if config.pipeline.enabled and given:
        raise ValueError(
            f"{config.source} is a pipeline: it trains from the images under --data and exports its own "
            "stores; drop --features"
        )


@dataclass(frozen=True)
class Step:
    """One step: ``train`` (a run folder), ``export`` (a store) or ``combine`` (the ensemble)."""

    name: str
    kind: str
    needs: tuple[str, ...] = ()
    config: TrainConfig | None = None
    task: str | None = None  # export: the task model exported
    stores: tuple[str, ...] = ()  # train: the exported stores read (features@<t>)


def plan_pipeline(config: TrainConfig) -> list[Step]:
    """The steps of ``config.pipeline`` in the order they run."""
    configs = pipeline_configs(config)
    tasks = [t for t in TASKS if t in config.pipeline.task_models]
    steps = [Step(f"task_{t}", "train", config=configs[f"task_{t}"]) for t in tasks]
    steps += [Step(f"export_{t}", "export", needs=(f"task_{t}",), task=t) for t in tasks]
    for name in config.pipeline.enhanced:
        cfg = configs[f"enhanced_{name}"]
        fused = fused_tasks(cfg)
        steps.append(
            Step(
                f"enhanced_{name}",
                "train",
                needs=tuple(f"export_{t}" for t in fused),
                config=cfg,
                stores=fused,
            )
        )
    used = dict.fromkeys(combine_map(config).values())
    steps.append(Step("combine", "combine", needs=tuple(f"enhanced_{n}" for n in used)))
    return steps


@dataclass
class PipelineResult:
    """What a pipeline produced: the combined model and its validation scores, and each step's."""

    metrics: dict  # MetricResult.to_dict() of the combined validation predictions ({} without)
    steps: dict[str, dict] = field(default_factory=dict)  # name -> {status, seconds, P, terms...}
    val_predictions: PredictionTable | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    tasks: tuple[str, ...] = TASKS
    rank: int = 0
    trainval: bool = False

    @property
    def P(self) -> float:
        return self.terms()["P"]

    def terms(self) -> dict[str, float]:
        """``P`` (the trained tasks) and the three terms (NaN: not scored)."""
        return terms_row(self.metrics, self.tasks)

    def summary(self) -> str:
        if not self.metrics:
            return f"pipeline finished ({self.seconds:.1f}s): nothing scored" + (
                " (trained on train + val)" if self.trainval else ""
            )
        t = self.terms()
        return (
            f"combined P = {self.P:.4f}  (CCC_VA {t['ccc_va']:.4f} + F1_EXPR {t['f1_expr']:.4f} + F1_AU "
            f"{t['f1_au']:.4f})  {self.seconds:.1f}s"
        )


class Pipeline:
    """Runs the steps of a pipeline config over a dataset root into ``out`` (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        root: str | os.PathLike,
        out: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        trainval: bool = False,
        log: Callable | None = print,
        trust_remote_code: bool = False,
        train: LabelTable | None = None,
        val: LabelTable | None = None,
    ) -> None:
        self.config, self.root, self.out = config, Path(root), Path(out)
        self.resume, self.overwrite, self.trainval = resume, overwrite, trainval
        self.log, self.trust_remote_code = log, trust_remote_code
        self.steps = plan_pipeline(config)
        self.by_name = {s.name: s for s in self.steps}
        self.combine = combine_map(config)
        tr = train if train is not None else load_split(self.root, "train")
        va = val if val is not None else load_split(self.root, "val")
        self.train: LabelTable = LabelTable.concat([tr, va]) if trainval else tr
        self.val: LabelTable | None = None if trainval else va
        self.rank0 = env_rank() == 0
        self.trained: list[str] = []  # train steps this call trained (not kept from before)
        self.record: dict[str, dict] = {}

    # ---- bookkeeping --------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.log and self.rank0:
            self.log(msg)

    def _prepare(self) -> None:
        marker = self.out / PIPELINE_FILE
        ours = marker.is_file() and folder_format(self.out, (PIPELINE,)) is not None
        if self.out.exists() and any(self.out.iterdir()) and not ours:
            raise OutputExistsError(
                f"{self.out} holds something other than a pipeline run (no {PIPELINE_FILE} of ours); choose "
                "another --out"
            )
        if self.overwrite and ours:
            self._remove_previous(marker)
        elif ours:  # what earlier sessions recorded of the steps they ran
            before = read_json(marker, PIPELINE.what).get("steps", {})
            before = before if isinstance(before, dict) else {}
            self.record = {
                n: r for n, r in before.items() if n in self.by_name and isinstance(r, dict) and "status" in r
            }
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.out / "config.yaml", "w", overwrite=True, encoding="utf-8") as fh:
                yaml.safe_dump(self.config.to_dict(), fh, sort_keys=False)
            self._write_record()

    def _remove_previous(self, marker: Path) -> None:
        """``overwrite``: remove what an earlier pipeline run wrote here, and only that (the ownership
        rule of :mod:`mtaffect.persist`): its step runs (:func:`~mtaffect.train.run.remove_run`), the
        stores it extracted, its ensemble and its own files. Everything is checked before anything goes:
        a folder that is not ours stops the overwrite, naming it."""
        old = read_json(marker, PIPELINE.what).get("steps", {})
        old = old if isinstance(old, dict) else {}
        # run folders of steps (a search's variants included)
        steps = sorted(
            {p.name for p in self.out.iterdir() if p.name.startswith(("task_", "enhanced_"))}
            | {n for n in old if str(n).startswith(("task_", "enhanced_"))}
        )
        runs = [self.out / n for n in steps if (self.out / n).is_dir() and not (self.out / n).is_symlink()]
        stores = self.out / STORES_DIR
        store_folders = sorted(stores.iterdir()) if stores.is_dir() and not stores.is_symlink() else []
        for run in runs:
            check_ours(run, [e for e in RUN_ENTRIES if (run / e).exists()])
        for folder in store_folders:
            if not _is_store_of_ours(folder):
                raise NotOursError(
                    f"{folder} is not a feature store this pipeline extracted; refusing to overwrite "
                    f"{self.out} (even with --overwrite): move it away first"
                )
        best = self.out / "best"
        if best.exists():
            check_replaceable(best, (ENSEMBLE, CHECKPOINT), overwrite=True)
        if not self.rank0:
            return
        for run in runs:
            remove_run(run)
        for folder in store_folders:
            shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
        for name in PIPELINE_ENTRIES:
            p = self.out / name
            if p.is_dir() and not p.is_symlink():
                if name == STORES_DIR:
                    p.rmdir()  # emptied above
                else:
                    shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def _write_record(self) -> None:
        if not self.rank0:
            return
        write_json(
            self.out / PIPELINE_FILE,
            {
                **header(PIPELINE),
                "recipe": self.config.model.recipe,
                "combine": self.combine,
                "steps": {
                    s.name: {"kind": s.kind, "needs": list(s.needs), **self.record.get(s.name, {})}
                    for s in self.steps
                },
            },
        )

    def _stores(self, tasks: Sequence[str]) -> dict[str, Path]:
        return {t: self.out / STORES_DIR / t for t in tasks}

    def _done(self, step: Step) -> bool:
        if step.kind == "train":
            return run_status(self.out / step.name) == "finished"
        if step.kind == "export":
            store = self.out / STORES_DIR / str(step.task)
            return (store / "meta.json").is_file()
        return (self.out / "best").is_dir()

    # ---- running ------------------------------------------------------------------------------------
    def run(self, only: Sequence[str] | None = None) -> PipelineResult:
        t0 = time.perf_counter()
        unknown = sorted(set(only or ()) - set(self.by_name))
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; this pipeline's steps: {list(self.by_name)}")
        self._prepare()
        chosen = [s for s in self.steps if not only or s.name in only]
        for i, step in enumerate(chosen, 1):
            for need in step.needs:
                if not self._done(self.by_name[need]):
                    raise ValueError(
                        f"step {step.name} needs step {need}, which has not finished in {self.out}: run it "
                        f"first (--step {need}) or run the whole pipeline"
                    )
            self.say(f"[bold]step {i}/{len(chosen)}: {step.name}[/bold]")
            s0 = time.perf_counter()
            if step.kind == "train":
                info = self._train(step)
            elif step.kind == "export":
                info = self._export(step)
            else:
                info = self._combine_step()
            self.record[step.name] = {
                **self.record.get(step.name, {}),
                **info,
                "seconds": round(time.perf_counter() - s0, 3),
            }
            self._write_record()
        return self._result(time.perf_counter() - t0)

    def _train(self, step: Step) -> dict:
        assert step.config is not None
        folder = self.out / step.name
        stores = self._stores(step.stores)
        status = run_status(folder)
        if status == "finished":
            named = StoreSet.open(stores) if stores else None
            check_same_run(
                folder, step.config, run_identity(data_source(self.root, named), self.train, self.val)
            )
            self.say(f"step {step.name}: finished earlier, kept ({folder})")
            return {"status": "kept", **_scores(folder)}
        if status == "started" and not self.resume:
            raise ResumeError(
                f"step {step.name} was interrupted ({folder}): pass --resume to continue it from its last "
                "epoch, or remove that folder to train it anew"
            )
        result = fit(
            step.config,
            self.root,
            self.train,
            self.val,
            folder,
            resume=status == "started",
            log=self.log,
            trust_remote_code=self.trust_remote_code,
            stores=stores or None,
        )
        self.trained.append(step.name)
        self.say(f"step {step.name}: {result.summary()}")
        return {"status": "trained", **_scores(folder)}

    def _export(self, step: Step) -> dict:
        from mtaffect.features.extract import extract
        from mtaffect.models.loading import backbone_of

        run = self.out / f"task_{step.task}"
        store = self.out / STORES_DIR / str(step.task)
        opts = dict(self.config.pipeline.export)
        device = str(opts.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        bb = backbone_of(run, device, trust_remote_code=self.trust_remote_code)
        fp = bb.spec.fingerprint()
        if (store / "meta.json").is_file():
            st = FeatureStore.open(store)
            if st.fingerprint != fp:
                raise StoreError(
                    f"step {step.name}: {store} holds features of another backbone (fingerprint "
                    f"{st.fingerprint}) than the task model {run} (fingerprint {fp}); remove the store to "
                    "export it again"
                )
            self.say(f"step {step.name}: finished earlier, kept ({store})")
            return {"status": "kept", "store": str(store), "images": len(st)}
        splits = opts.get("splits") or _splits(self.root)
        res = extract(
            self.root,
            bb,
            store,
            splits=tuple(splits),
            batch_size=int(opts.get("batch_size", 64)),
            device=device,
            workers=int(opts.get("workers", 1)),
            progress=bool(self.config.trainer.progress),
        )
        self.say(f"step {step.name}: store {res.summary()}")
        return {"status": "exported", "store": str(store), "images": res.images, "failed": res.failed}

    def _combine_step(self) -> dict:
        """The ensemble folder ``best/``, the combined validation predictions and their P."""
        from mtaffect.models.ensemble import save_ensemble

        used = list(dict.fromkeys(self.combine.values()))
        members = {n: self.out / f"enhanced_{n}" / "best" for n in used}
        fused = sorted({t for n in used for t in self.by_name[f"enhanced_{n}"].stores})
        sources = {t: self.out / f"task_{t}" / "best" for t in fused}
        metrics: dict = {}
        preds = None
        if self.val is not None:
            folders = {task: self.out / f"enhanced_{name}" for task, name in self.combine.items()}
            self._check_validated_on(folders.values(), self.val)
            preds, metrics = combine_predictions(folders, self.val)
        if self.rank0:
            save_ensemble(
                self.out / "best", members, self.combine, sources=sources, metrics=metrics, overwrite=True
            )
            if preds is not None:
                preds.write(self.out / "val_predictions.parquet", overwrite=True)
        self._combined = (metrics, preds)
        self.say(
            f"step combine: {self.out / 'best'} answers "
            + ", ".join(f"{t} with enhanced_{n}" for t, n in self.combine.items())
        )
        return {"status": "combined", "P": metrics.get("P") if metrics else None}

    def _check_validated_on(self, folders: Iterable[Path], val: LabelTable) -> None:
        """The steps combined were validated on this call's validation labels (``--step combine`` with
        another ``--data`` would score one set's predictions against another's labels)."""
        want = labels_digest(val)
        for folder in folders:
            rec = (read_run(folder) or {}).get("val") or {}
            if rec.get("content_sha256") not in (None, want):
                raise ValueError(
                    f"{folder / 'run.json'}: step {folder.name} was validated on {rec.get('source')}, not on "
                    f"{val.source}; run --step combine with the --data the steps were trained on, or "
                    "train them again"
                )

    def _result(self, seconds: float) -> PipelineResult:
        metrics, preds = getattr(self, "_combined", ({}, None))
        tasks = _trained_tasks(self.record, self.combine)
        result = PipelineResult(
            metrics=metrics,
            steps=dict(self.record),
            val_predictions=preds,
            checkpoint=self.out / "best" if (self.out / "best").is_dir() else None,
            seconds=seconds,
            tasks=tasks,
            rank=env_rank(),
            trainval=self.trainval,
        )
        if metrics and self.rank0:
            write_json(
                self.out / "metrics.json",
                {
                    "best": metrics,
                    "P_tasks": result.P,
                    "tasks": list(tasks),
                    "combine": self.combine,
                    "steps": {
                        n: {k: v for k, v in r.items() if k != "status"} for n, r in self.record.items()
                    },
                    "seconds": seconds,
                    "recipe": self.config.model.recipe,
                    "trainval": self.trainval,
                },
            )
        return result


def combine_predictions(runs: dict[str, Path], val: LabelTable) -> tuple[PredictionTable, dict]:
    """Each task's columns from the validation predictions of the run answering it (``{task: run
    folder}``), over the images every run predicted, and their metric (``MetricResult.to_dict()``)."""
    from mtaffect.metrics import score
    from mtaffect.models.ensemble import combine_tables

    tables = {task: PredictionTable.read(folder / "val_predictions.parquet") for task, folder in runs.items()}
    first = next(iter(tables.values()))
    common = set.intersection(*(set(map(str, t.images)) for t in tables.values()))
    images = [x for x in map(str, first.images) if x in common]
    preds = combine_tables(tables, images)
    kept = val.subset(_isin(val.images, images))
    if len(kept) == 0:
        raise ValueError(
            f"{val.source or 'the validation labels'} and the validation predictions of "
            f"{', '.join(str(f) for f in runs.values())} have no image in common: combine with the --data "
            "the steps were trained on"
        )
    return preds, score(kept, preds).to_dict()


def _trained_tasks(record: dict[str, dict], combine: dict[str, str]) -> tuple[str, ...]:
    """The tasks the combined model was trained for: each task's answering step trained it (a dataset
    without some task's labels leaves it out, as a single run does)."""
    out = []
    for task, name in combine.items():
        tasks = record.get(f"enhanced_{name}", {}).get("tasks")
        if tasks is None or task in tasks:
            out.append(task)
    return tuple(t for t in TASKS if t in out) or TASKS


def _isin(images: Any, wanted: Sequence[str]) -> Any:
    import numpy as np

    return np.isin(np.asarray(images, dtype=str), np.asarray(list(wanted), dtype=str))


def _scores(folder: Path) -> dict:
    """A finished run's validation P and terms (from its metrics.json)."""
    try:
        m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    best = m.get("best") or {}
    if not best:
        return {"tasks": m.get("tasks")}
    row = terms_row(best, m.get("tasks") or TASKS)  # P over the run's tasks: its P_tasks
    return {**row, "tasks": m.get("tasks"), "train_seconds": m.get("seconds")}


def _splits(root: Path) -> tuple[str, ...]:
    """Every split of the dataset: train, val and, when the test list is there, test."""
    from mtaffect.data.submission import find_test_list

    return ("train", "val", "test") if find_test_list(root) is not None else ("train", "val")


def run_pipeline(
    config: TrainConfig,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: Sequence[str] | None = None,
    **kwargs: Any,
) -> PipelineResult:
    """Run (or continue) ``config``'s pipeline over the dataset ``root`` into ``out`` (:class:`Pipeline`)."""
    return Pipeline(config, root, out, **kwargs).run(steps)


__all__ = [
    "PIPELINE_FILE",
    "Pipeline",
    "PipelineResult",
    "Step",
    "check_no_features",
    "combine_predictions",
    "plan_pipeline",
    "run_pipeline",
]
