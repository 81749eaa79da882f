"""Which model a name means: the one parse of every model name a user can type (imports no torch).

A model name is one of::

    default                    the embedded default model (also None)
    emotiefflib:<model>        an EmotiEffLib ONNX network (a known name or a local .onnx file)
    <checkpoint folder>        config.json + model.safetensors (mtaffect.models.checkpoint)
    <ensemble folder>          ensemble.json: one model per task (mtaffect.models.ensemble)
    <export folder>            export.json: ONNX graphs for onnxruntime (mtaffect export)
    <run folder>, run:<folder> a training run: its selected model, best/ (a checkpoint or an ensemble)

:func:`parse_model_name` tells which, from the files alone (nothing is loaded), so the onnxruntime
engine decides without torch whether it runs an export folder or exports a model first; what each kind
can serve is :mod:`mtaffect.models.loading`'s business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from mtaffect.persist import CHECKPOINT, ENSEMBLE, EXPORT

DEFAULT: Final[str] = "default"
EMOTIEFFLIB_PREFIX: Final[str] = "emotiefflib:"
RUN_PREFIX: Final[str] = "run:"
#: The folder of a training run holding the model it selected.
RUN_BEST: Final[str] = "best"

ModelKind = Literal["default", "emotiefflib", "checkpoint", "ensemble", "export"]

#: How each kind is described in messages.
KIND_NAMES: Final[dict[str, str]] = {
    "default": "the embedded default model",
    "emotiefflib": "an EmotiEffLib network",
    "checkpoint": "a checkpoint folder",
    "ensemble": "an ensemble folder (one model per task)",
    "export": "an ONNX export folder",
}

NAMES_HELP: Final[str] = (
    "a model is 'default', emotiefflib:<model>, or a checkpoint, ensemble, export or run folder "
    "(run:<folder> names a run's best/)"
)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model name: what it is (``kind``) and where (``location``: the folder for folder kinds,
    the network's name or file for ``emotiefflib``, empty for ``default``); ``name`` as typed."""

    kind: ModelKind
    location: str
    name: str

    @property
    def path(self) -> Path:
        """The folder of a folder kind."""
        return Path(self.location)

    def describe(self) -> str:
        """E.g. ``runs/x/best (a checkpoint folder)``, for messages."""
        what = KIND_NAMES[self.kind]
        return what if self.kind == "default" else f"{self.name} ({what})"


def parse_model_name(name: str | os.PathLike | None) -> ModelRef:
    """Which model ``name`` means (see the module docstring), from its files; nothing is loaded.

    Args:
        name: what the user typed (None: the default model).

    Returns:
        The kind and location of the model.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: ``emotiefflib:`` or ``run:`` without a name, or a folder that holds no model.
    """
    text = DEFAULT if name is None else os.fspath(name)
    if text == DEFAULT:
        return ModelRef("default", "", DEFAULT)
    if text.startswith(EMOTIEFFLIB_PREFIX):
        model = text[len(EMOTIEFFLIB_PREFIX) :]
        if not model:
            raise ValueError(f"{text!r}: name the network, e.g. emotiefflib:enet_b0_8_va_mtl")
        return ModelRef("emotiefflib", model, text)
    run = text.startswith(RUN_PREFIX)
    folder = Path(text[len(RUN_PREFIX) :] if run else text).expanduser()
    if run and not text[len(RUN_PREFIX) :]:
        raise ValueError(f"{text!r}: a trained model is named run:<run folder or checkpoint folder>")
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: model not found (no such folder); {NAMES_HELP}")
    kind = _folder_kind(folder)
    if kind is None and (folder / RUN_BEST).is_dir():  # a run folder: the model it selected
        folder = folder / RUN_BEST
        kind = _folder_kind(folder)
    if kind is None:
        raise ValueError(
            f"{folder} is not a model folder (no {CHECKPOINT.marker}, {ENSEMBLE.marker} or {EXPORT.marker}, "
            f"and no {RUN_BEST}/ of a run); {NAMES_HELP}. Train one with mtaffect train --out ..."
        )
    return ModelRef(kind, str(folder), text)


def _folder_kind(folder: Path) -> ModelKind | None:
    """The kind of model folder ``folder`` is, by the files that mark each format (a checkpoint missing
    one of its two files is still a checkpoint: reading it says which file is missing)."""
    if not folder.is_dir():
        return None
    if (folder / str(EXPORT.marker)).is_file():
        return "export"
    if (folder / str(ENSEMBLE.marker)).is_file():
        return "ensemble"
    if any((folder / m).is_file() for m in CHECKPOINT.members or ()):
        return "checkpoint"
    return None


__all__ = ["DEFAULT", "EMOTIEFFLIB_PREFIX", "RUN_PREFIX", "ModelKind", "ModelRef", "parse_model_name"]
