"""478 3D landmarks and 52 blendshapes of the faces we detected, with MediaPipe's Face Landmarker models.

Our detector (MTCNN) and tracker stay the authority on which faces there are: the landmark model runs
on each of *our* faces, on the crop MediaPipe's own graph would give it, and its points are mapped back
to the image. Per face:

1. **The region** is a square around the face, rotated so the eyes are level (the roll angle of the
   eye line), its side 1.5 times the face's size, as MediaPipe builds it (``DetectionsToRects`` with
   the eyes as rotation keypoints, then ``RectTransformation`` with scale 1.5 and ``square_long``).
   From a detection it is centred on the box, sized by the box's longer side and rolled by MTCNN's
   eyes (:func:`detection_regions`). With ``refine`` (stills) it is then refined once from the
   landmarks the first pass found (:func:`landmark_regions`: the points' bounding box and the roll of the
   eye corners 33 -> 263, what MediaPipe tracks a face with from frame to frame), which halves the
   distance to MediaPipe's converged tracking crop at twice the cost.
2. **The crop** is that region resampled to the model's 256x256 RGB input (bilinear, the region's
   corners on the crop's corners as MediaPipe's ``ImageToTensor`` maps them, black outside the image,
   values in [0, 1]).
3. **The landmark model** gives 478 points (x, y in crop pixels, z relative depth in the same units)
   and a face-presence logit; points are projected back through the region: image pixels for x and y,
   z scaled like x (times the region's side / 256). A face whose presence is below
   :data:`MIN_PRESENCE` (MediaPipe's default 0.5) is not measured: NaN, never a guess.
4. **The blendshape model** reads 146 of the points (x, y in image pixels) and gives 52 scores in
   [0, 1] (:data:`mtaffect.schema.BLENDSHAPE_NAMES`).

The models run with the LiteRT interpreter (``ai-edge-litert``): no torch, so the onnxruntime engine
keeps working without it. Parity with MediaPipe's own ``FaceLandmarker`` is tested on real photos
(tests/test_landmarker.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from mtaffect.faces.align import snap_landmarks
from mtaffect.geometry.bundle import BLENDSHAPES_MODEL, LANDMARKS_MODEL, BundleError, read_member
from mtaffect.schema import BLENDSHAPE_NAMES, NUM_DENSE_LANDMARKS

INPUT_SIZE: Final[int] = 256
#: Region side / face size, MediaPipe's ``RectTransformation`` for face landmarks.
REGION_SCALE: Final[float] = 1.5
#: A face whose presence score (sigmoid of the model's flag) is below this is not measured.
MIN_PRESENCE: Final[float] = 0.5
#: Faces smaller than this (region side, pixels) are not measured: the model sees mostly blur.
MIN_FACE_PIXELS: Final[float] = 16.0
#: The eye corners MediaPipe rolls the landmark-derived region by (left side of the left eye in the
#: image, right side of the right eye).
ROLL_FROM: Final[int] = 33
ROLL_TO: Final[int] = 263
#: The 146 landmarks the blendshape model reads (MediaPipe's face_blendshapes_graph), in its order.
BLENDSHAPE_POINTS: Final[tuple[int, ...]] = (
    0,
    1,
    4,
    5,
    6,
    7,
    8,
    10,
    13,
    14,
    17,
    21,
    33,
    37,
    39,
    40,
    46,
    52,
    53,
    54,
    55,
    58,
    61,
    63,
    65,
    66,
    67,
    70,
    78,
    80,
    81,
    82,
    84,
    87,
    88,
    91,
    93,
    95,
    103,
    105,
    107,
    109,
    127,
    132,
    133,
    136,
    144,
    145,
    146,
    148,
    149,
    150,
    152,
    153,
    154,
    155,
    157,
    158,
    159,
    160,
    161,
    162,
    163,
    168,
    172,
    173,
    176,
    178,
    181,
    185,
    191,
    195,
    197,
    234,
    246,
    249,
    251,
    263,
    267,
    269,
    270,
    276,
    282,
    283,
    284,
    285,
    288,
    291,
    293,
    295,
    296,
    297,
    300,
    308,
    310,
    311,
    312,
    314,
    317,
    318,
    321,
    323,
    324,
    332,
    334,
    336,
    338,
    356,
    361,
    362,
    365,
    373,
    374,
    375,
    377,
    378,
    379,
    380,
    381,
    382,
    384,
    385,
    386,
    387,
    388,
    389,
    390,
    397,
    398,
    400,
    402,
    405,
    409,
    415,
    454,
    466,
    468,
    469,
    470,
    471,
    472,
    473,
    474,
    475,
    476,
    477,
)


@dataclass(frozen=True)
class Regions:
    """Rotated square regions: centres (n, 2) and sides (n,) in pixels, roll (n,) radians (image y down)."""

    centre: np.ndarray
    side: np.ndarray
    angle: np.ndarray

    def crop_maps(self) -> np.ndarray:
        """(n, 2, 3) maps from crop pixels (pixel-index convention) to image pixels."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        k = self.side / INPUT_SIZE
        m = np.empty((len(self.side), 2, 3))
        m[:, 0, 0], m[:, 0, 1] = c * k, -s * k
        m[:, 1, 0], m[:, 1, 1] = s * k, c * k
        # crop pixel u -> (u - 256/2) * k from the centre: the corner-to-corner mapping MediaPipe's
        # ImageToTensor uses (checked against MediaPipe on real photos: 0.1% of the eye distance)
        off = -INPUT_SIZE / 2
        m[:, 0, 2] = self.centre[:, 0] + (c * off - s * off) * k
        m[:, 1, 2] = self.centre[:, 1] + (s * off + c * off) * k
        return m


def _square(centre: np.ndarray, width: np.ndarray, height: np.ndarray, angle: np.ndarray) -> Regions:
    return Regions(np.asarray(centre, np.float64), np.maximum(width, height) * REGION_SCALE, angle)


def detection_regions(boxes: np.ndarray, landmarks5: np.ndarray | None = None) -> Regions:
    """Regions from detections: box centre and longer side, roll of the eye line (MTCNN's eyes, image
    left then right; no landmarks: no roll)."""
    # on the grid alignment reads landmarks on: both engines' float rounding gives the same crop
    b = snap_landmarks(np.asarray(boxes, np.float64).reshape(-1, 4))
    if landmarks5 is None:
        angle = np.zeros(len(b))
    else:
        lm = snap_landmarks(np.asarray(landmarks5, np.float64).reshape(-1, 5, 2))
        d = lm[:, 1] - lm[:, 0]
        angle = np.arctan2(d[:, 1], d[:, 0])
    centre = (b[:, :2] + b[:, 2:]) / 2
    return _square(centre, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], angle)


def landmark_regions(points: np.ndarray) -> Regions:
    """Regions from landmarks (n, 478, 2+), MediaPipe's next-frame rule: the points' (axis-aligned)
    bounding box, rolled by the eye corners, scaled 1.5 and made square on its longer side."""
    p = np.asarray(points, np.float64)[..., :2]
    d = p[:, ROLL_TO] - p[:, ROLL_FROM]
    lo, hi = p.min(1), p.max(1)
    return _square((lo + hi) / 2, hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1], np.arctan2(d[:, 1], d[:, 0]))


def crop(pil: Image.Image, crop_map: np.ndarray) -> np.ndarray:
    """The model input (1, 256, 256, 3) float32 in [0, 1] through a (2, 3) crop -> image map (pixel-index
    convention). PIL's affine transform (C, about twice as fast as a numpy gather here) samples at
    pixel centres, so the map is shifted by half a pixel on both sides; bilinear, black outside."""
    a, b, c = crop_map[0]
    d, e, f = crop_map[1]
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    out = pil.transform((INPUT_SIZE, INPUT_SIZE), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return (np.asarray(out, np.float32) * np.float32(1 / 255))[None]


@dataclass(frozen=True)
class FaceGeometry:
    """What the landmarker measured per face; NaN rows where a face was not measured.

    ``points`` (n, 478, 3): x, y image pixels, z relative depth scaled like x (smaller is nearer);
    ``blendshapes`` (n, 52) in [0, 1], schema order; ``presence`` (n,): the model's face-presence score.
    """

    points: np.ndarray
    blendshapes: np.ndarray
    presence: np.ndarray

    @staticmethod
    def empty(n: int) -> FaceGeometry:
        return FaceGeometry(
            np.full((n, NUM_DENSE_LANDMARKS, 3), np.nan, np.float32),
            np.full((n, len(BLENDSHAPE_NAMES)), np.nan, np.float32),
            np.zeros(n, np.float32),
        )

    @property
    def measured(self) -> np.ndarray:
        return np.isfinite(self.blendshapes[:, 0])

    def __len__(self) -> int:
        return len(self.presence)

    def take(self, idx) -> FaceGeometry:
        return FaceGeometry(self.points[idx], self.blendshapes[idx], self.presence[idx])

    @staticmethod
    def concat(parts: list[FaceGeometry]) -> FaceGeometry:
        if not parts:
            return FaceGeometry.empty(0)
        return FaceGeometry(
            np.concatenate([p.points for p in parts]),
            np.concatenate([p.blendshapes for p in parts]),
            np.concatenate([p.presence for p in parts]),
        )


@contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null for the duration. LiteRT's C++ core prints "INFO: Created
    TensorFlow Lite XNNPACK delegate for CPU." for every interpreter it builds, straight to the process's
    stderr (no Python logging, and its log-level variable is not honoured once other libraries are
    loaded): noise in a CLI's output and in every worker's. Only the few milliseconds of building an
    interpreter are silenced."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no real stderr (captured, closed): nothing to hide
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


#: What to do without LiteRT (a dependency: only a broken install, or a platform without its wheels).
NO_LITERT = (
    "the face landmarker needs the LiteRT interpreter: pip install ai-edge-litert (or predict with "
    "--landmarks none)"
)


def check_runtime() -> None:
    """A ValueError saying what to do when LiteRT cannot be imported: checked before any work starts."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise ValueError(NO_LITERT)


def _interpreter(model: bytes, threads: int):
    with _quiet_stderr():
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:  # a user-fixable error, like every missing optional runtime
            raise ValueError(NO_LITERT) from e
        try:
            it = Interpreter(model_content=model, num_threads=max(1, int(threads)))
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BundleError(
                f"the face landmarker bundle's model cannot be loaded ({e}); reinstall mtaffect"
            ) from e
    return it


class FaceLandmarker:
    """Dense landmarks and blendshapes of given faces (see the module doc). Not thread-safe: one per
    thread or process, like the interpreters it holds."""

    def __init__(self, threads: int = 1, bundle: str | Path | None = None, refine: bool = True) -> None:
        self.refine = bool(refine)
        self._mesh = _interpreter(read_member(LANDMARKS_MODEL, bundle), threads)
        self._shapes = _interpreter(read_member(BLENDSHAPES_MODEL, bundle), threads)
        self._mesh_in = self._mesh.get_input_details()[0]["index"]
        outs = {tuple(d["shape"]): d["index"] for d in self._mesh.get_output_details()}
        self._points_out = outs[(1, 1, 1, NUM_DENSE_LANDMARKS * 3)]
        self._presence_out = outs[(1, 1, 1, 1)]
        self._shapes_in = self._shapes.get_input_details()[0]["index"]
        self._shapes_out = self._shapes.get_output_details()[0]["index"]

    def measure(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        landmarks5: np.ndarray | None = None,
        refine: bool | None = None,
    ) -> FaceGeometry:
        """Geometry of the faces in ``boxes`` (n, 4) of one RGB image (H, W, 3) uint8 (a greyscale
        (H, W) image is read as grey RGB); ``landmarks5`` (n, 5, 2): MTCNN's points, for the roll;
        ``refine``: a second pass from the first one's landmarks (None: this landmarker's setting)."""
        refine = self.refine if refine is None else bool(refine)
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {img.dtype} {img.shape}")
        regions = detection_regions(boxes, landmarks5)
        n = len(regions.side)
        out = FaceGeometry.empty(n)
        ok = np.isfinite(regions.centre).all(1) & np.isfinite(regions.side) & np.isfinite(regions.angle)
        ok &= np.nan_to_num(regions.side) >= MIN_FACE_PIXELS * REGION_SCALE
        if not ok.any():
            return out
        idx = np.flatnonzero(ok)
        sel = Regions(regions.centre[idx], regions.side[idx], regions.angle[idx])
        pil = Image.fromarray(img)
        points, presence = self._landmarks(pil, sel)
        if refine:
            good = presence >= MIN_PRESENCE
            if good.any():
                again = landmark_regions(points[good])
                p2, s2 = self._landmarks(pil, again)
                points[good], presence[good] = p2, s2
        out.presence[idx] = presence
        keep = presence >= MIN_PRESENCE
        for k, i in enumerate(idx):
            if keep[k]:
                out.points[i] = points[k]
                out.blendshapes[i] = self._blendshapes(points[k])
        return out

    def _landmarks(self, pil: Image.Image, regions: Regions) -> tuple[np.ndarray, np.ndarray]:
        maps = regions.crop_maps()
        n = len(maps)
        raw = np.empty((n, NUM_DENSE_LANDMARKS, 3), np.float64)
        logit = np.empty(n, np.float64)
        for k in range(n):
            self._mesh.set_tensor(self._mesh_in, crop(pil, maps[k]))
            self._mesh.invoke()
            raw[k] = self._mesh.get_tensor(self._points_out).reshape(NUM_DENSE_LANDMARKS, 3)
            logit[k] = float(self._mesh.get_tensor(self._presence_out).reshape(()))
        # crop pixels (edge convention) -> image pixels through the region; z scaled like x
        scale = (regions.side / INPUT_SIZE)[:, None]
        u = raw[..., 0] - INPUT_SIZE / 2
        v = raw[..., 1] - INPUT_SIZE / 2
        c, s = np.cos(regions.angle)[:, None], np.sin(regions.angle)[:, None]
        pts = np.empty_like(raw)
        pts[..., 0] = regions.centre[:, 0:1] + (c * u - s * v) * scale
        pts[..., 1] = regions.centre[:, 1:2] + (s * u + c * v) * scale
        pts[..., 2] = raw[..., 2] * scale
        return pts, 1.0 / (1.0 + np.exp(-logit))

    def _blendshapes(self, points: np.ndarray) -> np.ndarray:
        xy = np.ascontiguousarray(points[list(BLENDSHAPE_POINTS), :2], np.float32)[None]
        self._shapes.set_tensor(self._shapes_in, xy)
        self._shapes.invoke()
        return np.clip(self._shapes.get_tensor(self._shapes_out).reshape(-1), 0.0, 1.0)


__all__ = [
    "BLENDSHAPE_POINTS",
    "MIN_PRESENCE",
    "FaceGeometry",
    "FaceLandmarker",
    "Regions",
    "detection_regions",
    "landmark_regions",
]
