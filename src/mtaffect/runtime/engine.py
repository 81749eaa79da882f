"""Run an export folder with onnxruntime: MTCNN, alignment and the face model, without torch.

:class:`Runtime` opens a folder written by ``mtaffect export``: :meth:`Runtime.detector` is the MTCNN
cascade of :mod:`mtaffect.faces.cascade` driven by the exported nets (:class:`OrtNets`), faces are
aligned and resized by the same functions as ``mtaffect predict`` (``faces.align.align_faces_fast``,
``features.decode.resize_array``), and :class:`ExportedFaceModel` runs the face graph (pixels ->
probabilities and backbone outputs) or its heads alone (backbone outputs -> probabilities, for temporal
models over face tracks). Everything returns numpy arrays and :class:`~mtaffect.models.outputs.AffectOutputs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtaffect.faces.align import align_faces_fast
from mtaffect.faces.cascade import (
    ONET_BYTES,
    PNET_BYTES_PER_PIXEL,
    RNET_BYTES,
    Cascade,
    FaceDetections,
    as_frames,
    chunk_items,
    chunks,
    normalise,
    resize_bilinear,
)
from mtaffect.features.decode import resize_array
from mtaffect.models.outputs import AffectOutputs
from mtaffect.runtime.manifest import ExportError, read_manifest

#: Precisions a face model may be exported in (``--quantize`` adds int8).
PRECISIONS: tuple[str, str] = ("float32", "int8")
_PROBS = ("expr_probs", "au_probs", "va")


def make_session(path: Path, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session on ``path``.

    ``threads``: intra-op threads (None: onnxruntime's default, one per physical core). Idle pool
    threads sleep instead of spinning, which on a shared CPU (the same reason as
    ``OMP_WAIT_POLICY=PASSIVE`` for torch) is much faster. ``providers``: onnxruntime execution
    providers, default CPU (e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; a provider may
    be a ``(name, options)`` pair such as ``("CUDAExecutionProvider", {"device_id": 1})``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    names = [p if isinstance(p, str) else p[0] for p in wanted]  # a provider, or (provider, options)
    missing = [p for p in names if p not in available]
    if missing:
        raise ValueError(
            f"onnxruntime has no {', '.join(missing)} here (available: {', '.join(available)}); "
            "install the matching onnxruntime build (e.g. onnxruntime-gpu) or use the CPU"
        )
    try:
        return ort.InferenceSession(str(path), opts, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot load it ({exc}); export again") from exc


class OrtNets:
    """MTCNN's P-, R- and O-Net run by onnxruntime (see :class:`mtaffect.faces.cascade.CascadeNets`).

    Each net runs a cache-sized chunk of frames or crops at a time (as the PyTorch engine does on CPU):
    the same outputs, and memory bounded however many candidate windows P-Net proposes (all at once,
    16 frames of 640x480 took ~450 MB more at their peak)."""

    def __init__(self, pnet, rnet, onet, chunked: bool = True) -> None:
        self.p, self.r, self.o = pnet, rnet, onet
        self.chunked = chunked  # False: one call per batch (accelerators)

    def _run(self, session, name: str, x: np.ndarray, bytes_per_item: int) -> list[np.ndarray]:
        step = chunk_items(bytes_per_item) if self.chunked else len(x)
        outs = [session.run(None, {name: np.ascontiguousarray(x[sl])}) for sl in chunks(len(x), step)]
        if len(outs) == 1:
            return outs[0]
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    def pnet(
        self, frames: np.ndarray, sizes: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for hs, ws in sizes:
            x = normalise(resize_bilinear(frames, (hs, ws)))
            prob, offsets = self._run(self.p, "image", x, PNET_BYTES_PER_PIXEL * (hs - 2) * (ws - 2))
            yield prob, offsets

    def rnet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prob, offsets = self._run(self.r, "crops", crops, RNET_BYTES)
        return prob, offsets

    def onet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prob, offsets, marks = self._run(self.o, "crops", crops, ONET_BYTES)
        return prob, offsets, marks


class ExportedFaceModel:
    """The exported face model: uint8 faces -> probabilities, like a ``FaceAffectModel`` with its backbone.

    :meth:`run` takes faces as :meth:`prepare` makes them and returns probabilities plus the backbone
    arrays (``features`` for trackers); :meth:`predict` runs the heads alone on backbone arrays, with
    the semantics of ``FaceAffectModel.predict``: N rows, or for temporal models one sequence (1, T, ...).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], face, head) -> None:
        info = manifest["face_model"]
        pre = manifest["preprocessing"]
        self.folder = folder
        self.manifest = manifest
        self._face, self._head = face, head
        self.size = int(pre["resize"]["size"])
        self.colour: str = pre["colour"]
        self.channels = 1 if self.colour == "L" else 3
        self.temporal = bool(info["temporal"])
        self.window: int | None = info.get("window")
        self.outputs: tuple[str, ...] = tuple(info["outputs"])
        self.reads: tuple[str, ...] = tuple(info["head_inputs"])
        # ndim of a (batch, window, ...) array of the first array the heads read (temporal models)
        self._window_ndim = len(info["head_inputs"][self.reads[0]]["shape"])
        self.backbone: str = info["backbone"]["name"]
        self.au_thresholds = np.asarray(manifest["postprocessing"]["au_thresholds"], np.float64)
        #: "expression" for AUs read off the expressions (exports before this field: the model's own)
        self.au_source: str = manifest["postprocessing"].get("au_source", "model")

    def prepare(self, faces: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Aligned uint8 RGB crops (any square size, usually 112) -> the graph's (N, S, S, C) input."""
        out = [resize_array(f, self.size, self.colour) for f in faces]
        shape = (self.size, self.size, self.channels)
        if not out:
            return np.zeros((0, *shape), np.uint8)
        return np.stack(out).reshape(len(out), *shape)

    def run(self, pixels: np.ndarray) -> tuple[AffectOutputs, dict[str, np.ndarray]]:
        """(N, S, S, C) faces — or (N, T, S, S, C) windows for temporal models — -> probabilities and
        the backbone arrays (same leading axes). A temporal model given (N, S, S, C) treats each face
        as a sequence of one frame, as the PyTorch model does."""
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        single = self.temporal and x.ndim == 4
        if single:
            x = x[:, None]
        want, c = (5 if self.temporal else 4), self.channels
        if x.ndim != want or x.shape[-3:] != (self.size, self.size, c):
            raise ValueError(
                f"the face model takes uint8 faces (N{', T' if self.temporal else ''}, {self.size}, "
                f"{self.size}, {c}) from prepare(), got {pixels.shape}"
            )
        self._check_window(x.shape[1] if self.temporal else None)
        if len(x) == 0:  # no face: empty arrays of the right shapes, without a session call
            lead = x.shape[:2] if self.temporal else x.shape[:1]
            shapes = self.manifest["face_model"]["outputs"]
            got = {k: np.zeros((*lead, *shapes[k]["shape"][len(lead) :]), np.float32) for k in self.outputs}
        else:
            got = dict(zip(self.outputs, self._face.run(list(self.outputs), {"pixels": x}), strict=True))
        if single:
            got = {k: v[:, 0] for k, v in got.items()}
        probs = AffectOutputs(got["va"], got["expr_probs"], got["au_probs"])
        return probs, {k: v for k, v in got.items() if k not in _PROBS}

    def _check_window(self, t: int | None) -> None:
        if self.window is not None and t is not None and t != self.window:
            raise ValueError(
                f"this export has a fixed window of {self.window} frames, got {t}; single faces and other "
                "window lengths need an export with a dynamic window (mtaffect export without --window)"
            )

    def predict(
        self, features: np.ndarray, logits: np.ndarray | None = None, tokens: np.ndarray | None = None
    ) -> AffectOutputs:
        """Backbone arrays -> probabilities (the heads of the face graph; temporal models only, whose
        exports carry ``head.onnx``: other models get everything from :meth:`run`)."""
        if self._head is None:
            raise ValueError(
                f"{self.folder} has no head graph: only temporal models need one; use run() on faces"
            )
        given = {"features": features, "logits": logits, "tokens": tokens}
        feeds = {}
        for name in self.reads:
            if given[name] is None:
                raise ValueError(f"this model reads {name!r} from the backbone; pass {name}=...")
            feeds[name] = np.ascontiguousarray(given[name], np.float32)
        first = feeds[self.reads[0]]
        one_sequence = self.temporal and first.ndim == self._window_ndim and first.shape[0] == 1
        if self.temporal and not one_sequence:  # N rows: N sequences of one frame
            feeds = {k: v[:, None] for k, v in feeds.items()}
        self._check_window(feeds[self.reads[0]].shape[1] if self.temporal else None)
        expr, au, va = self._head.run(list(_PROBS), feeds)
        if self.temporal:
            expr, au, va = (a[0] if one_sequence else a[:, 0] for a in (expr, au, va))
        return AffectOutputs(va, expr, au)


class Runtime:
    """An export folder opened with onnxruntime: detector, alignment and face model.

    ``precision``: "float32" or "int8" (exported with ``--quantize``); None takes int8 when the folder
    has it. ``threads``/``providers``: see :func:`make_session`. ``verify`` checks every file's sha256.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        precision: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        info = self.manifest["face_model"]
        if precision is None:
            precision = "int8" if info.get("int8_file") else "float32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "int8" and not info.get("int8_file"):
            raise ValueError(f"{self.folder} has no int8 face model; export it with --quantize")
        self.precision = precision
        self._threads, self._providers = threads, providers
        face = self._session(info["int8_file"] if precision == "int8" else info["file"])
        head = self._session(info["head_file"]) if info.get("head_file") else None
        self.model = ExportedFaceModel(self.folder, self.manifest, face, head)
        self._nets: OrtNets | None = None

    def _session(self, name: str):
        return make_session(self.folder / name, self._threads, self._providers)

    @property
    def nets(self) -> OrtNets:
        """The MTCNN nets (sessions opened on first use)."""
        if self._nets is None:
            det = self.manifest.get("detector")
            if det is None:
                raise ExportError(
                    f"{self.folder} was exported without MTCNN (--no-detector); export it again"
                )
            first = (self._providers or ["CPUExecutionProvider"])[0]
            on_cpu = (first if isinstance(first, str) else first[0]) == "CPUExecutionProvider"
            pnet, rnet, onet = (self._session(det["files"][k]) for k in ("pnet", "rnet", "onet"))
            self._nets = OrtNets(pnet, rnet, onet, chunked=on_cpu)
        return self._nets

    def detector(
        self,
        min_face_size: float = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        batch_size: int = 32,
    ) -> Cascade:
        """MTCNN with the exported nets: the same ``detect``/``refine`` as ``mtaffect.faces.MTCNN``."""
        return Cascade(self.nets, min_face_size, thresholds, factor, batch_size)

    def faces(self, image: np.ndarray, detections: FaceDetections, size: int = 112) -> np.ndarray:
        """The model's input for the detected faces of one image: aligned, resized (k, S, S, C) uint8."""
        return self.model.prepare(align_faces_fast(image, detections.landmarks, size))

    def analyse(self, image: np.ndarray, min_face_size: float = 20) -> tuple[FaceDetections, AffectOutputs]:
        """Detect, align and predict every face of one uint8 RGB (H, W, 3) image."""
        (frame,) = as_frames(image)
        (found,) = self.detector(min_face_size=min_face_size).detect(frame)
        probs, _ = self.model.run(self.faces(frame, found))
        return found, probs


def load(folder: str | os.PathLike, **kwargs) -> Runtime:
    """Open an export folder (see :class:`Runtime` for the options)."""
    return Runtime(folder, **kwargs)
