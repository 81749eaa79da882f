"""The prediction pipeline: frames -> faces (MTCNN, tracking) -> aligned crops -> backbone -> heads -> table.

One pipeline for both engines: the networks (MTCNN's nets, the backbone and heads) run behind
:class:`~mtaffect.predict.engines.Engine`, PyTorch (``engine="torch"``, the default) or onnxruntime on an
export folder (``engine="onnxruntime"``: nothing on that path imports torch); everything else below is
this module's and the same for both.

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
With ``aligned=True`` the inputs already are such crops (s-Aff-Wild2's ``cropped_aligned`` frames): no
detection, one face per image, decoded exactly as extraction decodes them, so a checkpoint run on its
own validation frames gives the numbers of ``mtaffect infer`` on a store of those frames.

Identity: the tracker (:mod:`mtaffect.predict.tracking`) follows faces by box overlap and an appearance
embedding of the aligned crop (:func:`mtaffect.faces.embed.appearance_embedding`), detects shot cuts,
and re-identifies a face that returns within ``reid_memory`` seconds. A young track it recognises late
is merged into the remembered id: the merged id applies at once to the rows still in flight (and to the
temporal windows of that face), and :meth:`Predictor.finish_table` relabels the rows already handed out
(``Resume.aliases`` carries the mapping, also through a resumed job).

Temporal checkpoints (a recipe with an LSTM/Transformer/TCN over windows) run over each face track with
their training windows (:mod:`mtaffect.predict.temporal`). :meth:`Predictor.stream_source` gives the
rows as they become final, with the point to resume from (what :mod:`mtaffect.predict.job` writes).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd

from mtaffect.faces.align import align_faces_fast
from mtaffect.faces.cascade import FaceDetections
from mtaffect.faces.embed import appearance_embedding
from mtaffect.faces.filtering import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_NESTED_OVERLAP,
    check_filter_options,
    filter_detections,
)
from mtaffect.faces.pose import head_pose
from mtaffect.features.decode import resize_array
from mtaffect.geometry.au_evidence import EVIDENCE_THRESHOLDS
from mtaffect.geometry.au_evidence import combine as combine_evidence
from mtaffect.geometry.gaze import gaze_angles
from mtaffect.geometry.headpose import fit_canonical, head_pose_3d
from mtaffect.geometry.landmarker import FaceGeometry, FaceLandmarker
from mtaffect.geometry.landmarker import check_runtime as check_landmarker_runtime
from mtaffect.models.outputs import AffectOutputs
from mtaffect.predict.engines import Detector, Engine, create_engine
from mtaffect.predict.outputs import (
    VA_COLUMNS,
    TableBuilder,
    empty_table,
    finalize,
    to_prediction_table,
)
from mtaffect.predict.sources import (
    CHANNELS,
    Frame,
    InputError,
    MediaSource,
    SourceInfo,
    expand_inputs,
    input_name,
    open_source,
    prefetch,
    read_face_crop,
)
from mtaffect.predict.temporal import TEMPORAL_MODES, Emitted, FaceRows, TrackWindows
from mtaffect.predict.threads import landmarker_threads, streaming_threads
from mtaffect.predict.tracking import (
    DEFAULT_RATE,
    DEFAULT_REID_SECONDS,
    TRACK_MEMORY_S,
    CutDetector,
    FaceTracker,
    canonical_ids,
    rate_or_default,
)
from mtaffect.schema import AU_INTENSITY_COLUMNS, AU_PROB_COLUMNS, EXPR_PROB_COLUMNS

if TYPE_CHECKING:
    from mtaffect.models.base import FaceAffectModel

SMOOTHING: Final[tuple[str, ...]] = ("none", "causal", "centred")
#: What the face landmarker adds to the table, per ``landmarks`` mode (outputs.MEASURE_COLUMNS groups):
#: "compact" (pose from 3D landmarks, gaze, blendshapes, AU evidence and intensities), "dense" (also the
#: 478 points), "none" (not run: faster, the five-point pose).
LANDMARK_MEASURES: Final[dict[str, tuple[str, ...]]] = {
    "none": (),
    "compact": ("gaze", "au_r", "bs"),
    "dense": ("gaze", "au_r", "bs", "dense"),
}
LANDMARK_MODES: Final[tuple[str, ...]] = tuple(LANDMARK_MEASURES)
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


@dataclass
class Resume:
    """Where a stream of rows stands: every row of frames up to ``after`` is final.

    ``steps`` analysed frames lie up to ``after``; ``boxes``/``ids`` are the faces of the last of them
    (they seed the tracker and O-Net tracking), ``next_id`` the next face id to give. ``aliases``: ids
    handed out that late re-identification merged into another (``FaceTracker.aliases``): rows already
    released under such an id are relabelled when the table is finished.
    """

    after: int = -1
    steps: int = 0
    next_id: int = 0
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    aliases: dict[int, int] = field(default_factory=dict)


@dataclass
class RowBatch:
    """Rows that are final (raw model outputs, before smoothing/post-processing), not yet a DataFrame
    (``rows.build(thresholds)`` makes one), and where they leave the stream."""

    rows: TableBuilder
    resume: Resume


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


def auto_min_face_size(height: int, width: int, still: bool) -> float:
    """``min_face_size="auto"`` for a frame of that size: max(20 px for stills / 40 px for video, its
    shorter side * :data:`AUTO_FACE_FRACTION`)."""
    return float(max(20 if still else 40, round(min(height, width) * AUTO_FACE_FRACTION)))


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while chunk := list(islice(it, n)):
        yield chunk


def source_warnings(info: SourceInfo) -> list[str]:
    """What the user must hear about an input: read only in part (ended early, bad frames), or a frame
    sequence without a frame rate (its times are left empty rather than guessed: a wrong rate would time
    every row wrongly). That note names no folder, so that it is said once however many folders."""
    out = []
    if info.kind == "sequence" and not info.fps > 0:
        out.append(
            "folders of frames carry no frame rate, so their time column is empty (tracking, smoothing and "
            f"annotated videos assume {DEFAULT_RATE:g} frames/s); give the rate with --fps (Python: fps=)"
        )
    if info.ended_early:
        out.append(f"{info.file}: ended early: {info.ended_early}")
    if info.unreadable:
        first = info.unreadable[0][1]
        more = f" (and {len(info.unreadable) - 1} more)" if len(info.unreadable) > 1 else ""
        out.append(f"{info.file}: {len(info.unreadable)} unreadable frame(s) skipped: {first}{more}")
    return out


class Predictor:
    """Run a face-affect model on images, folders, videos, streams or arrays; ``predict`` returns the table.

    ``model``: None (the embedded default model), a checkpoint path, ``"emotiefflib:<model>"``, or any
    ``FaceAffectModel``; with ``engine="onnxruntime"`` an export folder (``mtaffect export``), or one of
    those, exported first into a temporary folder (see :mod:`mtaffect.predict.engines`).
    ``engine``: "torch" or "onnxruntime" (no torch needed: the same pipeline, outputs and jobs).
    ``precision``: onnxruntime only, "float32" (None: the default) or "int8" (an export made with
    ``--quantize``). ``device``: cpu, cuda[:N] (or mps with torch).
    ``every``: analyse every N-th frame of videos. ``detect_every``: full detection every k analysed
    frames, O-Net tracking in between. ``max_faces``: keep the largest K faces per frame.
    ``min_face_size``: pixels, or "auto" (max(40 for video / 20 for stills, shorter side / 30)).
    ``post``: a post-processing config (path or ``PostConfig``): its smoothing kernels and AU thresholds
    replace ``smoothing`` and the model's thresholds. ``smoothing``: per face track, "causal" (past
    frames only, for live use) or "centred", a Gaussian with sigma ``smoothing_seconds``.
    ``aligned``: inputs are already cropped and aligned faces (no detection; one face per image).
    ``temporal``: how a temporal checkpoint sees each track, "centred" (its training windows) or
    "causal" (a window ending at each frame: live use); see :mod:`mtaffect.predict.temporal`.
    ``min_confidence`` / ``nested_overlap``: drop detections below that face probability / lying that
    much inside a larger face (None keeps them; see :mod:`mtaffect.faces.filtering`).
    ``reid_memory``: seconds a face that left (or was cut away from) is remembered and re-identified by
    appearance when it returns (0: off; see :mod:`mtaffect.predict.tracking`).
    ``num_threads``: torch threads while this predictor runs ("auto": every core but one, the caller's
    setting restored afterwards; None: torch's setting as is; see :mod:`mtaffect.predict.threads`), or
    onnxruntime's intra-op threads ("auto": the same count; None: its default).
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
        aligned: bool = False,
        temporal: str = "centred",
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        nested_overlap: float | None = DEFAULT_NESTED_OVERLAP,
        reid_memory: float = DEFAULT_REID_SECONDS,
        engine: str = "torch",
        precision: str | None = None,
        landmarks: str = "compact",
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
        if temporal not in TEMPORAL_MODES:
            raise ValueError(f"temporal must be one of {', '.join(TEMPORAL_MODES)}, got {temporal!r}")
        if not (min_face_size == "auto" or (isinstance(min_face_size, int | float) and min_face_size >= 12)):
            raise ValueError(
                f"min_face_size must be 'auto' or a number of pixels >= 12, got {min_face_size!r}"
            )
        if landmarks not in LANDMARK_MODES:
            raise ValueError(f"landmarks must be one of {', '.join(LANDMARK_MODES)}, got {landmarks!r}")
        if landmarks != "none":
            check_landmarker_runtime()
        check_filter_options(min_confidence, nested_overlap)
        if not reid_memory >= 0:
            raise ValueError(f"reid_memory must be >= 0 seconds (0: off), got {reid_memory}")
        self.min_confidence, self.nested_overlap = float(min_confidence), nested_overlap
        self.reid_memory = float(reid_memory)
        self.post = load_post(post)
        self.engine: Engine = create_engine(
            engine,
            model,
            device=device,
            num_threads=num_threads,
            batch_size=int(batch_size),
            precision=precision,
            detector=not aligned,
        )
        self.model, self.device = self.engine.model, getattr(self.engine, "device", device)
        self.num_threads = self.engine.num_threads
        self._size, self._colour = self.engine.input_size, self.engine.colour
        self.batch_size, self.detect_every, self.every = int(batch_size), int(detect_every), int(every)
        self.max_faces, self.min_face_size = max_faces, min_face_size
        self.smoothing, self.smoothing_seconds = smoothing, float(smoothing_seconds)
        self.chunk_frames, self.decode_thread = int(chunk_frames), decode_thread
        self.tracker_kwargs = dict(tracker or {})
        self.aligned, self.temporal = bool(aligned), temporal
        self.window = self.engine.window  # 1 for per-frame models
        self._detectors: dict[float, Detector] = {}
        self.failures: list[tuple[str, str]] = []
        self.landmarks = landmarks
        self._landmarker: FaceLandmarker | None = None
        # AUs read off the expression (the default model, emotiefflib:) are combined with the face's
        # blendshape evidence; a model trained on AUs keeps its own
        self.au_evidence = landmarks != "none" and getattr(self.engine, "au_source", "model") == "expression"

    # ---- public API ------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        """What runs and how, from what is already loaded (nothing is read or built for it)."""
        card = self.engine.card()
        parts = {
            "model": card.get("name"),
            "backbone": card.get("backbone"),
            "engine": card.get("engine", self.engine.name),
            "device": str(self.device),
            "num_threads": self.num_threads,
            "landmarks": self.landmarks,
            "aligned": self.aligned,
            "every": self.every,
            "detect_every": self.detect_every,
            "max_faces": self.max_faces,
            "min_face_size": self.min_face_size,
            "smoothing": self.smoothing,
            "post": "yes" if self.post is not None else None,
            "temporal": f"{self.temporal} (window {self.window})" if self.window > 1 else None,
        }
        shown = ", ".join(f"{k}={v!r}" for k, v in parts.items() if v is not None or k == "max_faces")
        return f"Predictor({shown})"

    @property
    def backbone(self):
        """The torch engine's backbone (None with onnxruntime: the backbone is inside its face graph)."""
        return getattr(self.engine, "backbone", None)

    @property
    def au_thresholds(self) -> np.ndarray:
        post_th = getattr(self.post, "au_thresholds", None) if self.post is not None else None
        if post_th is not None:
            return np.asarray(post_th, np.float64)
        return np.asarray(EVIDENCE_THRESHOLDS if self.au_evidence else self.engine.au_thresholds, np.float64)

    @property
    def measure_keys(self) -> tuple[str, ...]:
        """The landmarker's column groups in this predictor's tables (outputs.MEASURE_COLUMNS keys)."""
        return LANDMARK_MEASURES[self.landmarks]

    @property
    def landmarker(self) -> FaceLandmarker:
        """MediaPipe's landmark and blendshape models over our faces (loaded on first use)."""
        if self._landmarker is None:
            self._landmarker = FaceLandmarker(threads=landmarker_threads(self.num_threads))
        return self._landmarker

    def predict(
        self,
        inputs,
        errors: str = "raise",
        fps: float | None = None,
        *,
        recursive: bool = False,
        sequences: bool = True,
        channels: str = "rgb",
    ) -> pd.DataFrame:
        """Table for one input or a list: an image/video path, a folder, a stream URL, a camera number,
        a uint8 array ((H, W, 3) image or (N, H, W, 3) clip; RGB unless ``channels="bgr"``) or a PIL image.

        ``errors="raise"`` stops at the first unreadable input; ``"skip"`` warns, records it in
        ``self.failures`` and goes on. ``fps`` gives times to in-memory clips and frame sequences.
        ``recursive`` searches subfolders; ``sequences`` treats a folder of numbered images as one clip.
        An input that ended early (or had unreadable frames) warns, and its rows have ``ended_early=1``.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        tables = []
        for res in self.iter_predict(
            inputs, fps=fps, recursive=recursive, sequences=sequences, channels=channels
        ):
            if res.error is not None:
                if errors == "raise":
                    raise InputError(res.error)
                warnings.warn(res.error, stacklevel=2)
                continue
            for msg in source_warnings(res.info):
                warnings.warn(msg, stacklevel=2)
            if len(res.table):
                tables.append(res.table)
        return pd.concat(tables, ignore_index=True) if tables else empty_table()

    def iter_predict(
        self,
        inputs,
        progress: Callable[[int], None] | None = None,
        fps: float | None = None,
        on_start: Callable[[SourceInfo], None] | None = None,
        *,
        recursive: bool = False,
        sequences: bool = True,
        channels: str = "rgb",
    ) -> Iterator[FileResult]:
        """One :class:`FileResult` per input, in order; an unreadable input yields a result with ``error``
        (and is added to ``self.failures``) instead of stopping the others."""
        self.failures = []
        for item in expand_inputs(inputs, recursive=recursive, sequences=sequences):
            t0 = time.perf_counter()
            try:
                source = self.open(item, fps=fps, channels=channels)
                if on_start is not None:
                    on_start(source.info)
                yield self.predict_source(source, progress)
            except InputError as e:
                yield self.failed(item, str(e), time.perf_counter() - t0)

    def failed(self, item, error: str, seconds: float = 0.0) -> FileResult:
        """The result of an input that could not be read (recorded in ``self.failures``)."""
        name = input_name(item)
        self.failures.append((name, error))
        return FileResult(SourceInfo(name, "unknown"), empty_table(), seconds, 0, error)

    def open(self, item, fps: float | None = None, channels: str = "rgb") -> MediaSource:
        """A source for one expanded input; with ``aligned`` its frames are backbone-ready crops."""
        if channels not in CHANNELS:
            raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
        if not self.aligned:
            return open_source(item, every=self.every, fps=fps, channels=channels)
        reader = partial(read_face_crop, size=self._size, colour=self._colour)
        prepare = partial(resize_array, size=self._size, colour=self._colour)
        return open_source(item, every=self.every, fps=fps, channels=channels, reader=reader, prepare=prepare)

    def predict_source(
        self, source: MediaSource, progress: Callable[[int], None] | None = None
    ) -> FileResult:
        """Run the pipeline over one opened source: its whole, final table."""
        t0 = time.perf_counter()
        rows, analysed, resume = TableBuilder(self.measure_keys), 0, Resume()
        for batch in self.stream_source(source, progress):
            rows.extend(batch.rows)
            analysed, resume = batch.resume.steps, batch.resume
        table = self.finish_table(rows.build(self.au_thresholds), source.info, resume.aliases)
        return FileResult(source.info, table, time.perf_counter() - t0, analysed)

    def stream_source(
        self,
        source: MediaSource,
        progress: Callable[[int], None] | None = None,
        resume: Resume | None = None,
    ) -> Iterator[RowBatch]:
        """Rows of one source as they become final, in frame order, a batch per chunk of frames.

        Rows carry the model's raw outputs (no smoothing, no post-processing: :meth:`finish_table`
        applies them to the whole table). ``resume`` (from a previous batch) continues an interrupted
        run after its frame ``after``: frames up to it are skipped and the tracker carries on with the
        faces and ids of that frame.
        """
        info = source.info
        resume = resume or Resume()
        source.after = resume.after
        state = self._new_state(info, resume)
        frames: Iterator[Frame] = iter(source)
        if self.decode_thread and info.kind in ("video", "stream", "sequence"):
            frames = prefetch(frames, depth=2 * self.chunk_frames)
        try:
            for chunk in _batched(frames, self.chunk_frames):
                with self.engine.running():  # only while our code runs, not between batches
                    self._process_chunk(info, chunk, state)
                if progress is not None:
                    progress(len(chunk))
                if (batch := state.release(final=False)) is not None:
                    yield batch
            if state.windows is not None:
                with self.engine.running():
                    self._add_emitted(info, state.windows.flush(), state)
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()
        batch = state.release(final=True)
        if batch is not None:
            yield batch

    def finish_table(
        self, table: pd.DataFrame, info: SourceInfo, aliases: dict[int, int] | None = None
    ) -> pd.DataFrame:
        """An input's raw rows -> its final table: face ids merged by late re-identification relabelled
        (``aliases``, from the last :class:`Resume`), smoothing or the post-processing config, the AU
        decisions and labels recomputed, and ``ended_early`` set when the input stopped early."""
        table = relabel_faces(table, aliases)
        table = self._postprocess(table, info)
        table["ended_early"] = np.int8(1 if info.ended_early else 0)
        return table

    def settings(self) -> dict:
        """What determines the raw rows (a resumed job must use the same)."""
        return {
            **self.engine.describe(),
            "every": self.every,
            "detect_every": self.detect_every,
            "max_faces": self.max_faces,
            "min_face_size": self.min_face_size,
            "aligned": self.aligned,
            "temporal": self.temporal if self.window > 1 else None,
            "tracker": self.tracker_kwargs,
            "chunk_frames": self.chunk_frames,
            "min_confidence": self.min_confidence,
            "nested_overlap": self.nested_overlap,
            "reid_memory": self.reid_memory,
            "landmarks": self.landmarks,
        }

    # ---- internals -------------------------------------------------------------------------------------

    def _new_state(self, info: SourceInfo, resume: Resume) -> _State:
        # Position memory TRACK_MEMORY_S, re-identification memory reid_memory, in seconds of video.
        tr = FaceTracker.for_rate(
            info.fps, info.every, self.reid_memory, TRACK_MEMORY_S, **self.tracker_kwargs
        )
        if len(resume.ids) or resume.next_id or resume.aliases:
            tr.restore(resume.boxes, resume.ids, resume.next_id, resume.aliases)
        windows = None
        if self.window > 1:
            windows = TrackWindows(self.engine, self.temporal, max_age=tr.max_age)
        state = _State(tr, windows=windows, held=TableBuilder(self.measure_keys))
        state.step, state.committed = resume.steps, resume
        state.last_boxes = np.asarray(resume.boxes, np.float32).reshape(-1, 4)
        state.next_id = resume.next_id
        return state

    def _detector(self, height: int, width: int, still: bool) -> Detector:
        if self.min_face_size == "auto":
            size = auto_min_face_size(height, width, still)
        else:
            size = float(self.min_face_size)
        if size not in self._detectors:
            self._detectors[size] = self.engine.detector(size, self.chunk_frames)
        return self._detectors[size]

    def _keep(self, d: FaceDetections) -> FaceDetections:
        """The detections that count: confidence floor and nested boxes, then the ``max_faces`` largest."""
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
            if d is not None:
                d = self._keep(d)
            else:
                h, w = fr.image.shape[:2]
                det = self._detector(h, w, still)
                d = self._keep(det.refine(fr.image, state.last_boxes))  # filtered: a weak box is lost
                if len(d) < len(state.last_boxes):  # a face was lost (moved fast, or left): look again
                    d = self._keep(det.detect(fr.image)[0])
            state.last_boxes = d.boxes
            out.append(d)
        return out

    def _faces(
        self, info: SourceInfo, chunk: list[Frame], state: _State
    ) -> tuple[np.ndarray, FaceRows, np.ndarray, np.ndarray | None]:
        """(faces per frame, their rows without ids, their backbone-ready crops, their appearance
        embeddings for the tracker (None for ``aligned`` input: no tracking))."""
        frame_no = np.array([f.index for f in chunk], np.int64)
        times = np.array([f.time for f in chunk], np.float64)
        if self.aligned:  # the whole image is the face: no box, no landmarks, no detector confidence
            n = len(chunk)
            geo = self._measure([(f.image, _whole(f.image), None) for f in chunk], still=True)
            rows = FaceRows(
                frame_no,
                times,
                np.zeros(n, np.int64),
                np.full(n, np.nan, np.float32),
                np.full((n, 4), np.nan, np.float32),
                np.full((n, 5, 2), np.nan, np.float32),
                geo.points,
                geo.blendshapes,
            )
            return np.ones(n, np.int64), rows, np.stack([f.image for f in chunk]), None
        dets = self._locate(info, chunk, state)
        counts = np.array([len(d) for d in dets], np.int64)
        rep = np.repeat(np.arange(len(chunk)), counts)
        aligned = [
            face
            for fr, d in zip(chunk, dets, strict=True)
            if len(d)
            for face in align_faces_fast(fr.image, d.landmarks, ALIGN_SIZE)
        ]
        crops = [resize_array(face, self._size, self._colour) for face in aligned]
        # identity cues for the tracker: the aligned crop's appearance (not the affect backbone's features)
        appearance = appearance_embedding(np.stack(aligned)) if aligned else None
        geo = self._measure(
            [(fr.image, d.boxes, d.landmarks) for fr, d in zip(chunk, dets, strict=True) if len(d)],
            still=info.kind == "image",
        )
        rows = FaceRows(
            frame_no[rep],
            times[rep],
            np.full(len(rep), -1, np.int64),
            np.concatenate([d.scores for d in dets]).astype(np.float32),
            np.concatenate([d.boxes for d in dets]).reshape(-1, 4),
            np.concatenate([d.landmarks for d in dets]).reshape(-1, 5, 2),
            geo.points,
            geo.blendshapes,
        )
        return counts, rows, (np.stack(crops) if crops else np.zeros((0,))), appearance

    def _measure(
        self, faces: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], still: bool
    ) -> FaceGeometry:
        """The landmarker on each (image, boxes, five landmarks) of a chunk, in row order. Stills get a
        second pass from the first one's landmarks (MediaPipe's tracking crop); video frames one pass,
        so each frame's rows depend on that frame alone (a resumed job writes the same rows)."""
        n = sum(len(b) for _, b, _ in faces)
        if self.landmarks == "none":  # zero-width arrays: the rows carry nothing
            return FaceGeometry(
                np.zeros((n, 0, 3), np.float32), np.zeros((n, 0), np.float32), np.zeros(n, np.float32)
            )
        if not n:
            return FaceGeometry.empty(0)
        return FaceGeometry.concat([self.landmarker.measure(im, b, lm, refine=still) for im, b, lm in faces])

    def _track(self, info: SourceInfo, counts: np.ndarray, rows: FaceRows, feats, state: _State) -> None:
        """Face ids, frame by frame (every still is its own scene; aligned input is one face: id 0).

        Ids merged by late re-identification during this chunk are applied to the whole chunk's rows
        and to the temporal windows still open, so rows in flight carry the final id; rows released
        earlier are relabelled by :meth:`finish_table`."""
        if self.aligned:
            return
        tracker = state.tracker
        if info.kind == "image":
            tracker.reset()
        known = dict(tracker.aliases)
        start = 0
        for n, cut in zip(counts, state.cuts, strict=True):
            sl = slice(start, start + n)
            f = None if feats is None or n == 0 else feats[sl]
            rows.face_id[sl] = tracker.update(rows.boxes[sl], f, cut=cut)
            start += n
        if tracker.aliases != known:
            rows.face_id[:] = tracker.canonical(rows.face_id)
            if state.windows is not None:
                for old in sorted(tracker.aliases.keys() - known.keys()):
                    done = state.windows.rename(old, int(tracker.canonical([old])[0]))
                    self._add_emitted(info, done, state)

    def _process_chunk(self, info: SourceInfo, chunk: list[Frame], state: _State) -> None:
        counts, rows, crops, appearance = self._faces(info, chunk, state)
        empty = counts == 0
        state.held.add_empty(
            info.file,
            np.array([f.index for f in chunk], np.int64)[empty],
            np.array([f.time for f in chunk], np.float64)[empty],
        )
        state.log_frames([f.index for f in chunk])
        if state.windows is None:
            self._track(info, counts, rows, appearance, state)
            if counts.sum():
                self._add_emitted(info, [Emitted(rows, self.engine.heads(crops))], state)
        else:
            arrays = self.engine.embed(crops) if counts.sum() else {}
            self._track(info, counts, rows, appearance, state)
            start = 0
            for n in counts:  # one analysed frame at a time: windows follow each track
                sel = np.arange(start, start + n)
                start += n
                emitted = state.windows.push(rows.take(sel), {k: v[sel] for k, v in arrays.items()})
                self._add_emitted(info, emitted, state)
        state.step += len(chunk)

    def _add_emitted(self, info: SourceInfo, emitted: list[Emitted], state: _State) -> None:
        for e in emitted:
            if not len(e.rows):
                continue
            r, o = e.rows, e.outputs
            pose, au, measures = self._measures(r, o)
            state.held.add(
                info.file,
                r.frame,
                r.time,
                r.face_id,
                r.confidence,
                r.boxes,
                r.landmarks,
                o.expr_probs,
                au,
                o.va,
                pose=pose,
                measures=measures,
            )
            state.next_id = max(state.next_id, int(r.face_id.max()) + 1)

    def _measures(
        self, r: FaceRows, o: AffectOutputs
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(pose, AU probabilities, the landmarker's columns) of emitted rows: pose from the 3D landmarks
        (from the five points without the landmarker), AUs with the blendshape evidence when the model's
        AUs come from its expressions."""
        if self.landmarks == "none":
            return head_pose(r.landmarks), o.au_probs, {}
        n = len(r)
        au = np.asarray(o.au_probs, np.float32)
        intensity = np.full((n, len(AU_INTENSITY_COLUMNS)), np.nan, np.float32)
        if self.au_evidence:
            au, intensity = combine_evidence(au, r.blendshapes, self.engine.au_thresholds)
        fit = fit_canonical(r.points)  # one rigid fit per face serves head pose and gaze
        measures = {"gaze": gaze_angles(r.points, fit), "au_r": intensity, "bs": r.blendshapes}
        if self.landmarks == "dense":  # x_0..x_477, y_0.., z_0..
            measures["dense"] = np.transpose(r.points, (0, 2, 1)).reshape(n, -1)
        return head_pose_3d(r.points, fit), au, measures

    def _postprocess(self, table: pd.DataFrame, info: SourceInfo) -> pd.DataFrame:
        """Per-track smoothing (``smoothing``) or the post-processing config (its smoothing kernels and
        expression bias), on the face rows; the AU decisions and labels are then recomputed."""
        ok = table["success"] == 1
        if not ok.any() or (self.post is None and (self.smoothing == "none" or not info.temporal)):
            return table.copy()
        from mtaffect.data.predictions import PredictionTable

        pred = PredictionTable(to_prediction_table(table[ok]), source=info.file)
        if self.post is not None:
            pred = self.post.apply(pred, group_by=("file", "face_id"), frame_col="frame")
        else:
            from mtaffect.post.smoothing import Kernel, smooth

            k = Kernel(
                kind="gaussian",
                width=self.smoothing_seconds * rate_or_default(info.fps),
                causal=self.smoothing == "causal",
            )
            pred = smooth(
                pred, {"va": k, "expr": k, "au": k}, group_by=("file", "face_id"), frame_col="frame"
            )
        frame = pred.frame
        table = table.copy()
        for c in (*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, *VA_COLUMNS):  # the table's names are the schema's
            table.loc[ok, c] = frame[c].to_numpy(np.float32)
        return finalize(table, self.au_thresholds)


@dataclass
class _State:
    """What one source's run carries from chunk to chunk."""

    tracker: FaceTracker
    step: int = 0
    last_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    windows: TrackWindows | None = None
    cut_detector: CutDetector = field(default_factory=CutDetector)
    cuts: list[bool] = field(default_factory=list)  # per frame of the current chunk
    next_id: int = 0
    committed: Resume = field(default_factory=Resume)
    #: analysed frame numbers not yet released, in order
    frames: list[int] = field(default_factory=list)
    #: rows not yet released, in the order they were produced
    held: TableBuilder = field(default_factory=TableBuilder)

    def log_frames(self, numbers: Sequence[int]) -> None:
        self.frames.extend(int(n) for n in numbers)

    def release(self, final: bool) -> RowBatch | None:
        """The rows that are final now (all rows of every frame before the first row a temporal window
        still waits for) and the resume point after them; later rows are held back."""
        waiting = None if final or self.windows is None else self.windows.pending_min_frame()
        done = [f for f in self.frames if waiting is None or f < waiting]
        if not done:
            return None
        after = done[-1]
        ready, self.held = self.held.split(after)
        boxes, ids = ready.faces_at(after)
        aliases = dict(self.tracker.aliases)
        # an id merged away is never given again (after a resume it would be relabelled with the merge)
        next_id = max(self.next_id, max(aliases, default=-1) + 1)
        self.committed = Resume(after, self.committed.steps + len(done), next_id, boxes, ids, aliases)
        self.frames = self.frames[len(done) :]
        return RowBatch(ready, self.committed)


def _whole(image: np.ndarray) -> np.ndarray:
    """The box of a whole image (an aligned face crop)."""
    h, w = image.shape[:2]
    return np.array([[0, 0, w, h]], np.float32)


def relabel_faces(table: pd.DataFrame, aliases: dict[int, int] | None) -> pd.DataFrame:
    """``face_id`` of rows handed out before late re-identification merged their track into a
    remembered face, relabelled to that face's id (rows sorted again by frame and id)."""
    if not aliases or not len(table):
        return table
    ids = table["face_id"].to_numpy(np.int64)
    new = canonical_ids(ids, aliases)
    if np.array_equal(new, ids):
        return table
    table = table.copy()
    table["face_id"] = new
    return table.sort_values(["frame", "face_id"], kind="stable", ignore_index=True)


def predict(inputs, model=None, **kwargs) -> pd.DataFrame:
    """Shortcut: ``Predictor(model, **kwargs).predict(inputs)``."""
    return Predictor(model, **kwargs).predict(inputs)


__all__: Sequence[str] = (
    "FileResult",
    "Predictor",
    "Resume",
    "RowBatch",
    "auto_min_face_size",
    "predict",
    "relabel_faces",
    "streaming_threads",
)
