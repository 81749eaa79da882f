"""MTCNN face detector (Zhang et al. 2016) in plain PyTorch, batched over frames.

Three cascaded nets: P-Net scans an image pyramid for 12x12 face windows, R-Net re-scores and refines
24x24 crops of the survivors, O-Net does the same on 48x48 crops and adds five landmarks. The weights
are the original authors' release as converted by facenet-pytorch (MIT), vendored as
``mtaffect/weights/mtcnn.safetensors`` and read with safetensors only.

Conventions of these weights (checked on ``skimage.data.astronaut()``, see tests/test_mtcnn.py):
RGB input, pixels normalised as ``(x - 127.5) / 128``, images in their natural (H, W) orientation; the
dense layers of R-Net/O-Net expect features flattened in (W, H, C) order (a trace of the Caffe nets,
which were trained on transposed images); box offsets are (dx1, dy1, dx2, dy2) in box widths/heights;
landmarks are five x's then five y's, relative to the box.

Pipeline details that decide borderline windows follow the original implementation: P-Net cells map
to boxes with its (slightly narrow) window arithmetic, which later stages were trained on; boxes are
squared before each crop; the last NMS divides by the smaller area. Resampling is approximated for
speed: the pyramid is plain bilinear (measured to keep the reference's detections on the test photos),
and R/O-Net crops are bilinear reads from 2x2-averaged mip levels (close to area resizing).

Speed (CPU): all same-sized frames pass through each pyramid level together, in chunks sized so
activations stay cache-sized; candidate boxes of all frames are cropped in one gather and refined
together; NMS is vectorised. A larger ``min_face_size`` skips the most expensive pyramid levels. On a
machine whose cores are shared, OpenMP's spin-waiting can make multi-threaded torch many times slower:
set ``OMP_WAIT_POLICY=PASSIVE`` or ``torch.set_num_threads(1)`` there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mtaffect.faces.align import sample_grid

#: CPU forward passes are sized so their largest activation is about this big (see ``MTCNN._chunk``).
_CPU_CHUNK_BYTES = 8 << 20

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mtcnn.safetensors"


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


# ---- the three nets (layer names match the converted state dicts) --------------------------------------


def _face_prob(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """P(face) of a 2-way softmax, as a sigmoid of the logit difference (index 1 is 'face')."""
    return torch.sigmoid(logits.narrow(dim, 1, 1) - logits.narrow(dim, 0, 1)).squeeze(dim)


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    """Flatten (N, C, H, W) features in the (W, H, C) order the dense weights were trained with."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


def _strided(x: torch.Tensor, dim: int, start: int, count: int, stride: int) -> torch.Tensor:
    """View of ``count`` entries of ``x`` along ``dim`` (negative), from ``start`` every ``stride``."""
    return x.narrow(dim, start, (count - 1) * stride + 1)[
        (slice(None),) * (x.ndim + dim) + (slice(None, None, stride),)
    ]


def _max_pool(x: torch.Tensor, k: int, stride: int = 2) -> torch.Tensor:
    """k x k max pooling with ceil mode (as the Caffe nets), from strided maxima, one axis at a time.

    Windows running past the edge just have fewer members, so nothing is padded; several times faster
    than ``F.max_pool2d`` on CPU for these small kernels, and bit-identical.
    """
    cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    for dim in (-1, -2):
        n = x.shape[dim]
        n_out = -(-(n - k) // stride) + 1
        counts = [min(n_out, (n - 1 - i) // stride + 1) for i in range(k)]  # members at offset i
        shape = list(x.shape)
        shape[dim] = n_out
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        head = out.narrow(dim, 0, counts[1])
        torch.maximum(
            _strided(x, dim, 0, counts[1], stride), _strided(x, dim, 1, counts[1], stride), out=head
        )
        if counts[1] < n_out:  # the last window holds only offset 0
            out.narrow(dim, counts[1], n_out - counts[1]).copy_(
                _strided(x, dim, counts[1] * stride, n_out - counts[1], stride)
            )
        for i in range(2, k):
            dst = out.narrow(dim, 0, counts[i])
            torch.maximum(dst, _strided(x, dim, i, counts[i], stride), out=dst)
        x = out
    return x


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised -> P(face) (N, h, w) and box offsets (N, 4, h, w)."""
        x = _max_pool(self.prelu1(self.conv1(x)), 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        # The two 1x1 heads as one matmul over pixels: torch sends 1x1 convs with 2-4 outputs to its slow
        # reference kernel on CPU.
        n, c, h, w = x.shape
        weight = torch.cat([self.conv4_1.weight, self.conv4_2.weight]).view(6, c)
        bias = torch.cat([self.conv4_1.bias, self.conv4_2.bias])
        y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.t()).view(n, h, w, 6)
        return torch.sigmoid(y[..., 1] - y[..., 0]), y[..., 2:].permute(0, 3, 1, 2)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _max_pool(self.prelu1(self.conv1(x)), 3)
        x = _max_pool(self.prelu2(self.conv2(x)), 3)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_whc(x)))
        return _face_prob(self.dense5_1(x)), self.dense5_2(x)  # (N,), (N, 4)


class ONet(nn.Module):
    """Output net on 48x48 crops: score, box offsets and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _max_pool(self.prelu1(self.conv1(x)), 3)
        x = _max_pool(self.prelu2(self.conv2(x)), 3)
        x = _max_pool(self.prelu3(self.conv3(x)), 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_whc(x)))
        return _face_prob(self.dense6_1(x)), self.dense6_2(x), self.dense6_3(x)  # (N,), (N, 4), (N, 10)


# ---- box utilities -------------------------------------------------------------------------------------


def _areas(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def _intersections(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection areas (n, m), one axis at a time (no (n, m, 2) temporaries)."""
    iw = torch.minimum(a[:, None, 2], b[None, :, 2]).sub_(torch.maximum(a[:, None, 0], b[None, :, 0]))
    ih = torch.minimum(a[:, None, 3], b[None, :, 3]).sub_(torch.maximum(a[:, None, 1], b[None, :, 1]))
    return iw.clamp_(min=0).mul_(ih.clamp_(min=0))


def _denominator(a: torch.Tensor, b: torch.Tensor, inter: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "union":
        return (_areas(a)[:, None] + _areas(b)[None, :]).sub_(inter)
    if mode == "min":
        return torch.minimum(_areas(a)[:, None], _areas(b)[None, :])
    raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")


def box_iou(boxes: torch.Tensor, others: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Pairwise overlap (n, m) of edge-coordinate boxes; ``mode='min'`` divides by the smaller area."""
    inter = _intersections(boxes, others)
    return inter / _denominator(boxes, others, inter, mode).clamp_(min=1e-9)


def _overlapping(a: torch.Tensor, b: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """Boolean (n, m): overlap above ``threshold`` (compared without dividing)."""
    inter = _intersections(a, b)
    return inter > _denominator(a, b, inter, mode).mul_(threshold)


#: Above this many boxes NMS handles groups one by one (smaller overlap matrices).
_NMS_SPLIT = 256
#: Above this many boxes (in one group) NMS walks the kept boxes instead of building the full matrix.
_NMS_MATRIX_MAX = 2500


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    groups: torch.Tensor | None = None,
    mode: str = "union",
) -> torch.Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    Boxes of different ``groups`` (e.g. frames) never suppress each other. Exact greedy result,
    computed without a Python loop per box: a box is kept iff no *kept* better box overlaps it by more
    than ``threshold``; iterating that rule from "all kept" settles one more prefix of the ranking per
    round and usually converges in a handful of rounds.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if groups is not None and n > _NMS_SPLIT:
        by_group = torch.argsort(groups, stable=True)
        _, counts = torch.unique_consecutive(groups[by_group], return_counts=True)
        if len(counts) > 1:
            parts = by_group.split(counts.tolist())
            keep = torch.cat([idx[_nms_one(boxes[idx], scores[idx], threshold, None, mode)] for idx in parts])
            return keep[scores[keep].argsort(descending=True, stable=True)]
    return _nms_one(boxes, scores, threshold, groups, mode)


def _nms_one(
    boxes: torch.Tensor, scores: torch.Tensor, threshold: float, groups: torch.Tensor | None, mode: str
) -> torch.Tensor:
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order]
    g = groups[order] if groups is not None else None
    n = b.shape[0]
    if n > _NMS_MATRIX_MAX:
        return order[_nms_walk(b, threshold, mode, g)]
    over = _overlapping(b, b, threshold, mode).triu_(1)  # over[i, j]: better box i overlaps box j
    if g is not None:
        over &= g[:, None] == g[None, :]
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    for _ in range(n):
        new = ~(over & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def _nms_walk(b: torch.Tensor, threshold: float, mode: str, g: torch.Tensor | None) -> torch.Tensor:
    """Greedy NMS on score-sorted boxes with memory linear in n (one step per kept box)."""
    remaining = torch.arange(b.shape[0], device=b.device)
    kept = []
    while remaining.numel():
        i = remaining[:1]
        kept.append(i)
        rest = remaining[1:]
        hit = _overlapping(b[i], b[rest], threshold, mode)[0]
        if g is not None:
            hit &= g[rest] == g[i]
        remaining = rest[~hit]
    return torch.cat(kept)


def _window_boxes(xx: torch.Tensor, yy: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Frame boxes of P-Net output cells (stride 2, 12x12 windows) on a level of scale (sx, sy).

    Uses the original MTCNN mapping (1-based window pixels 2i+1 .. 2i+12 divided by the scale and
    truncated), not the exact window footprint: it is about 1/scale - 1 pixels narrower on the left/top,
    and R-Net was trained on proposals made this way. Measured here, it removed false positives (on
    the astronaut photo and natural-background composites) without losing any face.
    """
    xf, yf = xx.float() * 2, yy.float() * 2
    return torch.stack(
        [
            torch.floor((xf + 1) / sx) - 1,  # first pixel, 1-based -> left edge, 0-based
            torch.floor((yf + 1) / sy) - 1,
            torch.floor((xf + 12) / sx),  # last pixel, 1-based == right edge, 0-based
            torch.floor((yf + 12) / sy),
        ],
        1,
    )


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply (dx1, dy1, dx2, dy2) offsets, in units of box width/height."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * wh


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square of side max(w, h) about its centre."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], 1)


# ---- the detector --------------------------------------------------------------------------------------


class _Level(NamedTuple):
    """One pyramid level: (B, 3, h, w) images and their scale relative to the frames, per axis."""

    image: torch.Tensor
    sx: float
    sy: float


def _half(x: torch.Tensor) -> torch.Tensor:
    """Exact 2x2 box average of (B, C, H, W) channels-last images (an odd last row/column is dropped).

    uint8 stays uint8 (rounded); sums run over whole rows of the (B, H, W, C) memory, the fast way.
    """
    b, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    t = x.permute(0, 2, 3, 1)[:, : 2 * h2, : 2 * w2].reshape(b, h2, 2, w2 * 2 * c)
    acc = torch.int16 if x.dtype == torch.uint8 else x.dtype
    rows = (t[:, :, 0].to(acc) + t[:, :, 1]).view(b, h2, w2, 2, c)
    s = rows[:, :, :, 0] + rows[:, :, :, 1]
    s = s.add_(2).div_(4, rounding_mode="floor").to(torch.uint8) if x.dtype == torch.uint8 else s.div_(4)
    return s.permute(0, 3, 1, 2)


def _extend_mips(chain: list[_Level], upto: int, min_side: int = 12) -> None:
    """Grow ``chain`` (frames first) with 2x2-averaged halves up to level ``upto`` (scale 2**-upto)."""
    while len(chain) <= upto and min(chain[-1].image.shape[-2:]) >= 2 * min_side:
        last = chain[-1]
        chain.append(_Level(_half(last.image), last.sx / 2, last.sy / 2))


def _as_frames(images) -> list[np.ndarray]:
    """One (H, W, 3) uint8 RGB image, an (N, H, W, 3) array or a sequence of images -> list of arrays."""
    if isinstance(images, np.ndarray) or torch.is_tensor(images):
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


class MTCNN:
    """Multi-task cascaded face detector with five landmarks; ``detect(images)`` or call the object.

    ``min_face_size`` (pixels) sets the finest pyramid level: raising it to 40 cuts P-Net work about
    four-fold. ``thresholds`` are the P-, R- and O-Net face probabilities a window must reach.
    ``batch_size`` caps how many same-sized frames share one pass (it bounds memory).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: float = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        weights: str | Path | None = None,
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
        self.device = torch.device(device)
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.batch_size = int(batch_size)
        self.weights = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self._load(self.weights)
        for net in (self.pnet, self.rnet, self.onet):
            net.to(self.device).eval().requires_grad_(False)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"MTCNN weights not found: {path}; reinstall mtaffect or pass weights=")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        for name, net in (("pnet", self.pnet), ("rnet", self.rnet), ("onet", self.onet)):
            sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            expected = net.state_dict()
            missing = sorted(set(expected) - set(sub))
            unexpected = sorted(set(sub) - set(expected))
            wrong = sorted(k for k in set(sub) & set(expected) if sub[k].shape != expected[k].shape)
            if missing or unexpected or wrong:
                raise ValueError(
                    f"{path}: not MTCNN weights for {name} (missing {missing}, unexpected {unexpected}, "
                    f"wrong shape {wrong}); regenerate with scripts/convert_mtcnn_weights.py"
                )
            net.load_state_dict(sub)

    def __call__(self, images) -> list[FaceDetections]:
        return self.detect(images)

    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales: the smallest face maps to P-Net's 12-pixel window, then shrink by ``factor``."""
        m = 12.0 / self.min_face_size
        side = min(height, width) * m
        out = []
        while side >= 12:
            out.append(m * self.factor ** len(out))
            side *= self.factor
        return out

    @torch.inference_mode()
    def detect(self, images) -> list[FaceDetections]:
        """Detect faces in one uint8 RGB (H, W, 3) image or many; one :class:`FaceDetections` per image.

        Same-sized images are processed as one batch; mixed sizes are grouped by size.
        """
        frames = _as_frames(images)
        results: list[FaceDetections] = [FaceDetections.empty()] * len(frames)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            by_size.setdefault(f.shape[:2], []).append(i)
        for same_size in by_size.values():
            for start in range(0, len(same_size), self.batch_size):
                idx = same_size[start : start + self.batch_size]
                batch = np.stack([frames[i] for i in idx])
                # (B, 3, H, W) uint8 with channels-last strides: a free view of the (B, H, W, 3) frames.
                x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
                for i, det in zip(idx, self._detect_batch(x), strict=True):
                    results[i] = det
        return results

    # -- stages --

    def _pyramid(self, x: torch.Tensor) -> list[_Level]:
        """The frames at every pyramid scale: bilinear, on uint8 on CPU (its fast path).

        The reference resizes by area averaging; plain bilinear kept its detections on the test photos
        and on natural-background composites at a tenth of the cost, while an antialiased (blurrier)
        bilinear pyramid let a borderline false positive through on the astronaut photo.
        """
        _, _, height, width = x.shape
        src = x if x.device.type == "cpu" else x.float()
        levels = []
        for s in self.scales(height, width):
            hs, ws = math.ceil(height * s), math.ceil(width * s)
            img = F.interpolate(src, size=(hs, ws), mode="bilinear", align_corners=False)
            levels.append(_Level(img, ws / width, hs / height))
        return levels

    def _detect_batch(self, x: torch.Tensor) -> list[FaceDetections]:
        """x: (B, 3, H, W) uint8 RGB."""
        levels = self._pyramid(x)
        sources = [_Level(x, 1.0, 1.0)]  # crop sources for R-Net and O-Net; mips are added on demand
        frame, boxes, score, offsets = self._propose(levels)
        if len(frame):
            boxes = _square(_regress(boxes, offsets))
            frame, boxes, score, offsets = self._refine(sources, frame, boxes)
        if len(frame):
            boxes = _square(_regress(boxes, offsets))
            frame, boxes, score, marks = self._output(sources, frame, boxes)
        else:
            marks = boxes.new_zeros((0, 5, 2))
        out = [FaceDetections.empty() for _ in range(x.shape[0])]
        frame_np = frame.cpu().numpy()
        boxes_np = boxes.float().cpu().numpy()
        score_np = score.float().cpu().numpy()
        marks_np = marks.float().cpu().numpy()
        for b in np.unique(frame_np):
            sel = np.flatnonzero(frame_np == b)
            sel = sel[np.argsort(-score_np[sel], kind="stable")]
            out[int(b)] = FaceDetections(boxes_np[sel], score_np[sel], marks_np[sel])
        return out

    def _chunk(self, bytes_per_item: int) -> int:
        """Items per forward pass: on CPU, small enough that the first activation stays cache-sized.

        Large fresh activations cost page faults and cache misses; a few frames at a time ran P-Net
        about twice as fast as 16 at once. Accelerators take everything in one pass.
        """
        if self.device.type != "cpu":
            return 1 << 30
        return max(1, _CPU_CHUNK_BYTES // max(1, bytes_per_item))

    def _propose(self, levels: list[_Level]):
        """P-Net over the pyramid: candidates (frame, box, score, offsets), NMS within and across scales."""
        found = []
        for lv in levels:
            n, _, h, w = lv.image.shape
            step = self._chunk(4 * 10 * (h - 2) * (w - 2))  # conv1: 10 float channels
            b, yy, xx, sc, off = [], [], [], [], []
            for start in range(0, n, step):
                prob, reg = self.pnet((lv.image[start : start + step].float() - 127.5).mul_(1 / 128))
                bi, yi, xi = torch.nonzero(prob >= self.thresholds[0], as_tuple=True)
                if bi.numel():
                    b.append(bi + start)
                    yy.append(yi)
                    xx.append(xi)
                    sc.append(prob[bi, yi, xi])
                    off.append(reg.permute(0, 2, 3, 1)[bi, yi, xi])
            if not b:
                continue
            b, yy, xx, sc, off = (torch.cat(t) for t in (b, yy, xx, sc, off))
            boxes = _window_boxes(xx, yy, lv.sx, lv.sy)
            keep = nms(boxes, sc, 0.5, b)
            found.append((b[keep], boxes[keep], sc[keep], off[keep]))
        dev = levels[0].image.device if levels else torch.device("cpu")
        if not found:
            e = torch.zeros((0, 4), device=dev)
            return torch.zeros(0, dtype=torch.long, device=dev), e, torch.zeros(0, device=dev), e
        frame, boxes, score, offsets = (torch.cat(t) for t in zip(*found, strict=True))
        keep = nms(boxes, score, 0.7, frame)
        return frame[keep], boxes[keep], score[keep], offsets[keep]

    @staticmethod
    def _crops(sources: list[_Level], frame: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """Normalised size x size crops of boxes, black outside the image.

        Each box is read bilinearly from the mip level (2x2 box averages of the frames, made on demand)
        on which a crop pixel spans 1 to 2 source pixels, or from the frames for boxes smaller than
        ``size``: close to the area resampling of the reference implementation at the cost of plain
        bilinear sampling (no per-box resize, no supersampling).
        """
        side = (boxes[:, 2:] - boxes[:, :2]).amax(1).clamp(min=1e-3)
        level = torch.floor(torch.log2(side / size)).clamp(min=0).long()
        if len(level):
            _extend_mips(sources, int(level.max()))
        level = level.clamp(max=len(sources) - 1)
        out = torch.empty((len(boxes), 3, size, size), device=boxes.device, memory_format=torch.channels_last)
        grid = torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5
        for li in torch.unique(level).tolist():
            sel = torch.nonzero(level == li).squeeze(1)
            lv, b = sources[li], boxes[sel]
            step = (b[:, 2:] - b[:, :2]) * torch.tensor([lv.sx, lv.sy], device=b.device) / size
            # Crop pixel u covers source edge coordinates x1 + [u, u + 1) * step; sample at its centre.
            xs = b[:, 0:1] * lv.sx + grid * step[:, 0:1] - 0.5
            ys = b[:, 1:2] * lv.sy + grid * step[:, 1:2] - 0.5
            out[sel] = sample_grid(lv.image, frame[sel], xs, ys)
        return out.sub_(127.5).mul_(1 / 128)

    def _refine(self, sources: list[_Level], frame: torch.Tensor, boxes: torch.Tensor):
        crops = self._crops(sources, frame, boxes, 24)
        step = self._chunk(4 * 28 * 22 * 22)
        prob, reg = (torch.cat(t) for t in zip(*(self.rnet(c) for c in crops.split(step)), strict=True))
        ok = prob >= self.thresholds[1]
        frame, boxes, prob, reg = frame[ok], boxes[ok], prob[ok], reg[ok]
        keep = nms(boxes, prob, 0.7, frame)
        return frame[keep], boxes[keep], prob[keep], reg[keep]

    @torch.inference_mode()
    def refine(self, image: np.ndarray, boxes: np.ndarray) -> FaceDetections:
        """Re-locate faces near ``boxes`` (k, 4) in one image with the last stage (O-Net) only.

        The cheap step between full detections when tracking video: each previous box is squared
        (the shape O-Net was trained on) and re-scored; faces whose probability falls below the last
        threshold are dropped (the face left or turned away).
        """
        if len(boxes) == 0:
            return FaceDetections.empty()
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None]
        b = _square(torch.as_tensor(np.asarray(boxes, np.float32), device=self.device))
        frame = torch.zeros(len(b), dtype=torch.long, device=self.device)
        _, out_boxes, prob, marks = self._output([_Level(x, 1.0, 1.0)], frame, b)
        order = torch.argsort(prob, descending=True)
        return FaceDetections(
            out_boxes[order].float().cpu().numpy(),
            prob[order].float().cpu().numpy(),
            marks[order].float().cpu().numpy(),
        )

    def _output(self, sources: list[_Level], frame: torch.Tensor, boxes: torch.Tensor):
        crops = self._crops(sources, frame, boxes, 48)
        step = self._chunk(4 * 32 * 46 * 46)
        prob, reg, pts = (torch.cat(t) for t in zip(*(self.onet(c) for c in crops.split(step)), strict=True))
        ok = prob >= self.thresholds[2]
        frame, boxes, prob, reg, pts = frame[ok], boxes[ok], prob[ok], reg[ok], pts[ok]
        wh = boxes[:, 2:] - boxes[:, :2]
        marks = torch.stack([pts[:, :5], pts[:, 5:]], 2) * wh[:, None, :] + boxes[:, None, :2]
        boxes = _regress(boxes, reg)
        keep = nms(boxes, prob, 0.7, frame, mode="min")
        return frame[keep], boxes[keep], prob[keep], marks[keep]
