"""What makes a run resumable and checkable: its inputs' identity and the per-epoch training state.

Files in a run folder (never a pickle; Lightning's ``.ckpt`` is not used)::

    run.json                   inputs of the run: the store (path, images_sha256, backbone fingerprint)
                               and each annotation split (source file, its sha256, a content sha256)
    state/state.json           scalars: stage index/name, epochs finished in the stage, whether the stage
                               is done, selection (best score/epoch, epochs without improvement),
                               history so far, finished stages' summaries, optimizer hyper-parameters,
                               scheduler state, Python and NumPy RNG states
    state/state.safetensors    tensors: ``model.<name>`` (every weight), ``optim.<param>.<key>``
                               (AdamW moments and steps), ``rng.torch`` / ``rng.cuda.<i>`` (uint8)

``state/`` is rewritten after every epoch as a whole folder (written beside it, then swapped in), so
an interruption leaves the previous epoch's state or the new one. Each stage is seeded from
``(seed, stage index)`` (:func:`stage_seed`), and the RNG states are restored on resume, so a resumed
run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mtaffect.data.annotations import LabelTable
from mtaffect.features.reader import StoreSet, store_images_sha256
from mtaffect.features.store import FeatureStore
from mtaffect.models.checkpoint import load_weights
from mtaffect.persist import (
    RUN,
    TRAIN_STATE,
    atomic_folder,
    check_header,
    header,
    previous_dir,
    read_header_file,
    read_json,
    write_json,
)

RUN_FILE = str(RUN.marker)
STATE_DIR = "state"
STATE_JSON = str(TRAIN_STATE.marker)
STATE_TENSORS = "state.safetensors"


class ResumeError(ValueError):
    """``--resume`` asked of a run folder that cannot be continued with these inputs."""


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage ``stage`` of a run seeded with ``seed`` (independent streams per stage)."""
    return int(np.random.SeedSequence([int(seed), int(stage)]).generate_state(1)[0])


# ---- the run's inputs ------------------------------------------------------------------------------
def labels_digest(table: LabelTable) -> str:
    """sha256 of a label table's content (images and every label, in order), whatever file it came from."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, table.images)).encode("utf-8"))
    for arr in (table.valence, table.arousal, table.expression, table.aus):
        h.update(np.ascontiguousarray(np.asarray(arr, dtype=np.float64)).tobytes())
    return h.hexdigest()


def _labels_identity(table: LabelTable | None) -> dict | None:
    if table is None:
        return None
    src = table.source
    out: dict[str, Any] = {
        "source": str(src) if src else None,
        "rows": len(table),
        "content_sha256": labels_digest(table),
    }
    if src and Path(src).is_file():
        from mtaffect.features.hf import file_sha256  # memoised per (path, size, mtime)

        out["file_sha256"] = file_sha256(src)
    return out


def data_source(data: FeatureStore | StoreSet | Path, stores: StoreSet | None = None) -> dict:
    """What ``run.json`` records of the training inputs: a store's images_sha256 and fingerprint, or
    for training from images the dataset root (its images are named by the annotations, whose content
    hashes are recorded too; the backbone is part of the config, which resume compares). Named stores
    (a :class:`StoreSet`'s, or ``stores`` beside the images) are recorded under ``stores`` the same way."""
    named: dict[str, dict] = {}
    if isinstance(data, StoreSet):
        named = {k: v for k, v in data.identity().items() if k}
        data = data.main
    if stores is not None:
        named.update({k: v for k, v in stores.identity().items() if k})
    out: dict[str, Any]
    if isinstance(data, FeatureStore):
        out = {
            "path": str(data.path),
            "images_sha256": store_images_sha256(data),
            "fingerprint": data.fingerprint,
        }
    else:
        out = {"path": str(data), "images_sha256": None, "fingerprint": None}
    if named:
        out["stores"] = named
    return out


def run_identity(source: dict, train: LabelTable, val: LabelTable | None) -> dict:
    """What ``run.json`` records: the inputs (:func:`data_source`) and the annotation splits."""
    return {"store": source, "train": _labels_identity(train), "val": _labels_identity(val)}


def _describe_labels(d: dict | None) -> str:
    if d is None:
        return "none"
    src = d.get("source") or "(in memory)"
    return f"{src} ({d['rows']} rows, content sha256 {d['content_sha256'][:16]}…)"


def check_identity(saved: dict, now: dict, out: Path) -> None:
    """Refuse to continue a run with other inputs; the message names the recorded and the given ones."""
    hint = "resume with the same --features and --data, or start a new run (another --out, or --overwrite)"
    a, b = saved.get("store", {}), now["store"]
    if a.get("images_sha256") != b["images_sha256"] or a.get("fingerprint") != b["fingerprint"]:
        raise ResumeError(
            f"{out} was trained on {a.get('path')} (images_sha256 {a.get('images_sha256')}, "
            f"fingerprint {a.get('fingerprint')}); this call gives {b['path']} (images_sha256 "
            f"{b['images_sha256']}, fingerprint {b['fingerprint']}); {hint}"
        )
    sa, sb = a.get("stores") or {}, b.get("stores") or {}
    for key in sorted(set(sa) | set(sb)):
        x, y = sa.get(key), sb.get(key)
        if (
            x is None
            or y is None
            or x.get("images_sha256") != y.get("images_sha256")
            or x.get("fingerprint") != y.get("fingerprint")
        ):
            said = "none" if x is None else f"{x.get('path')} (fingerprint {x.get('fingerprint')})"
            given = "none" if y is None else f"{y.get('path')} (fingerprint {y.get('fingerprint')})"
            raise ResumeError(
                f"{out} was trained with store {key!r} = {said}; this call gives {given}; resume with the "
                "same --features NAME=STORE options, or start a new run (another --out, or --overwrite)"
            )
    for split, what in (("train", "training"), ("val", "validation")):
        x, y = saved.get(split), now[split]
        if (x is None) != (y is None) or (x and y and x["content_sha256"] != y["content_sha256"]):
            raise ResumeError(
                f"{out} was trained with {what} annotations {_describe_labels(x)}; this call gives "
                f"{_describe_labels(y)}; the content sha256 differ; {hint}"
            )


def read_run(out: Path) -> dict | None:
    """The checked ``run.json`` of the run folder ``out`` (None when there is none)."""
    p = out / RUN_FILE
    if not p.is_file():
        return None
    return read_header_file(p, RUN, ResumeError)


def write_run(out: Path, identity: dict) -> None:
    write_json(out / RUN_FILE, {**header(RUN), **identity})


# ---- RNG -------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy RNG states, torch RNG states as uint8 tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    scalars = {
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return scalars, tensors


def restore_rng(scalars: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [
        tensors[k]
        for k in sorted(
            (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
        )
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---- optimizer state dicts -------------------------------------------------------------------------
def _split_optimizer(sd: Mapping[str, Any]) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "state": scalars}, tensors


def _join_optimizer(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- the per-epoch state ---------------------------------------------------------------------------
@dataclass
class EpochState:
    """Everything needed to continue a run after the last finished epoch."""

    stage: int  # index into the recipe's stages
    stage_name: str
    epoch: int  # epochs finished in this stage
    stage_done: bool  # the stage ended (epochs or early stopping); the weights are its selected ones
    model: dict[str, torch.Tensor]
    optimizer: dict | None = None  # torch state_dict (None once the stage is done)
    scheduler: dict | None = None
    selection: dict = field(default_factory=dict)  # best_score, best_epoch, wait, best_metrics
    history: list[dict] = field(default_factory=list)  # every epoch of the run so far
    stages: list[dict] = field(default_factory=list)  # summaries of the stages finished so far
    rng: tuple[dict, dict[str, torch.Tensor]] | None = None  # capture_rng() at the end of the epoch

    def save(self, out: Path) -> None:
        """Write ``out/state/`` (replacing the previous epoch's as a whole)."""
        tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in self.model.items()}
        optim_meta = None
        if self.optimizer is not None:
            optim_meta, optim_tensors = _split_optimizer(self.optimizer)
            tensors.update(optim_tensors)
        rng_scalars = None
        if self.rng is not None:
            rng_scalars, rng_tensors = self.rng
            tensors.update(rng_tensors)
        meta = {
            **header(TRAIN_STATE),
            "stage": self.stage,
            "stage_name": self.stage_name,
            "epoch": self.epoch,
            "stage_done": self.stage_done,
            "selection": self.selection,
            "history": self.history,
            "stages": self.stages,
            "optimizer": optim_meta,
            "scheduler": self.scheduler,
            "rng": rng_scalars,
        }
        with atomic_folder(out / STATE_DIR, TRAIN_STATE, overwrite=True) as tmp:
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": TRAIN_STATE.name})
            write_json(tmp / STATE_JSON, meta)

    @classmethod
    def load(cls, out: Path) -> EpochState | None:
        """The last saved state of the run in ``out`` (None when it has none)."""
        folder = out / STATE_DIR
        if not (folder / STATE_JSON).is_file() and (prev := previous_dir(folder)) is not None:
            folder = prev  # interrupted while swapping: the previous epoch's state
        if not (folder / STATE_JSON).is_file():
            return None
        try:
            meta = read_json(folder / STATE_JSON, TRAIN_STATE.what, ResumeError)
            tensors = load_weights(folder / STATE_TENSORS, hint=None)
        except (OSError, ValueError) as exc:  # a damaged file included (CheckpointError)
            raise ResumeError(
                f"{folder}: the training state cannot be read ({exc}); start over with --overwrite"
            ) from exc
        check_header(meta, TRAIN_STATE, folder / STATE_JSON, ResumeError)  # a newer one: upgrade, not redo
        model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        optimizer = None if meta["optimizer"] is None else _join_optimizer(meta["optimizer"], tensors)
        rng = None
        if meta["rng"] is not None:
            rng = (meta["rng"], {k: v for k, v in tensors.items() if k.startswith("rng.")})
        return cls(
            stage=int(meta["stage"]),
            stage_name=meta["stage_name"],
            epoch=int(meta["epoch"]),
            stage_done=bool(meta["stage_done"]),
            model=model,
            optimizer=optimizer,
            scheduler=meta["scheduler"],
            selection=meta["selection"],
            history=meta["history"],
            stages=meta.get("stages", []),
            rng=rng,
        )


__all__ = [
    "EpochState",
    "ResumeError",
    "capture_rng",
    "check_identity",
    "data_source",
    "labels_digest",
    "read_run",
    "restore_rng",
    "run_identity",
    "stage_seed",
    "write_run",
]
