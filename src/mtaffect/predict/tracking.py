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

Re-identification: a track out of view for longer than ``max_age`` is not forgotten at once but kept
in a gallery for ``reid_memory`` analysed frames (the pipeline converts seconds to frames), with the
mean of its appearance embeddings (:func:`mtaffect.faces.embed.appearance_embedding` in the pipeline).
A detection that matches no live track by position is compared with the gallery and with the live
tracks that lost their face in this frame (a cut moves everyone), by appearance alone; above
``reid_similarity`` it takes that id back. So a person who leaves and returns, or is seen again after a
cut, keeps their id; a new person (below the threshold) gets a new one. Only tracks seen in at least
``reid_min_hits`` frames are remembered, so a passing false detection cannot claim a returning face.
A face that walks in from the edge is first seen half cut off and may not match at once; while its
track is young (fewer than ``reid_young`` frames) its growing mean appearance is compared with the
gallery again, and a match merges it into the remembered id: :meth:`FaceTracker.canonical` maps the
ids already handed out (the pipeline relabels the file's rows with it when the file is done).

Cuts: at a shot change a different person often appears where someone else was, and box overlap
alone would hand them that person's id. :class:`CutDetector` flags a cut when the colour histogram of
consecutive analysed frames changes by more than ``threshold`` (total variation; inside a shot it stays
below ~0.03 on the benchmark video, cuts score 0.28-0.63); ``update(..., cut=True)`` then retires every
live track, so after a cut ids come back by appearance only (or are new when re-identification is off).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Default re-identification memory of the pipeline, in seconds (0 turns re-identification off).
DEFAULT_REID_SECONDS = 30.0
#: Cosine similarity of appearance above which a face is re-identified: within one video the same person
#: scored >= 0.90 and different people <= 0.83 (a mirrored, tinted copy of a face) on the benchmark.
DEFAULT_REID_SIMILARITY = 0.88
#: How long a face may stay out of view and keep its track by position alone, in seconds.
TRACK_MEMORY_S = 1.0
#: Frame rate assumed for an input that declares none (frame sequences without ``fps``): what turns
#: seconds (tracking and re-identification memories, smoothing widths) into frames for it.
DEFAULT_RATE = 25.0


def rate_or_default(fps: float) -> float:
    """``fps`` when it is known (a positive number), else :data:`DEFAULT_RATE`."""
    return fps if fps == fps and fps > 0 else DEFAULT_RATE


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


class CutDetector:
    """Flags shot changes from colour histograms of consecutive frames (call once per analysed frame).

    Each frame is subsampled (every 8th pixel) into a 64-bin RGB histogram; a cut is a total-variation
    distance above ``threshold`` to the previous frame. ~50 µs for a 640x480 frame.
    """

    def __init__(self, threshold: float = 0.2) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"cut threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._last: np.ndarray | None = None

    @staticmethod
    def signature(image: np.ndarray) -> np.ndarray:
        s = np.asarray(image)[::8, ::8, :3].astype(np.int64) >> 6  # 4 levels per channel
        h = np.bincount((s[..., 0] * 16 + s[..., 1] * 4 + s[..., 2]).ravel(), minlength=64).astype(np.float64)
        return h / max(h.sum(), 1.0)

    def __call__(self, image: np.ndarray) -> bool:
        sig = self.signature(image)
        cut = self._last is not None and 0.5 * float(np.abs(sig - self._last).sum()) > self.threshold
        self._last = sig
        return cut


def canonical_ids(ids, aliases: dict[int, int] | None) -> np.ndarray:
    """``ids`` with every id that late re-identification merged into another (``aliases``: handed-out
    id -> the remembered id it turned out to be) replaced by the id it finally resolves to."""
    ids = np.asarray(ids, np.int64)
    if not aliases:
        return ids
    lut = {}
    for k in aliases:
        i, seen = int(k), set()
        while i in aliases and i not in seen:  # chains: a merged into b, b later into c
            seen.add(i)
            i = int(aliases[i])
        lut[int(k)] = i
    return np.fromiter((lut.get(int(i), int(i)) for i in ids.reshape(-1)), np.int64, ids.size).reshape(
        ids.shape
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


@dataclass
class Track:
    id: int
    box: np.ndarray  # (4,)
    feature: np.ndarray | None  # unit vector, running average (follows slow appearance changes)
    last_step: int
    hits: int = 1
    identity: np.ndarray | None = None  # sum of the unit embeddings seen (its direction: the mean)
    first_step: int = -1

    def appearance(self) -> np.ndarray:
        """The unit direction of :attr:`identity`, the mean appearance re-identification compares.

        Raises:
            ValueError: the track has seen no embedding (only such tracks are remembered or compared).
        """
        if self.identity is None:
            raise ValueError(f"face track {self.id} has no appearance to compare")
        return _unit(self.identity)


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
        reid_memory: int = 0,
        reid_similarity: float = DEFAULT_REID_SIMILARITY,
        reid_min_hits: int = 3,
        reid_young: int = 25,
    ) -> None:
        if reid_memory < 0:
            raise ValueError(f"reid_memory must be >= 0 analysed frames (0: off), got {reid_memory}")
        if not -1.0 <= reid_similarity <= 1.0:
            raise ValueError(f"reid_similarity is a cosine similarity in [-1, 1], got {reid_similarity}")
        self.iou_threshold = iou_threshold
        self.appearance_weight = appearance_weight
        self.min_similarity = min_similarity
        self.max_jump = max_jump
        self.max_age = max_age
        self.momentum = momentum
        self.reid_memory = int(reid_memory)
        self.reid_similarity = reid_similarity
        self.reid_min_hits = reid_min_hits
        self.reid_young = reid_young
        self.reset()

    @classmethod
    def for_rate(
        cls,
        fps: float,
        every: int = 1,
        reid_seconds: float = DEFAULT_REID_SECONDS,
        memory_seconds: float = TRACK_MEMORY_S,
        **kwargs,
    ) -> FaceTracker:
        """A tracker whose memories are given in seconds of video (``DEFAULT_RATE`` when ``fps`` is unknown),
        whatever ``every`` is; explicit ``max_age``/``reid_memory`` in ``kwargs`` win."""
        steps = rate_or_default(fps) / max(1, every)
        kwargs.setdefault("max_age", max(2, round(memory_seconds * steps)))
        kwargs.setdefault("reid_memory", 0 if not reid_seconds else max(1, math.ceil(reid_seconds * steps)))
        return cls(**kwargs)

    def reset(self) -> None:
        """Forget every track (a new file starts at id 0)."""
        self.tracks: list[Track] = []
        self.gallery: list[Track] = []
        self.aliases: dict[int, int] = {}  # id handed out -> the remembered id it turned out to be
        self._next_id = 0
        self._step = -1

    def restore(
        self, boxes: np.ndarray, ids: np.ndarray, next_id: int, aliases: dict[int, int] | None = None
    ) -> None:
        """Continue an interrupted run: the faces ``boxes`` with ``ids`` were seen in the last analysed
        frame, and new faces get ids from ``next_id`` on (appearance is learnt again from the next frame).
        ``aliases``: the merges of late re-identification so far (kept, so :meth:`canonical` still maps
        the ids handed out before the interruption). The re-identification gallery starts empty: a face
        that left before the interruption and returns after it gets a new id."""
        self.reset()
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        ids = np.asarray(ids, np.int64).reshape(-1)
        self._step = 0
        self.tracks = [Track(int(i), b.copy(), None, 0) for b, i in zip(boxes, ids, strict=True)]
        self.aliases = {int(k): int(v) for k, v in (aliases or {}).items()}
        used = max(int(ids.max()) if len(ids) else -1, max(self.aliases, default=-1))
        self._next_id = max(int(next_id), used + 1)

    def canonical(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Ids as finally resolved: a young track merged into a remembered face gets that face's id."""
        return canonical_ids(ids, self.aliases)

    def _merge_young(self) -> None:
        """Young tracks whose mean appearance now matches a remembered face take its id."""
        for t in self.tracks:
            if not self.gallery:
                return
            if t.identity is None or t.hits > self.reid_young or t.last_step != self._step:
                continue
            # only faces last seen before this track began: one id is never twice in a frame
            sim = np.array(
                [
                    g.appearance() @ t.appearance() if g.last_step < t.first_step else -1.0
                    for g in self.gallery
                ]
            )
            k = int(np.argmax(sim))
            if sim[k] >= self.reid_similarity:
                g = self.gallery.pop(k)
                assert g.identity is not None  # the gallery holds only faces with an appearance
                self.aliases[t.id] = g.id
                t.id, t.identity = g.id, t.identity + g.identity
                t.hits += g.hits

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
        known = [t.feature for t in self.tracks if t.feature is not None]
        if feats is not None and have:
            sim = np.full(iou.shape, -1.0)
            sim[have] = np.stack(known) @ _unit(feats).T
            side = np.maximum(tb[:, 2] - tb[:, 0], tb[:, 3] - tb[:, 1])[:, None]
            ct = (tb[:, :2] + tb[:, 2:]) / 2
            cd = (boxes[:, :2] + boxes[:, 2:]) / 2
            jump = np.linalg.norm(ct[:, None] - cd[None], axis=-1) / np.maximum(side, 1e-9)
            score += self.appearance_weight * np.where(sim > -1.0, sim, 0.0)
            ok |= (sim >= self.min_similarity) & (jump <= self.max_jump)
        return np.where(ok, score, -np.inf)

    def _age(self) -> None:
        """Retire tracks out of view for more than ``max_age`` (to the gallery when they may return)."""
        live = []
        for t in self.tracks:
            if self._step - t.last_step <= self.max_age:
                live.append(t)
            elif self.reid_memory and t.identity is not None and t.hits >= self.reid_min_hits:
                self.gallery.append(t)
        self.tracks = live
        self.gallery = [t for t in self.gallery if self._step - t.last_step <= self.reid_memory]

    def _retire_all(self) -> None:
        """A new shot: every live track goes to the gallery (or is forgotten), none stays matchable by box."""
        if self.reid_memory:
            self.gallery += [
                t for t in self.tracks if t.identity is not None and t.hits >= self.reid_min_hits
            ]
        self.tracks = []

    def _reidentify(self, boxes: np.ndarray, feats: np.ndarray, ids: np.ndarray, matched: set[int]) -> None:
        """Give unmatched detections the id of a remembered or just-lost track that looks the same."""
        free = np.flatnonzero(ids < 0)
        cands = [t for i, t in enumerate(self.tracks) if i not in matched and t.identity is not None]
        cands += self.gallery
        if not len(free) or not cands:
            return
        sim = np.stack([t.appearance() for t in cands]) @ _unit(feats[free]).T
        order = np.argsort(-sim, axis=None, kind="stable")
        used_t: set[int] = set()
        for flat in order:
            ci, k = divmod(int(flat), sim.shape[1])
            if sim[ci, k] < self.reid_similarity:
                break
            di = int(free[k])
            if ci in used_t or ids[di] >= 0:
                continue
            used_t.add(ci)
            t = cands[ci]
            if any(g is t for g in self.gallery):
                self.gallery = [g for g in self.gallery if g is not t]
                self.tracks.append(t)
            self._assign(t, boxes[di], feats[di])
            ids[di] = t.id

    def update(self, boxes: np.ndarray, features: np.ndarray | None = None, cut: bool = False) -> np.ndarray:
        """Detections of the next analysed frame -> their track ids (k,) int64.

        ``features``: one appearance vector per detection (any length; cosine similarity is used), or
        None to track by position only (no re-identification then). ``cut``: this frame starts a new
        shot, so no id carries over by position (see :class:`CutDetector`).
        """
        self._step += 1
        if cut:
            self._retire_all()
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        feats = None
        if features is not None and len(boxes):
            feats = np.asarray(features, np.float64).reshape(len(boxes), -1)
        ids = np.full(len(boxes), -1, np.int64)
        self._age()
        matched: set[int] = set()
        if self.tracks and len(boxes):
            s = self._scores(boxes, feats)
            order = np.argsort(-s, axis=None, kind="stable")
            used_d: set[int] = set()
            for flat in order:
                ti, di = divmod(int(flat), s.shape[1])
                if not np.isfinite(s[ti, di]):
                    break
                if ti in matched or di in used_d:
                    continue
                matched.add(ti)
                used_d.add(di)
                self._assign(self.tracks[ti], boxes[di], None if feats is None else feats[di])
                ids[di] = self.tracks[ti].id
        if feats is not None and self.reid_memory and (ids < 0).any():
            self._reidentify(boxes, feats, ids, matched)
        for di in np.flatnonzero(ids < 0):
            f = None if feats is None else _unit(feats[di])
            t = Track(
                self._next_id,
                boxes[di].copy(),
                f,
                self._step,
                identity=None if f is None else f.copy(),
                first_step=self._step,
            )
            self._next_id += 1
            self.tracks.append(t)
            ids[di] = t.id
        if feats is not None and self.reid_memory:
            self._merge_young()
            ids = self.canonical(ids)
        return ids

    def _assign(self, t: Track, box: np.ndarray, feat: np.ndarray | None) -> None:
        t.box = box.copy()
        t.last_step = self._step
        t.hits += 1
        if feat is not None:
            f = _unit(feat)
            t.feature = f if t.feature is None else _unit(self.momentum * t.feature + (1 - self.momentum) * f)
            t.identity = f.copy() if t.identity is None else t.identity + f
