"""The networks behind the prediction pipeline: one interface, two engines (PyTorch and onnxruntime).

:class:`~mtaffect.predict.pipeline.Predictor` is one pipeline: sources, detection schedule, filtering,
alignment, tracking and re-identification, head pose, temporal windows, smoothing, outputs and resumable
jobs are the same code whichever engine runs the networks. An :class:`Engine` gives it only what needs
weights: MTCNN's nets (both engines drive the one numpy cascade of :mod:`mtaffect.faces.cascade`), the
face model (backbone + heads) on backbone-ready crops, and, for temporal models, the heads alone on a
window of a track's backbone arrays.

- ``torch`` (:mod:`mtaffect.predict.torch_engine`): the embedded default model, a trained checkpoint or
  ``emotiefflib:<model>``, on a torch device.
- ``onnxruntime`` (:class:`OnnxEngine`): an export folder of ``mtaffect export`` run by
  :mod:`mtaffect.runtime`. Neither this module nor anything the pipeline imports on this path loads
  torch, so ``mtaffect predict --engine onnxruntime`` runs where torch is not installed. Given a model
  rather than an export folder (``default``, a checkpoint), the engine exports it first into a temporary
  folder (needs torch and the ``export`` extra; 10-30 s, the same checks as ``mtaffect export``) and
  removes it when the engine is garbage-collected: export once with ``mtaffect export`` to skip that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from mtaffect.faces.cascade import Cascade
from mtaffect.models.names import parse_model_name
from mtaffect.models.outputs import AffectOutputs
from mtaffect.predict.threads import resolve_threads

ENGINES: Final[tuple[str, str]] = ("torch", "onnxruntime")


class Detector(Protocol):
    """MTCNN as the pipeline calls it (:class:`mtaffect.faces.cascade.Cascade` for both engines)."""

    def detect(self, images) -> list: ...

    def refine(self, image: np.ndarray, boxes: np.ndarray): ...


class Engine(Protocol):
    """What the pipeline needs from the networks.

    ``input_size``/``colour``: what :func:`mtaffect.features.decode.resize_array` makes of an aligned face
    for this model. ``temporal``/``window``/``inputs``: a temporal model's training window and the
    backbone arrays its heads read (:class:`mtaffect.predict.temporal.TrackWindows` drives it through
    :meth:`predict`). ``model``: the engine's model object (``Predictor.model``).
    """

    name: str
    model: Any
    input_size: int
    colour: str
    temporal: bool
    window: int
    inputs: tuple[str, ...]
    num_threads: int | None  # the resolved thread count (None: the library's own setting)

    @property
    def au_thresholds(self) -> np.ndarray: ...

    @property
    def au_source(self) -> str:
        """ "expression": the model's AUs are priors read off its expressions (combined with the face's
        blendshape evidence when the landmarker runs); "model": its own AU outputs."""
        ...

    def running(self) -> AbstractContextManager:
        """Held while the pipeline's code runs (torch: its thread count), released between batches."""
        ...

    def detector(self, min_face_size: float, batch_size: int) -> Detector: ...

    def heads(self, faces: np.ndarray) -> AffectOutputs:
        """Per-frame models: backbone-ready faces (n, S, S[, 3]) uint8 -> their probabilities."""
        ...

    def embed(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        """Temporal models: backbone-ready faces -> the backbone arrays ("features", ...) per face."""
        ...

    def predict(self, features, logits=None, tokens=None) -> AffectOutputs:
        """The heads on backbone arrays: N rows, or one (1, T, ...) window for temporal models."""
        ...

    def describe(self) -> dict:
        """What determines the rows (a resumed job must see the same)."""
        ...

    def card(self) -> dict[str, str]:
        """The model card lines of the report."""
        ...


def providers_for(device: str) -> list:
    """onnxruntime execution providers for a ``--device``: cpu, or cuda / cuda:N (then the CPU for what
    CUDA does not run). A clear ValueError for anything else."""
    name = str(device)
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2] or "0"
        if not index.isdigit():
            raise ValueError(f"device {device!r}: use cuda or cuda:N")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise ValueError(f"device {device!r}: the onnxruntime engine runs on cpu, cuda or cuda:N")


def check_device(engine: str, device: str) -> None:
    """Fail before any work on an engine or device that cannot run here (the CLI calls it first)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "torch":
        from mtaffect.predict.torch_engine import torch_device

        torch_device(device)
        return
    wanted = providers_for(device)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ValueError(
            "--engine onnxruntime needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)"
        ) from e
    names = [p if isinstance(p, str) else p[0] for p in wanted]
    missing = [p for p in names if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(
            f"device {device!r}: onnxruntime has no {', '.join(missing)} here (available: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use --device cpu"
        )


def is_export_folder(model) -> bool:
    from mtaffect.runtime.manifest import MANIFEST

    return isinstance(model, str | os.PathLike) and (Path(model) / MANIFEST).is_file()


class OnnxEngine:
    """An export folder (``mtaffect export``) run by onnxruntime; see the module docstring.

    ``model``: an export folder, or what ``mtaffect export --model`` takes ("default"/None, a
    checkpoint, a loaded model), exported first into a temporary folder. ``precision``: "float32" (the
    default) or "int8" (an export made with ``--quantize``: a smaller file, but on the CPUs measured
    slower and less exact than float32, docs/benchmarks.md, so only when asked).
    ``num_threads``: onnxruntime's intra-op threads ("auto": every core but one, which decodes video;
    None: onnxruntime's default). ``batch_size``: faces per face-graph call. ``detector``: whether
    MTCNN is needed (an export made here leaves it out for aligned faces).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model=None,
        device: str = "cpu",
        num_threads: int | str | None = "auto",
        batch_size: int = 64,
        precision: str | None = "float32",
        detector: bool = True,
    ) -> None:
        from mtaffect.runtime import Runtime

        check_device("onnxruntime", device)
        self.num_threads = resolve_threads(num_threads)
        self.exported_here = not is_export_folder(model)
        folder = self._export(model, detector) if self.exported_here else Path(model)
        self.runtime = Runtime(
            folder, precision or "float32", threads=self.num_threads, providers=providers_for(device)
        )
        self.folder, self.manifest = self.runtime.folder, self.runtime.manifest
        self.model = self.runtime.model
        self.input_size, self.colour = self.model.size, self.model.colour
        self.channels = 1 if self.colour == "L" else 3
        self.batch_size = int(batch_size)
        self.temporal = self.model.temporal
        self.inputs = self.model.reads
        self.window = self._training_window() if self.temporal else 1
        self.window_edge = str((self.manifest.get("source") or {}).get("window_edge", "pad"))

    def _export(self, model, detector: bool) -> Path:
        """``model`` exported into a temporary folder that lives as long as this engine."""
        if model is None or isinstance(model, str | os.PathLike):
            parse_model_name(model)  # a name that means no model fails before the export extra is asked for
        try:
            from mtaffect.export.exporter import export_model
        except ImportError as e:
            raise ValueError(
                f"--engine onnxruntime runs an export folder; {model or 'default'} is a model, and exporting "
                "it here needs torch and the export extra (pip install 'mtaffect[export]'). Export it "
                "where torch is installed: mtaffect export --model ... --out DIR, then --model DIR"
            ) from e
        tmp = Path(tempfile.mkdtemp(prefix="mtaffect-export-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
        try:
            export_model("default" if model is None else model, tmp / "export", detector=detector)
        except BaseException:
            self._cleanup()
            raise
        return tmp / "export"

    def _training_window(self) -> int:
        fixed = self.model.window
        trained = (self.manifest.get("source") or {}).get("training_window")
        window = fixed or trained
        if not window:
            raise ValueError(
                f"{self.folder}: a temporal model whose export does not say its training window; export "
                "it again with mtaffect export (or --window T)"
            )
        return int(window)

    @property
    def au_thresholds(self) -> np.ndarray:
        return np.asarray(self.model.au_thresholds, np.float64)

    @property
    def au_source(self) -> str:
        return self.model.au_source

    def running(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # the sessions' threads are set when they are opened

    def detector(self, min_face_size: float, batch_size: int) -> Cascade:
        return self.runtime.detector(min_face_size=min_face_size, batch_size=batch_size)

    def _pixels(self, faces: np.ndarray) -> np.ndarray:
        n, s = len(faces), self.input_size
        return np.ascontiguousarray(faces, np.uint8).reshape(n, s, s, self.channels)

    def _run(self, faces: np.ndarray) -> tuple[AffectOutputs, dict[str, np.ndarray]]:
        """The face graph over ``faces`` in batches; a fixed-window temporal export gets them in groups
        of its window (the backbone arrays are per frame; its probabilities are not used then)."""
        x = self._pixels(faces)
        fixed = self.model.window if self.temporal else None
        parts = []
        for s in range(0, len(x), self.batch_size):
            b = x[s : s + self.batch_size]
            if fixed:
                n = len(b)
                pad = -n % fixed
                b = np.concatenate([b, np.repeat(b[-1:], pad, 0)]).reshape(-1, fixed, *b.shape[1:])
                probs, arrays = self.model.run(b)
                arrays = {k: v.reshape(-1, *v.shape[2:])[:n] for k, v in arrays.items()}
            else:
                probs, arrays = self.model.run(b)
            parts.append((probs, arrays))
        if not parts:
            return self.model.run(x)
        cat = np.concatenate
        probs = AffectOutputs(
            *(cat([getattr(p, k) for p, _ in parts]) for k in ("va", "expr_probs", "au_probs"))
        )
        return probs, {k: cat([a[k] for _, a in parts]) for k in parts[0][1]}

    def heads(self, faces: np.ndarray) -> AffectOutputs:
        return self._run(faces)[0]

    def embed(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(faces)[1]

    def predict(self, features, logits=None, tokens=None) -> AffectOutputs:
        return self.model.predict(features, logits, tokens)

    def describe(self) -> dict:
        info = self.manifest["face_model"]
        used = info["int8_file"] if self.runtime.precision == "int8" else info["file"]
        return {
            "engine": self.name,
            "precision": self.runtime.precision,
            "source": self.manifest.get("source"),
            "backbone": info["backbone"],
            # an export folder is identified by its graph; one made here, by what it was made from
            "face_model_sha256": None if self.exported_here else self.manifest["files"][used]["sha256"],
        }

    def card(self) -> dict[str, str]:
        source = self.manifest.get("source") or {}
        where = "exported for this run" if self.exported_here else str(self.folder)
        return {
            "name": str(source.get("name") or source.get("model") or self.folder.name),
            "backbone": str(self.manifest["face_model"]["backbone"]["name"]),
            "engine": f"onnxruntime ({self.runtime.precision}), {where}",
        }


def create_engine(engine: str = "torch", model=None, **options) -> Engine:
    """The engine ``engine`` ("torch" or "onnxruntime") for ``model`` (see the module docstring).

    ``options``: ``device``, ``num_threads``, ``batch_size``, and for onnxruntime ``precision`` and
    ``detector`` (False: faces come aligned, MTCNN is not needed); see the engines' classes."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "onnxruntime":
        return OnnxEngine(model, **options)
    precision = options.pop("precision", None)
    if precision not in (None, "float32"):
        raise ValueError(f"precision {precision!r} is for the onnxruntime engine (an export with --quantize)")
    options.pop("detector", None)
    from mtaffect.predict.torch_engine import TorchEngine

    return TorchEngine(model, **options)


__all__ = ["ENGINES", "Engine", "OnnxEngine", "check_device", "create_engine", "providers_for"]
