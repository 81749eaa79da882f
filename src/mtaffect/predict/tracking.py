"""Face identities across frames: a ``face_id`` that stays the same over a shot.

Matching is greedy on a score per (track, detection) pair: box overlap (IoU) plus, when the backbone's
pooled features are given, their cosine similarity to the track's running appearance (an exponential
average). A pair is admissible when the boxes overlap enough, or — to re-link a face after a fast move
or a missed frame — when the appearance agrees and the box centre moved less than ``max_jump`` box
sides. Greedy in decreasing score is optimal for the usual case (faces far apart) and avoids a solver
dependency. A track not seen for ``max_age`` analysed frames is retired; its id is never reused.

Between two full detections ("detect every k frames") the pipeline calls ``MTCNN.refine``: only the
detector's last stage (O-Net) on each face's previous box, which follows the face, updates its
landmarks and notices when it is gone, at a small fraction of a full detection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (n, m) of x1, y1, x2, y2 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


@dataclass
class Track:
    id: int
    box: np.ndarray  # (4,)
    feature: np.ndarray | None  # unit vector, running average
    last_step: int
    hits: int = 1


class FaceTracker:
    """Assigns stable ids to per-frame detections; call :meth:`update` once per analysed frame, in order."""

    def __init__(
        self,
        iou_threshold: float = 0.3,
        appearance_weight: float = 0.5,
        min_similarity: float = 0.75,
        max_jump: float = 1.5,
        max_age: int = 25,
        momentum: float = 0.8,
    ) -> None:
        self.iou_threshold = iou_threshold
        self.appearance_weight = appearance_weight
        self.min_similarity = min_similarity
        self.max_jump = max_jump
        self.max_age = max_age
        self.momentum = momentum
        self.reset()

    def reset(self) -> None:
        """Forget every track (a new file starts at id 0)."""
        self.tracks: list[Track] = []
        self._next_id = 0
        self._step = -1

    def restore(self, boxes: np.ndarray, ids: np.ndarray, next_id: int) -> None:
        """Continue an interrupted run: the faces ``boxes`` with ``ids`` were seen in the last analysed
        frame, and new faces get ids from ``next_id`` on (appearance is learnt again from the next frame)."""
        self.reset()
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        ids = np.asarray(ids, np.int64).reshape(-1)
        self._step = 0
        self.tracks = [Track(int(i), b.copy(), None, 0) for b, i in zip(boxes, ids, strict=True)]
        self._next_id = max(int(next_id), int(ids.max()) + 1 if len(ids) else 0)

    def live_boxes(self) -> np.ndarray:
        """Boxes of the tracks seen in the last analysed frame (k, 4)."""
        boxes = [t.box for t in self.tracks if t.last_step == self._step]
        return np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)

    def _scores(self, boxes: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
        """(tracks, detections) match scores; -inf where not admissible."""
        tb = np.stack([t.box for t in self.tracks])
        iou = iou_matrix(tb, boxes)
        score = iou.copy()
        ok = iou >= self.iou_threshold
        have = [i for i, t in enumerate(self.tracks) if t.feature is not None]
        if feats is not None and have:
            sim = np.full(iou.shape, -1.0)
            sim[have] = np.stack([self.tracks[i].feature for i in have]) @ _unit(feats).T
            side = np.maximum(tb[:, 2] - tb[:, 0], tb[:, 3] - tb[:, 1])[:, None]
            ct = (tb[:, :2] + tb[:, 2:]) / 2
            cd = (boxes[:, :2] + boxes[:, 2:]) / 2
            jump = np.linalg.norm(ct[:, None] - cd[None], axis=-1) / np.maximum(side, 1e-9)
            score += self.appearance_weight * np.where(sim > -1.0, sim, 0.0)
            ok |= (sim >= self.min_similarity) & (jump <= self.max_jump)
        return np.where(ok, score, -np.inf)

    def update(self, boxes: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Detections of the next analysed frame -> their track ids (k,) int64."""
        self._step += 1
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        feats = None
        if features is not None and len(boxes):
            feats = np.asarray(features, np.float64).reshape(len(boxes), -1)
        ids = np.full(len(boxes), -1, np.int64)
        self.tracks = [t for t in self.tracks if self._step - t.last_step <= self.max_age]
        if self.tracks and len(boxes):
            s = self._scores(boxes, feats)
            order = np.argsort(-s, axis=None, kind="stable")
            used_t, used_d = set(), set()
            for flat in order:
                ti, di = divmod(int(flat), s.shape[1])
                if not np.isfinite(s[ti, di]):
                    break
                if ti in used_t or di in used_d:
                    continue
                used_t.add(ti)
                used_d.add(di)
                self._assign(self.tracks[ti], boxes[di], None if feats is None else feats[di])
                ids[di] = self.tracks[ti].id
        for di in np.flatnonzero(ids < 0):
            f = None if feats is None else _unit(feats[di])
            t = Track(self._next_id, boxes[di].copy(), f, self._step)
            self._next_id += 1
            self.tracks.append(t)
            ids[di] = t.id
        return ids

    def _assign(self, t: Track, box: np.ndarray, feat: np.ndarray | None) -> None:
        t.box = box.copy()
        t.last_step = self._step
        t.hits += 1
        if feat is not None:
            f = _unit(feat)
            t.feature = f if t.feature is None else _unit(self.momentum * t.feature + (1 - self.momentum) * f)
