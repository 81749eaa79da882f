"""A combined model: each task answered by its own trained model (recipe 3 as published).

The published method trains one *enhanced* model per task (AU on frames, EXPR on 5-frame windows, VA
with an LSTM over 30 frames), each fusing its own fine-tuned backbone with the features of separately
fine-tuned *task models*. An ensemble folder holds all of it, so one path predicts every task::

    ensemble.json     {"format": "mtaffect-ensemble", "format_version": 1, "mtaffect_version": ...,
                       "tasks":   {"au": <member>, "expr": <member>, "va": <member>},
                       "members": {<member>: "members/<member>"},
                       "sources": {<store name>: "sources/<store name>"}, "metrics": {...}}
    members/<name>/   a checkpoint (e.g. the enhanced model answering AU; never an ensemble)
    sources/<name>/   the checkpoint whose backbone computes a member's ``features@<name>`` input (a task
                      model); run on the images once and shared by every member that reads it

Files are hard links where the filesystem allows (a copy otherwise), so the folder is self-contained
without doubling the disk a ViT-B checkpoint takes. :func:`mtaffect.models.loading.load_predictor`
(``mtaffect.load_model``) recognises the folder and returns an :class:`EnsembleAffectModel`, an
:class:`~mtaffect.models.base.AffectPredictor`: ``predict_images`` (``mtaffect infer --data``) and
``predict_store`` (``infer --features``, members trained on frozen features) write one PredictionTable,
so ``evaluate``, ``submit``, ``tune`` and blending use it like any model's. It is no
:class:`~mtaffect.models.base.FaceAffectModel` (it has several backbones), so the application does not
run it. Every path in ``ensemble.json`` is checked to stay inside the folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtaffect.features.reader import store_names
from mtaffect.models.base import TASKS
from mtaffect.models.checkpoint import CONFIG, CheckpointError, read_checkpoint_config
from mtaffect.models.trained import TrainedAffectModel, load_checkpoint
from mtaffect.persist import ENSEMBLE, atomic_folder, header, read_header_file, write_json

if TYPE_CHECKING:
    from mtaffect.data.predictions import PredictionTable

ENSEMBLE_FILE = str(ENSEMBLE.marker)


def is_ensemble(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ensemble folder (it holds ``ensemble.json``)."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder as hard links (a plain copy across filesystems)."""
    for root, _, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            a, b = Path(root) / name, dst / rel / name
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)


def combine_tables(tables: Mapping[str, PredictionTable], images: Sequence[str]) -> PredictionTable:
    """One PredictionTable for ``images``: each task's columns from its own table (``{task: table}``, a
    table may answer several tasks); ``valid`` (when every table has it) is valid in all of them."""
    from mtaffect.data.predictions import PredictionTable

    names = [str(x) for x in images]
    va = tables["va"].align_to(names)
    expr = tables["expr"].align_to(names)
    au = tables["au"].align_to(names)
    extra = {}
    if all("valid" in t.frame for t in tables.values()):
        valid = np.min([t.align_to(names).frame["valid"].to_numpy() for t in tables.values()], axis=0)
        extra["valid"] = valid.astype(np.int8)
    return PredictionTable.from_arrays(names, va.valence, va.arousal, expr.expr_probs, au.au_probs, **extra)


def save_ensemble(
    path: str | os.PathLike,
    members: Mapping[str, str | os.PathLike],
    tasks: Mapping[str, str],
    *,
    sources: Mapping[str, str | os.PathLike] | None = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an ensemble folder: ``members`` (name -> checkpoint folder), ``tasks`` (task -> member),
    ``sources`` (store name -> checkpoint whose backbone computes the members' ``features@<name>``)."""
    sources = dict(sources or {})
    missing = [t for t in TASKS if t not in tasks]
    if missing or any(m not in members for m in tasks.values()):
        raise CheckpointError(
            f"an ensemble needs a member for each task; tasks {dict(tasks)}, members {list(members)}"
        )
    for folder in [*members.values(), *sources.values()]:
        if is_ensemble(folder):
            raise CheckpointError(f"{folder} is an ensemble: the members and sources of one are checkpoints")
    for name, folder in members.items():
        cfg = read_checkpoint_config(folder)
        lacking = sorted(set(store_names(cfg.get("inputs", []))) - set(sources))
        if lacking:
            raise CheckpointError(
                f"member {name!r} ({folder}) reads the features of {lacking}: give the checkpoints that "
                "compute them"
            )
    for folder in sources.values():
        read_checkpoint_config(folder)
    record = {
        **header(ENSEMBLE),
        "tasks": {t: str(tasks[t]) for t in TASKS},
        "members": {n: f"members/{n}" for n in members},
        "sources": {k: f"sources/{k}" for k in sources},
        "metrics": dict(metrics or {}),
    }
    with atomic_folder(path, ENSEMBLE, overwrite) as tmp:
        for name, folder in members.items():
            _link_tree(Path(folder), tmp / "members" / name)
        for key, folder in sources.items():
            _link_tree(Path(folder), tmp / "sources" / key)
        write_json(tmp / ENSEMBLE_FILE, record)
    return Path(path)


def _read_record(path: Path) -> dict:
    where = path / ENSEMBLE_FILE
    rec = read_header_file(where, ENSEMBLE, CheckpointError)
    for key in ("tasks", "members", "sources"):
        if not isinstance(rec.get(key, {}), dict):
            raise CheckpointError(f"{where}: {key} must be a mapping")
    members, tasks = rec["members"], rec["tasks"]
    if set(tasks) != set(TASKS) or any(m not in members for m in tasks.values()):
        raise CheckpointError(f"{where}: tasks must map au, expr and va to members, got {tasks!r}")
    root = path.resolve()
    for kind in ("members", "sources"):
        for name, rel in rec.get(kind, {}).items():
            target = (path / str(rel)).resolve()
            if not isinstance(rel, str) or root not in target.parents or not (target / CONFIG).is_file():
                raise CheckpointError(f"{where}: {kind}.{name} = {rel!r} is not a checkpoint inside {path}")
            if is_ensemble(target):  # members are checkpoints: a folder nesting ensembles is refused
                raise CheckpointError(f"{where}: {kind}.{name} = {rel!r} is an ensemble, not a checkpoint")
    return rec


class EnsembleAffectModel:
    """Each task from its own member model (see the module docstring): an
    :class:`~mtaffect.models.base.AffectPredictor`, never a face model (it has several backbones)."""

    def __init__(
        self, path: str | os.PathLike, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
    ) -> None:
        self.path = Path(path)
        rec = _read_record(self.path)
        self.config = rec
        self.tasks: dict[str, str] = dict(rec["tasks"])
        self.members: dict[str, TrainedAffectModel] = {
            n: load_checkpoint(self.path / rel, device, trust_remote_code=trust_remote_code)
            for n, rel in rec["members"].items()
        }
        self.sources: dict[str, TrainedAffectModel] = {
            k: load_checkpoint(self.path / rel, device, trust_remote_code=trust_remote_code)
            for k, rel in rec.get("sources", {}).items()
        }
        self.metrics: dict = rec.get("metrics", {})
        self.au_thresholds = self.members[self.tasks["au"]].au_thresholds
        self.failures: list[tuple[str, str]] = []

    def __repr__(self) -> str:
        return f"EnsembleAffectModel({str(self.path)!r}, tasks={self.tasks}, P={self.metrics.get('P')})"

    def _used(self) -> list[str]:
        return list(dict.fromkeys(self.tasks[t] for t in TASKS))

    def _combine(self, tables: Mapping[str, PredictionTable], images: Sequence[str]) -> PredictionTable:
        return combine_tables({t: tables[self.tasks[t]] for t in TASKS}, images)

    def predict_images(
        self,
        folder: str | os.PathLike,
        images: Sequence[str],
        batch_size: int = 256,
        workers: int = 0,
        *,
        allow_missing: bool = False,
        stores: Mapping[str, Any] | None = None,
    ) -> PredictionTable:
        """A PredictionTable for ``images`` under ``folder``: the sources' backbones run once each, then
        every member answers its tasks (temporal members over their own windows). ``stores``
        (``{name: store}``, e.g. a pipeline's exported ones) are read instead of running the sources."""
        names = list(dict.fromkeys(str(x) for x in images))
        extra: dict[str, np.ndarray] = {}
        self.failures = []
        needed = set().union(*(set(self.members[m].store_inputs) for m in self._used()))
        for key, src in self.sources.items():
            if f"features@{key}" in needed and not stores:
                extra[f"features@{key}"] = src.backbone_features(folder, names, batch_size, workers)
                self.failures.extend(src.failures)
        tables = {}
        for name in self._used():
            m = self.members[name]
            inputs = {"stores": stores} if stores else {"extra": {i: extra[i] for i in m.store_inputs}}
            tables[name] = m.predict_images(
                folder, names, batch_size, workers, allow_missing=allow_missing, **inputs
            )
            self.failures.extend(m.failures)
        return self._combine(tables, images)

    def predict_store(
        self,
        store: Any,
        images: Sequence[str],
        batch_size: int = 4096,
        *,
        allow_missing: bool = False,
        stores: Mapping[str, Any] | None = None,
    ) -> PredictionTable:
        """A PredictionTable from feature stores (members trained on frozen features): ``store`` the
        main one, ``stores`` the named ones the members fuse."""
        tables = {}
        for n in self._used():
            tables[n] = self.members[n].predict_store(
                store, images, batch_size, allow_missing=allow_missing, stores=stores
            )
        return self._combine(tables, images)


__all__ = ["ENSEMBLE_FILE", "EnsembleAffectModel", "combine_tables", "is_ensemble", "save_ensemble"]
