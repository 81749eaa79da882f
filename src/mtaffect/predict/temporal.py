"""Temporal checkpoints in the application: run a window model over each face track.

A recipe trained with a temporal module (LSTM, Transformer, TCN over windows of ``window`` consecutive
frames) sees, per face track, the windows it was trained and validated on:

- ``"centred"`` (offline, the default): the track's rows are cut into consecutive windows of
  ``window`` rows from its first row, the last one padded by repeating its last row, exactly as
  :meth:`~mtaffect.models.checkpoint.TrainedAffectModel.predict_store` (``mtaffect infer``) cuts a
  video's frames (:func:`mtaffect.data.units.make_windows` with ``stride == window``), so each frame is
  predicted once with the context of its window, past and future. A window is predicted as soon as it
  is full; a track's last, partial window when the track ends (out of view longer than the tracking
  memory) or the input ends.
- ``"causal"`` (live): each row is predicted at once from a window that ends at it: the track's last
  ``window - 1`` rows and itself (at the start of a track the oldest row is repeated to fill the
  window, as training pads). Nothing from the future is used; the state kept per track is those rows.

The per-frame path (one-frame sequences) is what every non-temporal model uses.

A face id may change mid-track: when the tracker recognises a young track late as a face it remembers
(:meth:`~mtaffect.predict.tracking.FaceTracker.canonical`), the pipeline calls :meth:`TrackWindows.rename`
and the young track's pending rows (and causal history) continue the remembered face's, in frame order,
so windows follow the person, not the id first handed out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from mtaffect.models.outputs import AffectOutputs

TEMPORAL_MODES: Final[tuple[str, str]] = ("centred", "causal")


@dataclass
class FaceRows:
    """Per-face row data (everything but the model's outputs), as parallel arrays of length n."""

    frame: np.ndarray
    time: np.ndarray
    face_id: np.ndarray
    confidence: np.ndarray
    boxes: np.ndarray  # (n, 4)
    landmarks: np.ndarray  # (n, 5, 2)
    #: the landmarker's measures (mtaffect.geometry.landmarker.FaceGeometry): (n, 478, 3) points and
    #: (n, 52) blendshapes, NaN where not measured; (n, 0, 3) and (n, 0) when it does not run
    points: np.ndarray
    blendshapes: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    def take(self, idx) -> FaceRows:
        return FaceRows(*(np.asarray(a)[idx] for a in self._arrays()))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.frame,
            self.time,
            self.face_id,
            self.confidence,
            self.boxes,
            self.landmarks,
            self.points,
            self.blendshapes,
        )

    @staticmethod
    def concat(parts: list[FaceRows]) -> FaceRows:
        return FaceRows(*(np.concatenate(a) for a in zip(*(p._arrays() for p in parts), strict=True)))


@dataclass
class Emitted:
    """Rows whose predictions are known."""

    rows: FaceRows
    outputs: AffectOutputs


@dataclass
class _Track:
    rows: list[FaceRows] = field(default_factory=list)  # one row each
    arrays: list[dict[str, np.ndarray]] = field(default_factory=list)  # one face each
    last_step: int = 0
    done: list[dict[str, np.ndarray]] = field(default_factory=list)  # the last window's emitted arrays


class TrackWindows:
    """Feeds a temporal model windows of each face track (see the module docstring).

    ``push`` takes one analysed frame's faces (rows, ids, the backbone arrays the model reads) and
    returns the rows it can predict now; ``flush`` predicts everything pending (at the input's end).
    ``max_age``: analysed frames a track may go unseen before its pending window is closed.
    """

    def __init__(self, model, mode: str = "centred", max_age: int = 25) -> None:
        if mode not in TEMPORAL_MODES:
            raise ValueError(f"temporal mode must be one of {', '.join(TEMPORAL_MODES)}, got {mode!r}")
        self.model, self.mode, self.max_age = model, mode, int(max_age)
        self.window = int(model.window)  # the Engine's training window (1 for per-frame models)
        self.edge = str(getattr(model, "window_edge", "pad"))  # as make_windows: pad or shift
        # features always (the model's predict takes them first; the tracker uses them too)
        self.inputs = tuple(dict.fromkeys(("features", *(getattr(model, "inputs", ()) or ()))))
        self._tracks: dict[int, _Track] = {}
        self._history: dict[int, deque] = {}
        self._step = -1

    def pending_min_frame(self) -> int | None:
        """The earliest frame number still waiting for its window (None when nothing waits)."""
        firsts = [int(t.rows[0].frame[0]) for t in self._tracks.values() if t.rows]
        return min(firsts) if firsts else None

    def push(self, rows: FaceRows, arrays: Mapping[str, np.ndarray]) -> list[Emitted]:
        """One analysed frame: ``rows`` of its faces and their backbone ``arrays`` ((n, ...) each)."""
        self._step += 1
        out: list[Emitted] = []
        for k in range(len(rows)):
            fid = int(rows.face_id[k])
            one = {name: np.asarray(arrays[name][k]) for name in self.inputs}
            if self.mode == "causal":
                out.append(self._causal(fid, rows.take([k]), one))
                continue
            track = self._tracks.setdefault(fid, _Track())
            track.rows.append(rows.take([k]))
            track.arrays.append(one)
            track.last_step = self._step
            if len(track.rows) == self.window:
                out.append(self._predict_track(fid))
        if self.mode == "centred":
            for fid in [f for f, t in self._tracks.items() if self._step - t.last_step > self.max_age]:
                if self._tracks[fid].rows:
                    out.append(self._predict_track(fid))
                del self._tracks[fid]
        return out

    def rename(self, old: int, new: int) -> list[Emitted]:
        """Face ``old`` turned out to be face ``new`` (late re-identification): ``old``'s pending rows
        and history continue ``new``'s (every row of ``new`` precedes ``old``'s first: the tracker merges
        only a track that began after the remembered face was last seen). Rows already emitted keep
        ``old`` (the pipeline relabels them). Returns the windows the joined rows complete."""
        old, new = int(old), int(new)
        if old == new:
            return []
        if old in self._history:
            merged = [*self._history.pop(new, ()), *self._history.pop(old)]
            self._history[new] = deque(merged, maxlen=self.window)
        src = self._tracks.pop(old, None)
        if src is None:
            return []
        for r in src.rows:
            r.face_id[:] = new
        dst = self._tracks.setdefault(new, _Track())
        dst.rows += src.rows
        dst.arrays += src.arrays
        dst.done = [*dst.done, *src.done][-self.window :]
        dst.last_step = max(dst.last_step, src.last_step)
        out = []
        while len(dst.rows) >= self.window:  # both halves together may fill windows
            out.append(self._predict_track(new, self.window))
        return out

    def flush(self) -> list[Emitted]:
        """Predict every pending (partial, padded) window; the tracks are forgotten."""
        out = [self._predict_track(fid) for fid, t in self._tracks.items() if t.rows]
        self._tracks.clear()
        self._history.clear()
        return out

    def _predict_track(self, fid: int, n: int | None = None) -> Emitted:
        """The first ``n`` pending rows of track ``fid`` (all by default) as one window.

        A partial last window is cut as the model was trained (:func:`~mtaffect.data.units.make_windows`):
        padded by repeating its last row, or with ``window_edge: shift`` (a track at least a window long)
        moved back over rows already predicted, which give context but are not predicted again.
        """
        track = self._tracks[fid]
        n = len(track.rows) if n is None else n
        rows, arrays = track.rows[:n], track.arrays[:n]
        missing = self.window - n
        if missing and self.edge == "shift" and len(track.done) >= missing:
            probs = self._run([*track.done[-missing:], *arrays])
            keep = slice(missing, None)
        else:
            probs = self._run([*arrays, *[arrays[-1]] * missing])  # as make_windows pads: repeat the last
            keep = slice(0, n)
        emitted = Emitted(
            FaceRows.concat(rows),
            AffectOutputs(probs.va[keep], probs.expr_probs[keep], probs.au_probs[keep]),
        )
        track.rows, track.arrays = track.rows[n:], track.arrays[n:]
        track.done = [*track.done, *arrays][-self.window :]
        return emitted

    def _causal(self, fid: int, row: FaceRows, one: dict[str, np.ndarray]) -> Emitted:
        hist = self._history.setdefault(fid, deque(maxlen=self.window))
        hist.append(one)
        steps = list(hist)
        steps = [steps[0]] * (self.window - len(steps)) + steps  # left-pad with the oldest row
        probs = self._run(steps)
        return Emitted(row, AffectOutputs(probs.va[-1:], probs.expr_probs[-1:], probs.au_probs[-1:]))

    def _run(self, steps: list[dict[str, np.ndarray]]) -> AffectOutputs:
        """One window (T steps) through the model as a (1, T, ...) sequence -> T rows of outputs."""
        seq = {name: np.stack([s[name] for s in steps])[None] for name in self.inputs}
        return self.model.predict(seq["features"], seq.get("logits"), seq.get("tokens"))


__all__ = ["TEMPORAL_MODES", "Emitted", "FaceRows", "TrackWindows"]
