"""The prediction pipeline: frames -> faces (MTCNN, tracking) -> aligned crops -> backbone -> heads -> table.

Per input, frames stream through in chunks of ``chunk_frames``: detection runs on the whole chunk at
once (MTCNN batches same-sized frames), every face of the chunk is aligned and goes through the backbone
and the model's heads in one batch, then the tracker gives ids frame by frame. Nothing but the output
rows is kept, so memory is flat in the video's length. With ``detect_every=k`` the full detector runs on
every k-th analysed frame and in between each face is followed by MTCNN's O-Net alone (see
:func:`~mtaffect.faces.mtcnn.MTCNN.refine`); when O-Net loses a face the frame gets a full
detection at once. Faces entering in between are picked up at the next full detection.

Faces are aligned to the 112x112 five-point template (as the s-Aff-Wild2 ``cropped_aligned`` images the
models are trained on) and then resized exactly as feature extraction does
(:func:`mtaffect.features.decode.resize_array`), so a trained checkpoint sees the pixels it was trained on.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mtaffect.faces.align import alignment_matrices, invert_affine
from mtaffect.faces.embed import appearance_embedding
from mtaffect.faces.filtering import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_NESTED_OVERLAP,
    check_filter_options,
    filter_detections,
)
from mtaffect.faces.mtcnn import MTCNN, FaceDetections
from mtaffect.faces.pose import head_pose
from mtaffect.features.decode import resize_array
from mtaffect.features.registry import create_backbone
from mtaffect.models.base import FaceAffectModel
from mtaffect.predict.outputs import (
    AU_P_COLUMNS,
    EXPR_P_COLUMNS,
    VA_COLUMNS,
    TableBuilder,
    empty_table,
    finalize,
    to_prediction_table,
)
from mtaffect.predict.sources import InputError, MediaSource, SourceInfo, expand_inputs, open_source, prefetch
from mtaffect.predict.threads import resolve_threads, streaming_threads, torch_threads
from mtaffect.predict.tracking import DEFAULT_REID_SECONDS, TRACK_MEMORY_S, CutDetector, FaceTracker
from mtaffect.schema import AU_PROB_COLUMNS, EXPR_PROB_COLUMNS

SMOOTHING: Final[tuple[str, ...]] = ("none", "causal", "centred")
ALIGN_SIZE: Final[int] = 112
#: Smallest face searched for, as a fraction of the frame's shorter side, when min_face_size="auto".
AUTO_FACE_FRACTION: Final[float] = 1 / 30


@dataclass
class FileResult:
    """What one input produced: its table (empty on failure), its description and timing."""

    info: SourceInfo
    table: pd.DataFrame
    seconds: float = 0.0
    analysed: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def fps(self) -> float:
        return self.analysed / self.seconds if self.seconds > 0 else math.nan


def load_affect_model(
    model: FaceAffectModel | str | os.PathLike | None, device: str | torch.device = "cpu"
) -> FaceAffectModel:
    """None or "default": the embedded default model; "emotiefflib:<model>": an EmotiEffLib network
    (:mod:`mtaffect.models.emotiefflib`); a path: a trained checkpoint; or a model object."""
    if model is None or (isinstance(model, str) and model == "default"):
        from mtaffect.models.default import DefaultAffectModel

        return DefaultAffectModel()
    if isinstance(model, str) and model.startswith("emotiefflib:"):
        from mtaffect.models.emotiefflib import EmotiEffLibAffectModel

        return EmotiEffLibAffectModel(model)
    if isinstance(model, str | os.PathLike):
        if not Path(model).exists():
            raise FileNotFoundError(f"{model}: model checkpoint not found (train one with `mtaffect train`)")
        try:
            from mtaffect.models.checkpoint import load_model
        except ImportError as e:  # pragma: no cover - the module ships with the package
            raise ValueError(f"cannot load {model}: mtaffect.models.checkpoint is not available ({e})") from e
        return load_model(model, device=device)
    if isinstance(model, FaceAffectModel):
        return model
    raise TypeError(
        f"model must be None, 'default', a checkpoint path or a FaceAffectModel, got {type(model).__name__}"
    )


def load_post(post):
    """None, a path to a post-processing YAML, or a PostConfig."""
    if post is None:
        return None
    if isinstance(post, str | os.PathLike):
        from mtaffect.post.config import PostConfig

        if not Path(post).is_file():
            raise FileNotFoundError(
                f"{post}: post-processing config not found (make one with `mtaffect tune`)"
            )
        return PostConfig.load(post)
    return post


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while chunk := list(islice(it, n)):
        yield chunk


class Predictor:
    """Run a face-affect model on images, folders, videos or arrays; ``predict`` returns the table.

    ``model``: None (the embedded default model), a checkpoint path, or any ``FaceAffectModel``.
    ``every``: analyse every N-th frame of videos. ``detect_every``: full detection every k analysed
    frames, O-Net tracking in between. ``max_faces``: keep the largest K faces per frame.
    ``min_face_size``: pixels, or "auto" (max(40 for video / 20 for stills, shorter side / 30)).
    ``post``: a post-processing config (path or ``PostConfig``): its smoothing kernels and AU thresholds
    replace ``smoothing`` and the model's thresholds. ``smoothing``: per face track, "causal" (past
    frames only, for live use) or "centred", a Gaussian with sigma ``smoothing_seconds``.
    ``min_confidence`` / ``nested_overlap``: drop detections below that face probability / lying that
    much inside a larger face (None keeps them; see :mod:`mtaffect.faces.filtering`).
    ``reid_memory``: seconds a face that left (or was cut away from) is remembered and re-identified by
    appearance when it returns (0: off; see :mod:`mtaffect.predict.tracking`).
    ``num_threads``: torch threads while this predictor runs ("auto": every core but one, the caller's
    setting restored afterwards; None: torch's setting as is; see :mod:`mtaffect.predict.threads`).
    """

    def __init__(
        self,
        model: FaceAffectModel | str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        detect_every: int = 1,
        max_faces: int | None = None,
        min_face_size: float | str = "auto",
        every: int = 1,
        post=None,
        smoothing: str = "none",
        smoothing_seconds: float = 0.2,
        chunk_frames: int = 16,
        num_threads: int | str | None = "auto",
        decode_thread: bool = True,
        tracker: dict | None = None,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        nested_overlap: float | None = DEFAULT_NESTED_OVERLAP,
        reid_memory: float = DEFAULT_REID_SECONDS,
    ) -> None:
        for name, v in (
            ("batch_size", batch_size),
            ("detect_every", detect_every),
            ("every", every),
            ("chunk_frames", chunk_frames),
        ):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_faces is not None and max_faces < 1:
            raise ValueError(f"max_faces must be >= 1 or None, got {max_faces}")
        if smoothing not in SMOOTHING:
            raise ValueError(f"smoothing must be one of {', '.join(SMOOTHING)}, got {smoothing!r}")
        if not (min_face_size == "auto" or (isinstance(min_face_size, int | float) and min_face_size >= 12)):
            raise ValueError(
                f"min_face_size must be 'auto' or a number of pixels >= 12, got {min_face_size!r}"
            )
        check_filter_options(min_confidence, nested_overlap)
        if not reid_memory >= 0:
            raise ValueError(f"reid_memory must be >= 0 seconds (0: off), got {reid_memory}")
        self.num_threads = resolve_threads(num_threads)
        self.min_confidence, self.nested_overlap = float(min_confidence), nested_overlap
        self.reid_memory = float(reid_memory)
        self.device = torch.device(device)
        self.model = load_affect_model(model, self.device)
        self.backbone = create_backbone(self.model.backbone, **dict(self.model.backbone_kwargs))
        self.backbone.to(self.device).eval()
        spec = self.backbone.spec
        self._size, self._colour = spec.input_size, spec.colour
        self._tokens = "tokens" in tuple(getattr(self.model, "inputs", ()) or ())
        self.post = load_post(post)
        self.batch_size, self.detect_every, self.every = int(batch_size), int(detect_every), int(every)
        self.max_faces, self.min_face_size = max_faces, min_face_size
        self.smoothing, self.smoothing_seconds = smoothing, float(smoothing_seconds)
        self.chunk_frames, self.decode_thread = int(chunk_frames), decode_thread
        self.tracker_kwargs = dict(tracker or {})
        self._detectors: dict[float, MTCNN] = {}
        self.failures: list[tuple[str, str]] = []

    # ---- public API ------------------------------------------------------------------------------------

    @property
    def au_thresholds(self) -> np.ndarray:
        post_th = getattr(self.post, "au_thresholds", None) if self.post is not None else None
        return np.asarray(post_th if post_th is not None else self.model.au_thresholds, np.float64)

    def predict(self, inputs, errors: str = "raise", fps: float | None = None) -> pd.DataFrame:
        """Table for one input (image/video path, folder, (H, W, 3) or (N, H, W, 3) array) or a list.

        ``errors="raise"`` stops at the first unreadable input; ``"skip"`` warns, records it in
        ``self.failures`` and goes on. ``fps`` gives times to an in-memory clip.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        tables = []
        for res in self.iter_predict(inputs, fps=fps):
            if res.error is not None:
                if errors == "raise":
                    raise InputError(res.error)
                warnings.warn(res.error, stacklevel=2)
            elif len(res.table):
                tables.append(res.table)
        return pd.concat(tables, ignore_index=True) if tables else empty_table()

    def iter_predict(
        self,
        inputs,
        progress: Callable[[int], None] | None = None,
        fps: float | None = None,
        on_start: Callable[[SourceInfo], None] | None = None,
    ) -> Iterator[FileResult]:
        """One :class:`FileResult` per input, in order; an unreadable input yields a result with ``error``
        (and is added to ``self.failures``) instead of stopping the others."""
        self.failures = []
        for item in expand_inputs(inputs):
            name = "<array>" if isinstance(item, np.ndarray) else str(item)
            t0 = time.perf_counter()
            try:
                source = open_source(item, every=self.every, fps=fps)
                if on_start is not None:
                    on_start(source.info)
                yield self.predict_source(source, progress)
            except InputError as e:
                self.failures.append((name, str(e)))
                yield FileResult(
                    SourceInfo(name, "unknown"), empty_table(), time.perf_counter() - t0, 0, str(e)
                )

    def predict_source(
        self, source: MediaSource, progress: Callable[[int], None] | None = None
    ) -> FileResult:
        """Run the pipeline over one opened source."""
        info = source.info
        t0 = time.perf_counter()
        # Position memory TRACK_MEMORY_S, re-identification memory reid_memory, in seconds of video.
        tracker = FaceTracker.for_rate(
            info.fps, info.every, self.reid_memory, TRACK_MEMORY_S, **self.tracker_kwargs
        )
        state = _State(tracker, TableBuilder())
        frames = iter(source)
        if self.decode_thread and info.kind == "video":
            frames = prefetch(frames, depth=2 * self.chunk_frames)
        try:
            with torch_threads(self.num_threads):
                for chunk in _batched(frames, self.chunk_frames):
                    self._process_chunk(info, chunk, state)
                    if progress is not None:
                        progress(len(chunk))
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
        table = state.builder.build(self.au_thresholds)
        if tracker.aliases:  # young tracks re-identified late (see tracking.py): one id per face
            table["face_id"] = tracker.canonical(table["face_id"].to_numpy())
            table = table.sort_values(["frame", "face_id"], kind="stable", ignore_index=True)
        table = self._postprocess(table, info)
        return FileResult(info, table, time.perf_counter() - t0, state.step)

    # ---- internals -------------------------------------------------------------------------------------

    def _detector(self, height: int, width: int, still: bool) -> MTCNN:
        if self.min_face_size == "auto":
            size = float(max(20 if still else 40, round(min(height, width) * AUTO_FACE_FRACTION)))
        else:
            size = float(self.min_face_size)
        if size not in self._detectors:
            self._detectors[size] = MTCNN(
                device=self.device, min_face_size=size, batch_size=self.chunk_frames
            )
        return self._detectors[size]

    def _keep(self, d: FaceDetections) -> FaceDetections:
        d = filter_detections(d, self.min_confidence, self.nested_overlap)
        if self.max_faces is None or len(d) <= self.max_faces:
            return d
        area = (d.boxes[:, 2] - d.boxes[:, 0]) * (d.boxes[:, 3] - d.boxes[:, 1])
        sel = np.sort(np.argsort(-area, kind="stable")[: self.max_faces])
        return FaceDetections(d.boxes[sel], d.scores[sel], d.landmarks[sel])

    def _locate(self, info: SourceInfo, chunk: list, state: _State) -> list[FaceDetections]:
        """Faces per frame: full detection on detection steps, else O-Net refinement of the last boxes."""
        still = info.kind == "image"
        # A shot change gets a full detection, and the tracker is told (no id carries over by position).
        state.cuts = [False if still else state.cut_detector(fr.image) for fr in chunk]
        det_idx = [i for i in range(len(chunk)) if (state.step + i) % self.detect_every == 0 or state.cuts[i]]
        by_frame: dict[int, FaceDetections] = {}
        if det_idx:
            h, w = chunk[0].image.shape[:2]
            found = self._detector(h, w, still).detect([chunk[i].image for i in det_idx])
            by_frame = dict(zip(det_idx, found, strict=True))
        out = []
        for i, fr in enumerate(chunk):
            d = by_frame.get(i)
            if d is None:
                h, w = fr.image.shape[:2]
                det = self._detector(h, w, still)
                d = self._keep(det.refine(fr.image, state.last_boxes))  # filtered: a weak box is lost
                if len(d) < len(state.last_boxes):  # a face was lost (moved fast, or left): look again
                    d = det.detect(fr.image)[0]
            d = self._keep(d)
            state.last_boxes = d.boxes
            out.append(d)
        return out

    @torch.inference_mode()
    def _heads(self, faces: np.ndarray):
        """Aligned faces (n, S, S[, 3]) -> (features (n, D) numpy, AffectOutputs), in batches."""
        feats, va, expr, au = [], [], [], []
        for s in range(0, len(faces), self.batch_size):
            x = self.backbone.preprocess(faces[s : s + self.batch_size]).to(self.device)
            out = self.backbone(x, tokens=self._tokens)
            res = self.model.predict(out.features, out.logits, out.tokens)
            feats.append(out.features.float().cpu().numpy())
            va.append(np.asarray(res.va))
            expr.append(np.asarray(res.expr_probs))
            au.append(np.asarray(res.au_probs))
        return np.concatenate(feats), np.concatenate(va), np.concatenate(expr), np.concatenate(au)

    def _process_chunk(self, info: SourceInfo, chunk: list, state: _State) -> None:
        dets = self._locate(info, chunk, state)
        counts = np.array([len(d) for d in dets])
        frame_no = np.array([f.index for f in chunk], np.int64)
        times = np.array([f.time for f in chunk], np.float64)
        empty = counts == 0
        state.builder.add_empty(info.file, frame_no[empty], times[empty])
        if info.kind == "image":
            state.tracker.reset()  # each still is its own scene
        if counts.sum() == 0:
            for cut in state.cuts:
                state.tracker.update(np.zeros((0, 4)), cut=cut)
            state.step += len(chunk)
            return
        aligned = [
            f for fr, d in zip(chunk, dets, strict=True) for f in align_faces_fast(fr.image, d.landmarks)
        ]
        _, va, expr, au = self._heads(np.stack([resize_array(f, self._size, self._colour) for f in aligned]))
        appearance = appearance_embedding(np.stack(aligned))  # identity cues for the tracker
        ids = np.empty(counts.sum(), np.int64)
        start = 0
        for d, n, cut in zip(dets, counts, state.cuts, strict=True):
            ids[start : start + n] = state.tracker.update(d.boxes, appearance[start : start + n], cut=cut)
            start += n
        landmarks = np.concatenate([d.landmarks for d in dets])
        rep = np.repeat(np.arange(len(chunk)), counts)
        state.builder.add(
            info.file,
            frame_no[rep],
            times[rep],
            ids,
            np.concatenate([d.scores for d in dets]),
            np.concatenate([d.boxes for d in dets]),
            landmarks,
            expr,
            au,
            va,
            pose=head_pose(landmarks),
        )
        state.step += len(chunk)

    def _postprocess(self, table: pd.DataFrame, info: SourceInfo) -> pd.DataFrame:
        """Per-track smoothing (``smoothing``) or the post-processing config (its smoothing kernels and
        expression bias), on the face rows; the AU decisions and labels are then recomputed."""
        ok = table["success"] == 1
        temporal = info.kind in ("video", "array")
        if not ok.any() or (self.post is None and (self.smoothing == "none" or not temporal)):
            return table
        from mtaffect.data.predictions import PredictionTable

        pred = PredictionTable(to_prediction_table(table[ok]), source=info.file)
        if self.post is not None:
            pred = self.post.apply(pred, group_by=("file", "face_id"), frame_col="frame")
        else:
            from mtaffect.post.smoothing import Kernel, smooth

            rate = info.fps if info.fps == info.fps and info.fps > 0 else 25.0
            k = Kernel(
                kind="gaussian", width=self.smoothing_seconds * rate, causal=self.smoothing == "causal"
            )
            pred = smooth(
                pred, {"va": k, "expr": k, "au": k}, group_by=("file", "face_id"), frame_col="frame"
            )
        frame = pred.frame
        table = table.copy()
        for src, dst in (
            (EXPR_PROB_COLUMNS, EXPR_P_COLUMNS),
            (AU_PROB_COLUMNS, AU_P_COLUMNS),
            (VA_COLUMNS, VA_COLUMNS),
        ):
            for s_, d in zip(src, dst, strict=True):
                table.loc[ok, d] = frame[s_].to_numpy(np.float32)
        return finalize(table, self.au_thresholds)


def align_faces_fast(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGN_SIZE) -> list[np.ndarray]:
    """Five-point alignment like :func:`mtaffect.faces.align.align_faces` (same template and transform),
    about 7x faster on large faces: the face's region is first box-reduced by the integer factor of the
    down-scaling (``Image.reduce``, exact averaging), then warped with PIL's bilinear affine transform.
    Measured against ``align_faces``: mean absolute difference below one grey level.
    """
    h, w = image.shape[:2]
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64) - 0.5
    out = []
    for m in alignment_matrices(landmarks, size):
        inv = invert_affine(m)
        r = max(1, int(np.floor(1.0 / np.sqrt(abs(np.linalg.det(m[:, :2]))))))
        src = corners @ inv[:, :2].T + inv[:, 2]
        x0 = int(min(max(0, np.floor(src[:, 0].min()) - r), w - 1))
        y0 = int(min(max(0, np.floor(src[:, 1].min()) - r), h - 1))
        x1 = int(max(min(w, np.ceil(src[:, 0].max()) + r + 1), x0 + 1))
        y1 = int(max(min(h, np.ceil(src[:, 1].max()) + r + 1), y0 + 1))
        region = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
        if r > 1:
            region = region.reduce(r)
        # Reduced pixel u holds source pixels x0 + r*u .. x0 + r*u + r - 1 (centre x0 + (r-1)/2 + r*u);
        # PIL's affine map works in edge coordinates (pixel-index + 0.5).
        a = inv[:, :2] / r
        c = (inv[:, 2] - [x0 + (r - 1) / 2, y0 + (r - 1) / 2]) / r + 0.5 - a @ [0.5, 0.5]
        data = (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1])
        out.append(
            np.asarray(
                region.transform((size, size), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
            )
        )
    return out


@dataclass
class _State:
    tracker: FaceTracker
    builder: TableBuilder
    step: int = 0
    last_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    cut_detector: CutDetector = field(default_factory=CutDetector)
    cuts: list[bool] = field(default_factory=list)  # per frame of the current chunk


def predict(inputs, model=None, **kwargs) -> pd.DataFrame:
    """Shortcut: ``Predictor(model, **kwargs).predict(inputs)``."""
    return Predictor(model, **kwargs).predict(inputs)


__all__: Sequence[str] = ("FileResult", "Predictor", "load_affect_model", "predict", "streaming_threads")
