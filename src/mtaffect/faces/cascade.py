"""The MTCNN cascade (Zhang et al. 2016) in numpy, driven by any engine that runs its three nets.

Everything between the networks lives here, once, for every engine: the image pyramid, P-Net window
boxes, box regression, squaring, non-maximum suppression, R-Net/O-Net crops and landmarks. An engine
(:class:`CascadeNets`) only runs the nets: :class:`mtaffect.faces.mtcnn.MTCNN` with PyTorch,
:mod:`mtaffect.runtime` with onnxruntime. This module imports without torch.

Conventions of the nets (checked on ``skimage.data.astronaut()``, see tests/test_mtcnn.py): RGB input,
pixels normalised as ``(x - 127.5) / 128``, images in their natural (H, W) orientation, NCHW float32;
box offsets are (dx1, dy1, dx2, dy2) in box widths/heights; landmarks are five x's then five y's,
relative to the box.

Pipeline details that decide borderline windows follow the original implementation: P-Net cells map
to boxes with its (slightly narrow) window arithmetic, which later stages were trained on; boxes are
squared before each crop; the last NMS divides by the smaller area. Candidates are ranked on their
probability capped just below 1 (:func:`rank_scores`), ties in the previous stage's order: a saturated
probability is rounded differently by each engine, and must not decide which box wins. Resampling is
approximated for speed: the pyramid is plain bilinear (measured to keep the reference's detections on
the test photos), and R/O-Net crops are bilinear reads from 2x2-averaged mip levels (close to area
resizing).

The pyramid is defined bit for bit by :func:`resize_bilinear`: PyTorch's uint8 bilinear kernel
(``F.interpolate(mode="bilinear", align_corners=False)`` on x86 AVX2 / ARM NEON: int16 weights,
horizontal pass rounded to uint8, then vertical), written in numpy. The torch engine calls that kernel
itself (several times faster); a test holds the two equal, so both engines see the same pixels.

Speed (CPU): all same-sized frames pass through each pyramid level together; candidate boxes of all
frames are cropped in one gather and refined together; NMS is vectorised. A larger ``min_face_size``
skips the most expensive pyramid levels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

import numpy as np
from PIL import Image

from mtaffect.faces.align import sample_grid

#: Pixel normalisation of the three nets: (x - PIXEL_MEAN) * PIXEL_SCALE.
PIXEL_MEAN: Final[float] = 127.5
PIXEL_SCALE: Final[float] = 1 / 128
#: Input sides of P-Net (window), R-Net and O-Net (crops).
PNET_WINDOW: Final[int] = 12
RNET_SIZE: Final[int] = 24
ONET_SIZE: Final[int] = 48
#: Above this many boxes NMS handles groups one by one (smaller overlap matrices).
_NMS_SPLIT = 256
#: Above this many boxes (in one group) NMS walks the kept boxes instead of building the full matrix.
_NMS_MATRIX_MAX = 2500
#: Face probabilities at or above this rank as ties (logit 10.4). Near 1 a float32 probability has few
#: values left (spacing 6e-8) and the engines' sigmoids differ there by an ulp or two (a saturated O-Net
#: window is 1.0 in torch, 0.99999994 in onnxruntime), so their order would be the engine's rounding; tied
#: candidates keep the order of the stage before (see :func:`rank_scores`).
RANK_CAP: Final[float] = 1 - 2**-15


@dataclass
class FaceDetections:
    """Faces found in one image, sorted by score (best first).

    boxes: (k, 4) float32 x1, y1, x2, y2 in pixels (edge coordinates: x2 - x1 is the width);
    scores: (k,) float32 O-Net face probability; landmarks: (k, 5, 2) float32 (x, y) of left eye, right
    eye, nose, mouth left, mouth right (left/right as seen in the image), pixel-index coordinates.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> FaceDetections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


class CascadeNets(Protocol):
    """What an engine provides: the three nets on numpy arrays (float32 in and out).

    ``pnet`` receives the uint8 frames (B, H, W, 3) and the pyramid sizes; it yields, level by level,
    P(face) (B, h, w) and box offsets (B, 4, h, w) of ``normalise(resize_bilinear(frames, size))``.
    ``rnet``/``onet`` take normalised crops (K, 3, 24, 24) / (K, 3, 48, 48) (a channels-last view:
    call ``np.ascontiguousarray`` if the engine needs NCHW memory) and return P(face) (K,), offsets
    (K, 4) and, for O-Net, landmarks (K, 10).
    """

    def pnet(
        self, frames: np.ndarray, sizes: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def rnet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def onet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


# ---- pixels --------------------------------------------------------------------------------------------


def _resize_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Two-tap bilinear weights (half-pixel centres) of one axis as torch's uint8 kernel quantises them.

    Returns the first and second source index of each output, their int32 weights and the precision
    (the weights sum to about ``2**precision``).
    """
    centre = (n_in / n_out) * (np.arange(n_out) + 0.5)
    lo = np.maximum((centre - 0.5).astype(np.int64), 0)  # int(centre - support + 0.5), support 1
    hi = np.minimum((centre + 1.5).astype(np.int64), n_in)
    w = np.zeros((n_out, 2))
    for j in range(2):
        tap = (1.0 - np.abs(lo + j - centre + 0.5)).clip(min=0.0)
        w[:, j] = np.where(lo + j < hi, tap, 0.0)
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    precision = 0
    for precision in range(22):  # the largest precision whose biggest weight still fits int16
        if int(0.5 + w.max() * (1 << (precision + 1))) >= (1 << 15):
            break
    q = np.trunc(0.5 + w * (1 << precision)).astype(np.int32)  # bilinear weights are never negative
    return lo, np.minimum(lo + 1, n_in - 1), q, precision


def _interpolate(
    x: np.ndarray, axis: int, first: np.ndarray, second: np.ndarray, q: np.ndarray, precision: int
) -> np.ndarray:
    """One pass: ``(x[first] * q0 + x[second] * q1 + round) >> precision`` along ``axis``, as uint8."""
    shape = [1] * x.ndim
    shape[axis] = len(first)
    acc = np.multiply(np.take(x, first, axis=axis), q[:, 0].reshape(shape), dtype=np.int32)
    acc += np.multiply(np.take(x, second, axis=axis), q[:, 1].reshape(shape), dtype=np.int32)
    acc += 1 << (precision - 1)
    acc >>= precision
    return acc.astype(np.uint8)  # never above 255: the weights sum to at most 2**precision + 1


def resize_bilinear(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, H, W, C) -> (B, h, w, C): plain bilinear (half-pixel centres, no antialiasing).

    Bit-identical to PyTorch's uint8 ``F.interpolate(..., mode="bilinear", align_corners=False)`` on
    CPUs with AVX2 or NEON (the pyramid the torch engine builds): horizontal pass first, rounded to
    uint8, then the vertical pass, both with torch's int16-quantised weights. The horizontal pass
    runs only on the rows the vertical pass reads.
    """
    h, w = size
    x = frames
    vertical = None
    if h != x.shape[1]:
        first, second, q, precision = _resize_weights(x.shape[1], h)
        rows = np.unique(np.concatenate([first, second]))
        x = x[:, rows]
        vertical = (np.searchsorted(rows, first), np.searchsorted(rows, second), q, precision)
    if w != x.shape[2]:
        x = _interpolate(x, 2, *_resize_weights(x.shape[2], w))
    if vertical is not None:
        x = _interpolate(x, 1, *vertical)
    return x if x is not frames else frames.copy()


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> the nets' float32 (B, 3, H, W) input."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - np.float32(PIXEL_MEAN)) * np.float32(PIXEL_SCALE))


def _half(x: np.ndarray) -> np.ndarray:
    """Exact 2x2 box average of (B, H, W, C) uint8 images, rounded (an odd last row/column is dropped).

    PIL's ``reduce(2)`` computes exactly ``(a + b + c + d + 2) >> 2``, twice as fast as numpy or torch.
    """
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    box = (0, 0, 2 * w2, 2 * h2)
    return np.stack([np.asarray(Image.fromarray(f).reduce(2, box=box)) for f in x])


class _Level(NamedTuple):
    """A crop source: (B, h, w, 3) uint8 images and their scale relative to the frames, per axis."""

    image: np.ndarray
    sx: float
    sy: float


def _extend_mips(chain: list[_Level], upto: int, min_side: int = PNET_WINDOW) -> None:
    """Grow ``chain`` (frames first) with 2x2-averaged halves up to level ``upto`` (scale 2**-upto)."""
    while len(chain) <= upto and min(chain[-1].image.shape[1:3]) >= 2 * min_side:
        last = chain[-1]
        chain.append(_Level(_half(last.image), last.sx / 2, last.sy / 2))


def _crops(sources: list[_Level], frame: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Normalised (K, 3, size, size) crops of boxes, black outside the image.

    Each box is read bilinearly from the mip level (2x2 box averages of the frames, made on demand)
    on which a crop pixel spans 1 to 2 source pixels, or from the frames for boxes smaller than
    ``size``: close to the area resampling of the reference implementation at the cost of plain
    bilinear sampling (no per-box resize, no supersampling).
    """
    side = np.maximum((boxes[:, 2:] - boxes[:, :2]).max(1), np.float32(1e-3))
    level = np.floor(np.log2(side / np.float32(size))).clip(min=0).astype(np.int64)
    if len(level):
        _extend_mips(sources, int(level.max()))
    level = level.clip(max=len(sources) - 1)
    out = np.empty((len(boxes), size, size, 3), np.float32)
    grid = np.arange(size, dtype=np.float32) + np.float32(0.5)
    for li in np.unique(level):
        sel = np.flatnonzero(level == li)
        lv, b = sources[li], boxes[sel]
        step = (b[:, 2:] - b[:, :2]) * np.array([lv.sx, lv.sy], np.float32) / np.float32(size)
        # Crop pixel u covers source edge coordinates x1 + [u, u + 1) * step; sample at its centre.
        xs = b[:, 0:1] * np.float32(lv.sx) + grid * step[:, 0:1] - np.float32(0.5)
        ys = b[:, 1:2] * np.float32(lv.sy) + grid * step[:, 1:2] - np.float32(0.5)
        out[sel] = sample_grid(lv.image, frame[sel], xs, ys)
    out -= np.float32(PIXEL_MEAN)
    out *= np.float32(PIXEL_SCALE)
    return out.transpose(0, 3, 1, 2)  # a view: channels-last memory, the layout torch's convs like


# ---- boxes ---------------------------------------------------------------------------------------------


def box_areas(b: np.ndarray) -> np.ndarray:
    """Areas (n,) of edge-coordinate boxes (n, 4), 0 for an empty box, in ``b``'s dtype."""
    return (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)


def box_intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas (n, m) of edge-coordinate boxes, one axis at a time (no (n, m, 2)
    temporaries), in the inputs' dtype."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return iw.clip(min=0) * ih.clip(min=0)


def _denominator(a: np.ndarray, b: np.ndarray, inter: np.ndarray, mode: str) -> np.ndarray:
    if mode == "union":
        return (box_areas(a)[:, None] + box_areas(b)[None, :]) - inter
    if mode == "min":
        return np.minimum(box_areas(a)[:, None], box_areas(b)[None, :])
    raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")


def box_iou(boxes: np.ndarray, others: np.ndarray, mode: str = "union") -> np.ndarray:
    """Pairwise overlap (n, m) of edge-coordinate boxes; ``mode='min'`` divides by the smaller area."""
    a, b = np.asarray(boxes, np.float32), np.asarray(others, np.float32)
    inter = box_intersections(a, b)
    return inter / np.maximum(_denominator(a, b, inter, mode), np.float32(1e-9))


def _overlapping(a: np.ndarray, b: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """Boolean (n, m): overlap above ``threshold`` (compared without dividing)."""
    inter = box_intersections(a, b)
    return inter > _denominator(a, b, inter, mode) * np.float32(threshold)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    groups: np.ndarray | None = None,
    mode: str = "union",
) -> np.ndarray:
    """Greedy non-maximum suppression; indices (int64) of the kept boxes, best score first (equal
    scores in their given order: the cascade passes :func:`rank_scores`).

    Boxes of different ``groups`` (e.g. frames) never suppress each other. Exact greedy result,
    computed without a Python loop per box: a box is kept iff no *kept* better box overlaps it by more
    than ``threshold``; iterating that rule from "all kept" settles one more prefix of the ranking per
    round and usually converges in a handful of rounds.
    """
    boxes, scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
    groups = None if groups is None else np.asarray(groups)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    if groups is not None and n > _NMS_SPLIT:
        by_group = np.argsort(groups, kind="stable")
        _, starts = np.unique(groups[by_group], return_index=True)
        if len(starts) > 1:
            parts = np.split(by_group, starts[1:])
            kept = [idx[_nms_one(boxes[idx], scores[idx], threshold, None, mode)] for idx in parts]
            keep = np.sort(np.concatenate(kept))
            return keep[np.argsort(-scores[keep], kind="stable")]  # equal scores in their given order
    return _nms_one(boxes, scores, threshold, groups, mode)


def _nms_one(
    boxes: np.ndarray, scores: np.ndarray, threshold: float, groups: np.ndarray | None, mode: str
) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    g = groups[order] if groups is not None else None
    n = b.shape[0]
    if n > _NMS_MATRIX_MAX:
        return order[_nms_walk(b, threshold, mode, g)]
    over = np.triu(_overlapping(b, b, threshold, mode), 1)  # over[i, j]: better box i overlaps box j
    if g is not None:
        over &= g[:, None] == g[None, :]
    keep: np.ndarray = np.ones(n, bool)
    for _ in range(n):
        new = ~(over & keep[:, None]).any(0)
        if np.array_equal(new, keep):
            break
        keep = new
    return order[keep]


def _nms_walk(b: np.ndarray, threshold: float, mode: str, g: np.ndarray | None) -> np.ndarray:
    """Greedy NMS on score-sorted boxes with memory linear in n (one step per kept box)."""
    remaining = np.arange(b.shape[0])
    kept = []
    while len(remaining):
        i = remaining[:1]
        kept.append(i)
        rest = remaining[1:]
        hit = _overlapping(b[i], b[rest], threshold, mode)[0]
        if g is not None:
            hit &= g[rest] == g[i]
        remaining = rest[~hit]
    return np.concatenate(kept)


def rank_scores(prob: np.ndarray) -> np.ndarray:
    """The key candidates are ranked by (in NMS and in the output order): P(face) capped at
    :data:`RANK_CAP`. Capped candidates tie, and ties keep their incoming order (stable sorts), which is
    the previous stage's ranking: so every engine ranks the same windows first, whatever its float32
    rounding of a saturated probability."""
    return np.minimum(np.asarray(prob, np.float32), np.float32(RANK_CAP))


def _window_boxes(xx: np.ndarray, yy: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Frame boxes of P-Net output cells (stride 2, 12x12 windows) on a level of scale (sx, sy).

    Uses the original MTCNN mapping (1-based window pixels 2i+1 .. 2i+12 divided by the scale and
    truncated), not the exact window footprint: it is about 1/scale - 1 pixels narrower on the left/top,
    and R-Net was trained on proposals made this way. Measured here, it removed false positives (on
    the astronaut photo and natural-background composites) without losing any face.
    """
    xf, yf = xx.astype(np.float32) * 2, yy.astype(np.float32) * 2
    fx, fy = np.float32(sx), np.float32(sy)
    return np.stack(
        [
            np.floor((xf + 1) / fx) - 1,  # first pixel, 1-based -> left edge, 0-based
            np.floor((yf + 1) / fy) - 1,
            np.floor((xf + 12) / fx),  # last pixel, 1-based == right edge, 0-based
            np.floor((yf + 12) / fy),
        ],
        1,
    )


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply (dx1, dy1, dx2, dy2) offsets, in units of box width/height."""
    wh = np.tile(boxes[:, 2:] - boxes[:, :2], (1, 2))
    return boxes + offsets * wh


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of side max(w, h) about its centre."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / np.float32(2)
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdims=True) / np.float32(2)
    return np.concatenate([centre - half, centre + half], 1)


# ---- the cascade ---------------------------------------------------------------------------------------


def as_frames(images) -> list[np.ndarray]:
    """One (H, W, 3) uint8 RGB image, an (N, H, W, 3) array or a sequence of images -> list of arrays."""
    if isinstance(images, np.ndarray) or (hasattr(images, "__array__") and not isinstance(images, Sequence)):
        arr = np.asarray(images)
        if arr.ndim == 3:
            frames = [arr]
        elif arr.ndim == 4:
            frames = list(arr)
        else:
            raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) uint8 RGB images, got shape {arr.shape}")
    elif isinstance(images, Sequence):
        frames = [np.asarray(im) for im in images]
    else:
        raise TypeError(f"expected a uint8 RGB array or a list of them, got {type(images).__name__}")
    for i, f in enumerate(frames):
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(
                f"image {i}: expected uint8 RGB of shape (H, W, 3), got {f.dtype} {f.shape}; "
                "convert greyscale/RGBA with PIL's .convert('RGB') and floats with (x * 255).astype(np.uint8)"
            )
    return frames


class Cascade:
    """Multi-task cascaded face detector with five landmarks over an engine's nets.

    ``min_face_size`` (pixels) sets the finest pyramid level: raising it to 40 cuts P-Net work about
    four-fold. ``thresholds`` are the P-, R- and O-Net face probabilities a window must reach.
    ``factor`` is the pyramid's scale step. ``batch_size`` caps how many same-sized frames share one
    pass (it bounds memory).
    """

    def __init__(
        self,
        nets: CascadeNets,
        min_face_size: float = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        batch_size: int = 32,
    ) -> None:
        if min_face_size < 1:
            raise ValueError(f"min_face_size must be >= 1 pixel, got {min_face_size}")
        if not 0 < factor < 1:
            raise ValueError(f"factor (pyramid scale step) must lie in (0, 1), got {factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (P, R, O-Net), got {thresholds}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.nets = nets
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.batch_size = int(batch_size)

    def __call__(self, images) -> list[FaceDetections]:
        return self.detect(images)

    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales: the smallest face maps to P-Net's 12-pixel window, then shrink by ``factor``."""
        m = PNET_WINDOW / self.min_face_size
        side = min(height, width) * m
        out: list[float] = []
        while side >= PNET_WINDOW:
            out.append(m * self.factor ** len(out))
            side *= self.factor
        return out

    def pyramid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(h, w) of every pyramid level of a (height, width) frame."""
        return [(math.ceil(height * s), math.ceil(width * s)) for s in self.scales(height, width)]

    def detect(self, images) -> list[FaceDetections]:
        """Detect faces in one uint8 RGB (H, W, 3) image or many; one :class:`FaceDetections` per image.

        Same-sized images are processed as one batch; mixed sizes are grouped by size.
        """
        frames = as_frames(images)
        results: list[FaceDetections] = [FaceDetections.empty()] * len(frames)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            by_size.setdefault(f.shape[:2], []).append(i)
        for same_size in by_size.values():
            for start in range(0, len(same_size), self.batch_size):
                idx = same_size[start : start + self.batch_size]
                batch = np.stack([frames[i] for i in idx])
                for i, det in zip(idx, self._detect_batch(batch), strict=True):
                    results[i] = det
        return results

    def refine(self, image: np.ndarray, boxes: np.ndarray) -> FaceDetections:
        """Re-locate faces near ``boxes`` (k, 4) in one image with the last stage (O-Net) only.

        The cheap step between full detections when tracking video: each previous box is squared
        (the shape O-Net was trained on) and re-scored; faces whose probability falls below the last
        threshold are dropped (the face left or turned away).
        """
        if len(boxes) == 0:
            return FaceDetections.empty()
        (frame_img,) = as_frames(image)
        b = _square(np.asarray(boxes, np.float32).reshape(-1, 4))
        frame = np.zeros(len(b), np.int64)
        _, out_boxes, prob, marks = self._output([_Level(frame_img[None], 1.0, 1.0)], frame, b)
        return FaceDetections(out_boxes, prob, marks)  # best first: the last NMS's order

    # -- stages --

    def _detect_batch(self, frames: np.ndarray) -> list[FaceDetections]:
        """frames: (B, H, W, 3) uint8 RGB."""
        sources = [_Level(frames, 1.0, 1.0)]  # crop sources for R-Net and O-Net; mips are added on demand
        frame, boxes, score, offsets = self._propose(frames)
        if len(frame):
            boxes = _square(_regress(boxes, offsets))
            frame, boxes, score, offsets = self._refine(sources, frame, boxes)
        if len(frame):
            boxes = _square(_regress(boxes, offsets))
            frame, boxes, score, marks = self._output(sources, frame, boxes)
        else:
            marks = np.zeros((0, 5, 2), np.float32)
        out = [FaceDetections.empty() for _ in range(len(frames))]
        for b in np.unique(frame):
            sel = np.flatnonzero(frame == b)  # best first: the last NMS's order, kept within a frame
            out[int(b)] = FaceDetections(boxes[sel], score[sel], marks[sel])
        return out

    def _propose(self, frames: np.ndarray):
        """P-Net over the pyramid: candidates (frame, box, score, offsets), NMS within and across scales."""
        height, width = frames.shape[1:3]
        sizes = self.pyramid_sizes(height, width)
        found = []
        for (hs, ws), (prob, reg) in zip(sizes, self.nets.pnet(frames, sizes), strict=True):
            b, yy, xx = np.nonzero(prob >= np.float32(self.thresholds[0]))
            if not len(b):
                continue
            sc = prob[b, yy, xx]
            off = reg[b, :, yy, xx]
            boxes = _window_boxes(xx, yy, ws / width, hs / height)
            keep = nms(boxes, rank_scores(sc), 0.5, b)
            found.append((b[keep], boxes[keep], sc[keep], off[keep]))
        if not found:
            e = np.zeros((0, 4), np.float32)
            return np.zeros(0, np.int64), e, np.zeros(0, np.float32), e
        frame, boxes, score, offsets = (np.concatenate(t) for t in zip(*found, strict=True))
        keep = nms(boxes, rank_scores(score), 0.7, frame)
        return frame[keep], boxes[keep], score[keep], offsets[keep]

    def _refine(self, sources: list[_Level], frame: np.ndarray, boxes: np.ndarray):
        prob, reg = self.nets.rnet(_crops(sources, frame, boxes, RNET_SIZE))
        ok = prob >= np.float32(self.thresholds[1])
        frame, boxes, prob, reg = frame[ok], boxes[ok], prob[ok], reg[ok]
        keep = nms(boxes, rank_scores(prob), 0.7, frame)
        return frame[keep], boxes[keep], prob[keep], reg[keep]

    def _output(self, sources: list[_Level], frame: np.ndarray, boxes: np.ndarray):
        prob, reg, pts = self.nets.onet(_crops(sources, frame, boxes, ONET_SIZE))
        ok = prob >= np.float32(self.thresholds[2])
        frame, boxes, prob, reg, pts = frame[ok], boxes[ok], prob[ok], reg[ok], pts[ok]
        wh = boxes[:, 2:] - boxes[:, :2]
        marks = np.stack([pts[:, :5], pts[:, 5:]], 2) * wh[:, None, :] + boxes[:, None, :2]
        boxes = _regress(boxes, reg)
        keep = nms(boxes, rank_scores(prob), 0.7, frame, mode="min")
        return frame[keep], boxes[keep], prob[keep], marks[keep].astype(np.float32)


#: CPU forward passes are sized so their largest activation is about this big (see :func:`chunk_items`).
CPU_CHUNK_BYTES = 8 << 20
#: Bytes per item of each net's largest activation (float32): P-Net's first conv (10 channels of a level
#: (h - 2) x (w - 2), per frame: multiply by that area), R-Net's (28 x 22 x 22), O-Net's (32 x 46 x 46).
PNET_BYTES_PER_PIXEL, RNET_BYTES, ONET_BYTES = 4 * 10, 4 * 28 * 22 * 22, 4 * 32 * 46 * 46


def chunk_items(bytes_per_item: int) -> int:
    """Items per CPU forward pass, so that the first activation stays cache-sized: large fresh
    activations cost page faults and cache misses (a few frames at a time ran P-Net about twice as fast
    as 16 at once), and memory stays bounded whatever the number of candidate windows."""
    return max(1, CPU_CHUNK_BYTES // max(1, bytes_per_item))


def chunks(n: int, step: int) -> Iterable[slice]:
    """Slices covering range(n) in steps of ``step`` (engines run nets a cache-sized chunk at a time)."""
    return (slice(s, min(n, s + step)) for s in range(0, n, max(1, step)))


__all__ = [
    "Cascade",
    "CascadeNets",
    "FaceDetections",
    "as_frames",
    "box_areas",
    "box_intersections",
    "box_iou",
    "nms",
    "normalise",
    "rank_scores",
    "resize_bilinear",
]
