"""Procedural face renderer for the synthetic s-Aff-Wild2 set: AU intensities -> an aligned face crop.

Why procedural: the real frames are licensed, yet every later stage (a frozen FER CNN trained on real
faces, the MTL recipes, post-processing) must be testable on images whose appearance follows the
labels. Faces are drawn as anti-aliased vector shapes (PIL at ``SUPERSAMPLE`` x, then box-reduced),
placed like a 5-point-aligned crop (eyes near y=0.40, mouth near y=0.72), and every one of the 12 AUs
moves the geometry in the direction FACS describes, with an amplitude proportional to its intensity.

Speed: everything that does not depend on the AUs (background, hair, face skin with lighting, ears,
nose) is drawn once per identity into a static layer; a frame copies it and draws ~30 small shapes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mtaffect.schema import AU_NAMES, NUM_AUS

#: Drawing resolution multiplier (anti-aliasing by box reduction).
SUPERSAMPLE = 2
#: Extra border (fraction of the crop) drawn around the crop so per-frame shifts never expose an edge.
_MARGIN = 0.06
_DARK = (28.0, 18.0, 14.0)

# Real-world skin tones (light to dark), interpolated per identity.
_SKIN_TONES = np.array(
    [
        [255, 224, 196],
        [241, 194, 167],
        [224, 172, 138],
        [198, 134, 94],
        [161, 102, 70],
        [117, 74, 50],
        [84, 52, 36],
    ],
    dtype=float,
)
_HAIR_COLOURS = np.array(
    [
        [20, 16, 14],
        [45, 32, 24],
        [78, 52, 34],
        [120, 84, 52],
        [176, 140, 90],
        [150, 70, 38],
        [150, 150, 150],
        [215, 200, 165],
    ],
    dtype=float,
)
_HAIR_P = np.array([0.28, 0.24, 0.16, 0.1, 0.07, 0.05, 0.06, 0.04])
_IRIS_COLOURS = np.array(
    [[60, 38, 24], [92, 62, 38], [40, 28, 22], [70, 100, 130], [80, 110, 80]], dtype=float
)


@dataclass(frozen=True)
class FaceIdentity:
    """One person in one video: shape, colours, placement, camera. Fixed within a video.

    All geometry is in crop units (0..1 of the square crop, y downwards). Build with :meth:`sample`;
    vary one with ``dataclasses.replace`` (frozen, because derived layers are cached per instance).
    """

    size: int = 112
    # placement (similarity transform of the face inside the crop)
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    angle: float = 0.0  # degrees, positive = counter-clockwise on screen
    # face shape
    face_w: float = 0.40  # half-width at the cheekbones
    face_top: float = 0.55  # height of the upper ellipse above the centre line
    chin_y: float = 0.95
    jaw_n: float = 2.2  # superellipse exponent of the jaw: <2 pointed, >2 square
    centre_y: float = 0.47
    # features
    eye_dx: float = 0.165  # half inter-ocular distance
    eye_y: float = 0.40
    eye_w: float = 0.065  # half-width of an eye
    eye_h: float = 0.030  # upper-lid height when relaxed
    eye_tilt: float = 0.0
    brow_gap: float = 0.085  # brow height above the eye centre
    brow_thick: float = 0.022
    brow_arch: float = 0.018
    nose_y: float = 0.60
    nose_w: float = 0.045
    mouth_y: float = 0.72
    mouth_w: float = 0.115  # half-width
    lip_up: float = 0.024
    lip_lo: float = 0.030
    # appearance
    skin: tuple[float, float, float] = (224.0, 172.0, 138.0)
    hair: tuple[float, float, float] = (45.0, 32.0, 24.0)
    hair_style: int = 1  # 0 bald, 1 short, 2 long, 3 fringe
    hairline: float = 0.16
    hair_part: float = 0.0
    lip: tuple[float, float, float] = (180.0, 90.0, 90.0)
    iris: tuple[float, float, float] = (60.0, 38.0, 24.0)
    bg_top: tuple[float, float, float] = (90.0, 100.0, 120.0)
    bg_bottom: tuple[float, float, float] = (60.0, 60.0, 70.0)
    bg_seed: int = 0
    light_angle: float = 0.0  # radians, direction the light comes from (in the image plane)
    light_strength: float = 0.25
    brightness: float = 1.0
    noise: float = 3.0  # per-frame pixel noise std (grey levels)
    jpeg_quality: int = 90
    jitter_px: float = 0.6  # per-frame placement jitter std (output pixels)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def sample(cls, rng: np.random.Generator, size: int = 112, scene: dict | None = None) -> FaceIdentity:
        """Draw a random identity. ``scene`` (from :func:`sample_scene`) shares background and light
        between the two faces of one source video (``_left``/``_right``)."""
        scene = scene if scene is not None else sample_scene(rng)
        u = rng.uniform
        tone = (len(_SKIN_TONES) - 1) * rng.beta(1.4, 2.2)  # more light/medium tones, as in Aff-Wild2
        lo = int(tone)
        skin = _SKIN_TONES[lo] + (tone - lo) * (
            _SKIN_TONES[min(lo + 1, len(_SKIN_TONES) - 1)] - _SKIN_TONES[lo]
        )
        skin = np.clip(skin * u(0.95, 1.05, 3), 0, 255)
        hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_P)] * u(0.85, 1.15)
        lip = np.clip(skin * np.array([0.8, 0.5, 0.52]) + np.array([22.0, 0.0, 4.0]), 0, 255)
        return cls(
            size=size,
            shift=(float(rng.normal(0, 0.015)), float(rng.normal(0, 0.015))),
            scale=float(u(0.94, 1.06)),
            angle=float(np.clip(rng.normal(0, 4.5), -10, 10)),
            face_w=float(u(0.36, 0.43)),
            face_top=float(u(0.5, 0.6)),
            chin_y=float(u(0.92, 0.97)),
            jaw_n=float(u(1.7, 2.7)),
            centre_y=float(u(0.45, 0.49)),
            eye_dx=float(u(0.15, 0.18)),
            eye_y=float(u(0.385, 0.415)),
            eye_w=float(u(0.058, 0.072)),
            eye_h=float(u(0.026, 0.036)),
            eye_tilt=float(u(-0.008, 0.012)),
            brow_gap=float(u(0.075, 0.095)),
            brow_thick=float(u(0.02, 0.032)),
            brow_arch=float(u(0.008, 0.026)),
            nose_y=float(u(0.59, 0.625)),
            nose_w=float(u(0.038, 0.054)),
            mouth_y=float(u(0.705, 0.735)),
            mouth_w=float(u(0.1, 0.13)),
            lip_up=float(u(0.017, 0.03)),
            lip_lo=float(u(0.022, 0.037)),
            skin=tuple(skin.tolist()),
            hair=tuple(np.clip(hair, 0, 255).tolist()),
            hair_style=int(rng.choice(4, p=[0.1, 0.4, 0.3, 0.2])),
            hairline=float(u(0.1, 0.19)),
            hair_part=float(u(-0.06, 0.06)),
            lip=tuple(lip.tolist()),
            iris=tuple(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))].tolist()),
            bg_top=scene["bg_top"],
            bg_bottom=scene["bg_bottom"],
            bg_seed=scene["bg_seed"],
            light_angle=scene["light_angle"],
            light_strength=scene["light_strength"],
            brightness=scene["brightness"],
            noise=float(u(1.0, 5.0)),
            jpeg_quality=int(rng.integers(70, 96)),
            jitter_px=float(u(0.3, 0.9)),
        )

    # ---- derived, cached -------------------------------------------------------------------------------
    def _matrix(self) -> np.ndarray:
        """2x3 affine map from face (crop) units to static-canvas pixels."""
        m = self._cache.get("matrix")
        if m is None:
            k, s = SUPERSAMPLE, self.size
            margin = round(_MARGIN * s)
            a = math.radians(self.angle)
            rot = self.scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
            c = np.array([0.5, 0.5])
            lin = k * s * rot
            off = k * (margin + s * (c + np.asarray(self.shift) - rot @ c))
            m = np.hstack([lin, off[:, None]])
            self._cache["matrix"] = m
        return m

    def light(self, u: float, v: float) -> float:
        """Lighting factor at a face point: directional gradient times edge falloff of the face."""
        du, dv = u - 0.5, v - self.centre_y
        grad = (
            1.0
            + self.light_strength * (du * math.cos(self.light_angle) + dv * math.sin(self.light_angle)) * 2
        )
        r2 = (du / self.face_w) ** 2 + (dv / (self.chin_y - self.centre_y)) ** 2
        return self.brightness * grad * (1.0 - 0.28 * min(max(r2 - 0.45, 0.0), 1.0))


def sample_scene(rng: np.random.Generator) -> dict:
    """Background and light shared by the faces filmed in one source video."""
    base = rng.uniform(20, 230, 3)
    return {
        "bg_top": tuple(base.tolist()),
        "bg_bottom": tuple(np.clip(base * rng.uniform(0.5, 1.1, 3), 0, 255).tolist()),
        "bg_seed": int(rng.integers(2**31)),
        "light_angle": float(rng.uniform(0, 2 * math.pi)),
        "light_strength": float(rng.uniform(0.0, 0.35)),
        "brightness": float(rng.uniform(0.72, 1.12)),
    }


# ---- geometry helpers ------------------------------------------------------------------------------------
def _ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cu + ru * np.cos(t), cv + rv * np.sin(t)], 1)


def _face_contour(ident: FaceIdentity, n: int = 72) -> np.ndarray:
    """Closed face outline: ellipse above the centre line, superellipse jaw below it."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    upper = s >= 0
    e = 2.0 / ident.jaw_n
    u = np.where(upper, c, np.sign(c) * np.abs(c) ** e)
    hb = ident.chin_y - ident.centre_y
    v = np.where(upper, -ident.face_top * s, hb * np.abs(s) ** e)
    return np.stack([0.5 + ident.face_w * u, ident.centre_y + v], 1)


def _jaw_band(ident: FaceIdentity, drop: float, n: int = 25) -> np.ndarray:
    """Polygon (complex points) between the relaxed and the dropped chin: what AU26 adds below the face."""
    base = ident._cache.get("jaw")
    if base is None:
        t = np.linspace(np.pi * 1.15, np.pi * 1.85, n)
        e = 2.0 / ident.jaw_n
        c, s = np.cos(t), np.abs(np.sin(t))
        u = 0.5 + ident.face_w * np.sign(c) * np.abs(c) ** e
        v0 = ident.centre_y + (ident.chin_y - ident.centre_y) * s**e
        base = (u + 1j * v0, s**4, (u + 1j * (v0 - 0.003))[::-1])
        ident._cache["jaw"] = base
    relaxed, weight, back = base
    return np.concatenate([relaxed + 1j * drop * weight, back])


def _to_px(ident: FaceIdentity, pts: np.ndarray) -> list[float]:
    m = ident._matrix()
    return (pts @ m[:, :2].T + m[:, 2]).ravel().tolist()


def _col(c) -> tuple[int, int, int]:
    """Clip an RGB triple (any sequence of floats) to a PIL fill colour."""
    r, g, b = (int(min(max(float(x), 0.0), 255.0)) for x in c)
    return (r, g, b)


def _scaled(c, f: float) -> tuple[int, int, int]:
    return _col([x * f for x in c])


# ---- static layer (once per identity) --------------------------------------------------------------------
def _static_layer(ident: FaceIdentity) -> Image.Image:
    cached = ident._cache.get("static")
    if cached is not None:
        return cached
    k, s = SUPERSAMPLE, ident.size
    margin = round(_MARGIN * s)
    side = k * (s + 2 * margin)
    rng = np.random.default_rng(ident.bg_seed)

    # background: vertical gradient + a few blurred blobs (a room, a window, a studio wall)
    yy = np.linspace(0, 1, side)[:, None, None]
    bg = np.asarray(ident.bg_top) * (1 - yy) + np.asarray(ident.bg_bottom) * yy
    bg = np.broadcast_to(bg, (side, side, 3)).copy()
    bg_img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(bg_img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
        w, h = rng.uniform(0.1, 0.6, 2) * side
        col = np.clip(np.asarray(ident.bg_top) * rng.uniform(0.6, 1.4, 3), 0, 255)
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=_col(col))
    bg_img = bg_img.filter(ImageFilter.GaussianBlur(radius=side * 0.02))

    fg = Image.new("RGB", (side, side))
    mask = Image.new("L", (side, side), 0)
    dfg, dm = ImageDraw.Draw(fg), ImageDraw.Draw(mask)

    def shape(pts: np.ndarray, colour) -> None:
        xy = _to_px(ident, pts)
        dfg.polygon(xy, fill=_col(colour))
        dm.polygon(xy, fill=255)

    skin = np.asarray(ident.skin)
    hair = np.asarray(ident.hair)
    cu, fw = 0.5, ident.face_w
    if ident.hair_style == 2:  # long hair behind the head and shoulders
        back = np.array(
            [
                [cu - fw - 0.07, 1.3],
                [cu - fw - 0.09, 0.5],
                [cu - fw - 0.04, 0.05],
                [cu, -0.12],
                [cu + fw + 0.04, 0.05],
                [cu + fw + 0.09, 0.5],
                [cu + fw + 0.07, 1.3],
            ],
        )
        shape(back, hair * 0.85)
    # neck (in the shadow of the chin) and clothes
    shape(np.array([[cu - 0.16, 0.7], [cu + 0.16, 0.7], [cu + 0.18, 1.3], [cu - 0.18, 1.3]]), skin * 0.72)
    cloth = np.clip(rng.uniform(20, 220, 3), 0, 255)
    shape(
        np.array(
            [
                [cu - 0.7, 1.3],
                [cu - 0.6, 1.02],
                [cu - 0.17, 0.99],
                [cu, 1.06],
                [cu + 0.17, 0.99],
                [cu + 0.6, 1.02],
                [cu + 0.7, 1.3],
            ]
        ),
        cloth,
    )
    # ears
    for side_sign in (-1, 1):
        shape(_ellipse(cu + side_sign * (fw + 0.005), 0.47, 0.04, 0.085), skin * 0.9)
        shape(_ellipse(cu + side_sign * (fw + 0.012), 0.47, 0.018, 0.05), skin * 0.72)
    shape(_face_contour(ident), skin)
    # eye sockets: slightly darker, gives the face depth
    for sg in (-1, 1):
        ex = cu + sg * ident.eye_dx
        shape(_ellipse(ex, ident.eye_y - 0.006, ident.eye_w * 1.5, ident.eye_h * 2.2), skin * 0.93)
    # nose: bridge shadow on the side away from the light, tip, wings, nostrils
    ny, nw = ident.nose_y, ident.nose_w
    away = -1.0 if math.cos(ident.light_angle) > 0 else 1.0
    bridge = np.array(
        [
            [cu + away * 0.03, ident.eye_y + 0.03],
            [cu + away * 0.036, ny - 0.03],
            [cu + away * (nw + 0.004), ny + 0.005],
            [cu + away * nw * 0.6, ny + 0.014],
            [cu + away * 0.008, ny - 0.03],
            [cu + away * 0.006, ident.eye_y + 0.03],
        ]
    )
    shape(bridge, skin * 0.88)
    shape(_ellipse(cu, ny + 0.004, nw * 0.75, 0.026), skin * 1.04)
    for sg in (-1, 1):
        shape(_ellipse(cu + sg * nw * 0.9, ny + 0.012, nw * 0.42, 0.02), skin * 0.86)
        shape(_ellipse(cu + sg * nw * 0.42, ny + 0.026, nw * 0.3, 0.0085), skin * 0.35)
    # philtrum shadow
    shape(
        np.array(
            [
                [cu - 0.012, ny + 0.04],
                [cu + 0.012, ny + 0.04],
                [cu + 0.016, ident.mouth_y - 0.03],
                [cu - 0.016, ident.mouth_y - 0.03],
            ]
        ),
        skin * 0.93,
    )
    # hair in front (cap above the hairline)
    if ident.hair_style != 0:
        hl = ident.hairline + (0.07 if ident.hair_style == 3 else 0.0)
        sides = ident.eye_y - (0.03 if ident.hair_style == 2 else 0.09)
        ru, rv = fw + 0.035, ident.face_top + 0.06
        ws = ru * math.sqrt(max(1 - ((ident.centre_y - sides) / rv) ** 2, 0.05))
        a0 = math.asin(min((ident.centre_y - sides) / rv, 1.0))
        ang = np.linspace(a0, math.pi - a0, 25)  # right -> over the top -> left
        top = np.stack([cu + ru * np.cos(ang), ident.centre_y - rv * np.sin(ang)], 1)
        xs = np.linspace(cu - ws, cu + ws, 21)
        rel = (xs - cu - ident.hair_part) / fw
        edge = np.clip((np.abs(xs - cu) / ws - 0.78) / 0.22, 0, 1)
        line_v = hl + 0.045 * rel**2
        if ident.hair_style == 3:
            line_v = line_v + 0.01 * np.cos(np.arange(xs.size) * 2.1)  # uneven fringe
        line_v = line_v + (sides - line_v) * edge**1.5
        cap = np.concatenate([top, np.stack([xs, line_v], 1)])
        shape(cap, hair)
    elif rng.random() < 0.5:  # bald/shaved: a faint shadow of short hair at the very top
        top = _ellipse(cu, ident.centre_y, fw + 0.01, ident.face_top + 0.01, 40)
        shape(top[top[:, 1] < 0.05], skin * 0.8 + hair * 0.2)

    # lighting over the whole foreground (computed in face units per canvas pixel)
    m = ident._matrix()
    inv = np.linalg.inv(m[:, :2])
    px = np.arange(side, dtype=float) + 0.5
    gx, gy = np.meshgrid(px, px)
    fu = inv[0, 0] * (gx - m[0, 2]) + inv[0, 1] * (gy - m[1, 2])
    fv = inv[1, 0] * (gx - m[0, 2]) + inv[1, 1] * (gy - m[1, 2])
    du, dv = fu - 0.5, fv - ident.centre_y
    grad = 1.0 + ident.light_strength * 2 * (
        du * math.cos(ident.light_angle) + dv * math.sin(ident.light_angle)
    )
    r2 = (du / ident.face_w) ** 2 + (dv / (ident.chin_y - ident.centre_y)) ** 2
    lit = ident.brightness * grad * (1.0 - 0.28 * np.clip(r2 - 0.45, 0.0, 1.0))
    fga = np.asarray(fg, dtype=float) * lit[..., None]
    # fine skin/film texture, fixed per identity
    fga += rng.normal(0, 2.0, fga.shape)
    alpha = np.asarray(mask, dtype=float)[..., None] / 255.0
    out = np.asarray(bg_img, dtype=float) * (1 - alpha) + fga * alpha
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    ident._cache["static"] = img
    # per-frame noise bank (grey-level offsets around 128), shared by all frames of the identity
    pad = 16
    noise = rng.normal(128.0, ident.noise, (s + pad, s + pad, 1)) + rng.normal(
        0, ident.noise * 0.4, (s + pad, s + pad, 3)
    )
    ident._cache["noise"] = np.clip(noise, 0, 255).astype(np.uint8)
    return img


# ---- dynamic parts (per frame) ---------------------------------------------------------------------------
# Per-frame geometry uses complex numbers (u + iv): building, concatenating and transforming points is
# then a handful of numpy calls per frame, and the whole frame is transformed in one multiply-add.
_T = {n: np.linspace(-1.0, 1.0, n) for n in (7, 9, 11, 15)}
_U = {n: np.linspace(0.0, 1.0, n) for n in (7, 9)}
_RING = {n: np.exp(1j * np.linspace(0, 2 * np.pi, n, endpoint=False)) for n in (8, 16, 18)}
_BOW = 1 - 0.35 * np.exp(-((_T[15] / 0.12) ** 2))  # cupid's bow dip of the upper lip
_BELL = {n: 1 - t**2 for n, t in _T.items()}
_TEETH = (236.0, 232.0, 218.0)
_SCLERA = (232.0, 226.0, 220.0)
_CAVITY = (48.0, 18.0, 20.0)
_LASH = (20, 14, 12)
_PUPIL = (12, 10, 10)
_DIMPLE = 0.006 * _RING[8].real + 0.005j * _RING[8].imag
_SIN7 = np.sin(np.pi * np.linspace(0.0, 1.0, 7))
_WRINKLE_C = np.linspace(-0.08, 0.08, 6)
_WRINKLE_L = np.linspace(0.09, 0.2, 6)
_UP_SHAPE = (1 - np.linspace(-1.0, 1.0, 11) ** 2) ** 0.75 * (1 - 0.15 * np.linspace(-1.0, 1.0, 11))
_LO_SHAPE = (1 - np.linspace(-1.0, 1.0, 11) ** 2) ** 0.9
_CREASE_SHAPE = ((1 - np.linspace(-1.0, 1.0, 11) ** 2) ** 0.6)[1:-1]
_IRIS_RADII = np.array([[0.95], [0.43], [0.95], [0.43]])
_IRIS_SIDE = np.array([[1.0], [1.0], [-1.0], [-1.0]])
_ARCH9 = 4 * np.linspace(0.0, 1.0, 9) * (1 - np.linspace(0.0, 1.0, 9))
_INNER9 = (1 - np.linspace(0.0, 1.0, 9)) ** 1.3
_OUTER9 = np.linspace(0.0, 1.0, 9) ** 0.7
_OUTER9_8 = np.linspace(0.0, 1.0, 9) ** 0.8


class _Batch:
    """Collects polygons and polylines in face units; draws them all after one transform."""

    __slots__ = ("cmds", "n", "pts")

    def __init__(self) -> None:
        self.pts: list[np.ndarray] = []
        self.cmds: list[tuple[int, int, tuple, int]] = []
        self.n = 0

    def add(self, z: np.ndarray, colour: tuple, width: int = 0) -> None:
        """``width`` 0 fills a polygon, otherwise draws a polyline that many canvas pixels wide."""
        self.pts.append(z)
        self.cmds.append((self.n, self.n + len(z), colour, width))
        self.n += len(z)

    def draw(self, draw: ImageDraw.ImageDraw, mul: complex, add: complex) -> None:
        flat = (mul * np.concatenate(self.pts) + add).view(np.float64).tolist()
        for a, b, colour, width in self.cmds:
            if width:  # round joints only where they show (they cost a pie slice per vertex)
                joint = "curve" if width >= 4 else None
                draw.line(flat[2 * a : 2 * b], fill=colour, width=width, joint=joint)
            else:
                draw.polygon(flat[2 * a : 2 * b], fill=colour)


def _complex_transform(ident: FaceIdentity) -> tuple[complex, complex, float]:
    """The identity's similarity transform as ``z -> mul * z + add`` and canvas pixels per face unit."""
    got = ident._cache.get("ctrans")
    if got is None:
        m = ident._matrix()
        got = (complex(m[0, 0], m[1, 0]), complex(m[0, 2], m[1, 2]), float(abs(complex(m[0, 0], m[1, 0]))))
        ident._cache["ctrans"] = got
    return got


def _mirror(z: np.ndarray) -> np.ndarray:
    """Mirror face points about the vertical midline (u = 0.5): the other side of a symmetric feature."""
    return 1.0 - z.conjugate()


def _mix(c: tuple, toward: tuple, amount: float) -> tuple[int, int, int]:
    """Blend two in-range colours (a convex combination stays in range: no clipping needed)."""
    return (
        int(c[0] + amount * (toward[0] - c[0])),
        int(c[1] + amount * (toward[1] - c[1])),
        int(c[2] + amount * (toward[2] - c[2])),
    )


def _palette(ident: FaceIdentity) -> dict[str, tuple]:
    """Per-identity colours of the dynamic layer: lit skin at fixed anchor points, and constants."""
    pal = ident._cache.get("palette")
    if pal is None:
        cu, ey, edx = 0.5, ident.eye_y, ident.eye_dx
        by = ey - ident.brow_gap
        anchors = {
            "chin": (cu, ident.chin_y - 0.03),
            "cheek": (cu + edx, ey + 0.09),
            "under_eye": (cu + edx, ey + 0.05),
            "crow": (cu + edx + ident.eye_w, ey),
            "fold": (cu + ident.nose_w * 1.5, ident.nose_y + 0.05),
            "forehead": (cu, by - 0.08),
            "glabella": (cu, by),
            "lid": (cu + edx, ey - 0.04),
            "lower_lid": (cu + edx, ey + 0.02),
            "below_mouth": (cu, ident.mouth_y + 0.06),
        }
        pal = {}
        for name, (u, v) in anchors.items():
            li = ident.light(u, v)
            pal[name] = _scaled(ident.skin, li)
            pal[name + "_dark"] = _scaled(_DARK, min(li, 1.0))
        pal["highlight"] = _scaled((255.0, 240.0, 230.0), min(ident.light(cu + edx, ey + 0.09), 1.0))
        b = ident.brightness
        pal["sclera"] = _scaled(_SCLERA, b)
        pal["iris"] = _scaled(ident.iris, b)
        pal["brow"] = _col(
            [(h * 0.45 + d * 0.55) * min(b, 1.0) + 6 for h, d in zip(ident.hair, _DARK, strict=True)]
        )
        lip = [c * ident.light(cu, ident.mouth_y) for c in ident.lip]
        pal["lip"] = _col(lip)
        pal["upper_lip"] = _scaled(lip, 0.85)
        pal["lip_line"] = _scaled(lip, 0.45)
        pal["lip_corner"] = _scaled(lip, 0.5)
        pal["cavity"] = _scaled(_CAVITY, b)
        pal["teeth"] = _scaled(_TEETH, min(b, 1.05))
        pal["lower_teeth"] = _scaled((200.0, 195.0, 185.0), b)
        ident._cache["palette"] = pal
    return pal


_SIDES = np.array([[1.0], [-1.0]])  # right eye first, then the left (rows of (2, n) arrays)
_CROW = np.array([[0.0, 0.03 - 0.014j, 0.0, 0.03 - 0.002j, 0.0, 0.03 + 0.01j]])  # fan of 3 lines


def _draw_dynamic(
    draw: ImageDraw.ImageDraw, ident: FaceIdentity, au: np.ndarray, rng: np.random.Generator
) -> None:
    """Draw the AU-dependent features onto a copy of the static layer.

    Symmetric features are computed for the right side and mirrored; both eyes share one (2, n) array.
    """
    a = dict(zip(AU_NAMES, au.tolist(), strict=True))
    a1, a2, a4, a6, a7, a10, a12 = a["AU1"], a["AU2"], a["AU4"], a["AU6"], a["AU7"], a["AU10"], a["AU12"]
    a15, a23, a24, a26 = a["AU15"], a["AU23"], a["AU24"], a["AU26"]
    mul, add, ppu = _complex_transform(ident)
    pal = _palette(ident)
    batch = _Batch()

    def width(w: float) -> int:
        return max(1, round(w * ppu))

    def pair(z: np.ndarray, colour: tuple, w: int = 0) -> None:
        batch.add(z, colour, w)
        batch.add(_mirror(z), colour, w)

    cu = 0.5
    ey, edx, ew = ident.eye_y, ident.eye_dx, ident.eye_w
    ex = cu + edx  # right eye centre (u)

    # AU26: jaw drop lowers the chin (AU25 alone drops it a little)
    drop = 0.075 * a26 + 0.012 * a["AU25"]
    if drop > 0.004:
        batch.add(_jaw_band(ident, drop), pal["chin"])

    # AU6: cheek raiser - brighter raised cheek apples, infra-orbital furrow, crow's feet
    if a6 > 0.05:
        t7, t9 = _T[7], _T[9]
        cheek_v = ey + 0.1 - 0.025 * a6
        apple = (ex + 0.012 + t9 * 0.045) + 1j * (cheek_v + 0.012 * t9**2)
        pair(apple, _mix(pal["cheek"], pal["highlight"], 0.12 * a6), width(0.03))
        pair(apple + 0.03j, _mix(pal["cheek"], pal["cheek_dark"], 0.12 * a6), width(0.012))
        furrow = (ex + 0.01 + t7 * ew * 1.1) + 1j * (ey + 0.052 - 0.02 * a6 + 0.012 * t7**2)
        pair(furrow, _mix(pal["under_eye"], pal["under_eye_dark"], 0.45 * a6), width(0.007))
        pair(
            complex(ex + ew + 0.012, ey) + _CROW[0],
            _mix(pal["crow"], pal["crow_dark"], 0.5 * a6),
            width(0.005),
        )

    # mouth parameters shared with the nasolabial folds
    corner_lift = 0.05 * a12 - 0.04 * a15
    mw = ident.mouth_w * (1 + 0.24 * a12 + 0.04 * a10 - 0.14 * a23 - 0.1 * a24 - 0.1 * a26 + 0.06 * a15)
    my = ident.mouth_y

    # nasolabial folds deepen with AU12, AU10 and AU6
    fold = min(1.0, 0.2 + 0.55 * a12 + 0.45 * a10 + 0.2 * a6)
    u7 = _U[7]
    start = complex(cu + ident.nose_w * 1.5, ident.nose_y + 0.005 - 0.01 * a10)
    end = complex(cu + mw + 0.03, my - corner_lift + 0.02)
    fold_line = start + u7 * (end - start) + 0.025 * (1 + 0.5 * a12) * _SIN7
    pair(fold_line, _mix(pal["fold"], pal["fold_dark"], 0.32 * fold), width(0.004 + 0.006 * fold))

    # AU1/AU2: forehead wrinkles (AU1 central, AU2 lateral)
    by = ey - ident.brow_gap
    if max(a1, a2) >= 0.2:
        x_c, x_l = _WRINKLE_C, _WRINKLE_L
        for j in range(3):
            v = by - 0.05 - 0.028 * j
            if v < ident.hairline + 0.02:
                break
            if a1 >= 0.2:
                batch.add(
                    (cu + x_c) + 1j * (v + 0.015 * (x_c / 0.2) ** 2),
                    _mix(pal["forehead"], pal["forehead_dark"], 0.3 * a1),
                    width(0.004),
                )
            if a2 >= 0.2:
                pair(
                    (cu + x_l) + 1j * (v + 0.015 * (x_l / 0.2) ** 2),
                    _mix(pal["forehead"], pal["forehead_dark"], 0.3 * a2),
                    width(0.004),
                )

    # AU4: vertical glabella furrows between the brows
    if a4 > 0.15:
        x = cu + 0.022
        pair(
            np.array([complex(x, by - 0.01), complex(x + 0.004, by + 0.035)]),
            _mix(pal["glabella"], pal["glabella_dark"], 0.5 * a4),
            width(0.006),
        )

    # eyes: AU7 tightens the lids (mostly the lower one: a glare, not a sleepy look), AU6 pushes the
    # lower lid up, AU4's brows press the upper lid down; AU1/AU2 open the eyes wider
    open_up = 1.0 + 0.3 * a2 + 0.15 * a1 - 0.28 * a7 - 0.3 * a6 - 0.22 * a4
    open_lo = 1.0 - 0.6 * a6 - 0.75 * a7
    h_up = ident.eye_h * max(open_up, 0.12)
    h_lo = ident.eye_h * 0.6 * max(open_lo, 0.15)
    crease_h = ident.eye_h * (1.6 + 0.6 * a2 + 0.3 * a1 - 0.4 * a4 - 0.2 * a7)
    t11 = _T[11]
    xs = ex + t11 * ew
    tilt = -ident.eye_tilt * t11  # outer corner higher when tilt > 0
    upper = xs + 1j * (ey + tilt - h_up * _UP_SHAPE)
    lower = xs + 1j * (ey + tilt + h_lo * _LO_SHAPE)
    crease = xs[1:-1] + 1j * (ey + tilt[1:-1] - crease_h * _CREASE_SHAPE)
    pair(crease, _mix(pal["lid"], pal["lid_dark"], 0.28), width(0.004))
    pair(np.concatenate([upper, lower[::-1]]), pal["sclera"])
    # iris and pupil of both eyes, clipped to the lids: rows are (right iris, right pupil, left ..)
    gaze = rng.normal(0, 0.006, 2)
    centre_u = np.array(
        [
            [ex + gaze[0] - 0.004],
            [ex + gaze[0] - 0.004],
            [1 - ex + gaze[0] + 0.004],
            [1 - ex + gaze[0] + 0.004],
        ]
    )
    z = (centre_u + 1j * (ey + gaze[1] * 0.5)) + ident.eye_h * _IRIS_RADII * _RING[18]
    eye_u = np.where(_IRIS_SIDE > 0, ex, 1 - ex)
    tt = np.minimum(np.maximum(_IRIS_SIDE * (z.real - eye_u) / ew, -1.0), 1.0)  # in the right eye's frame
    bell = 1 - tt**2
    til = ey - ident.eye_tilt * tt
    lo_v = til - h_up * bell**0.75 * (1 - 0.15 * tt)
    hi_v = til + h_lo * bell**0.9
    z = z.real + 1j * np.minimum(np.maximum(z.imag, lo_v), hi_v)
    for row, colour in zip(z, (pal["iris"], _PUPIL, pal["iris"], _PUPIL), strict=True):
        batch.add(row, colour)
    pair(upper, _LASH, width(0.0075))
    pair(lower[2:-1], _mix(pal["lower_lid"], pal["lower_lid_dark"], 0.35 + 0.2 * a6), width(0.0045))

    # brows: AU1 raises the inner end, AU2 the outer end, AU4 lowers them and draws them together
    tb = _U[9]  # 0 inner .. 1 outer
    arch = ident.brow_arch * _ARCH9 * (1 + 0.8 * a2)
    dv = -0.055 * a1 * _INNER9 - 0.05 * a2 * _OUTER9 + a4 * (0.052 - 0.042 * _OUTER9_8) - 0.01 * a4 * a1
    centre_v = ey - ident.brow_gap - arch + 0.01 * tb + dv
    half = 0.5 * ident.brow_thick * (1.15 - 0.6 * tb) * (1 + 0.15 * a4)
    inner_x = cu + edx - ew * 1.05 - 0.024 * a4 + 0.004 * a1
    bx = inner_x + tb * (cu + edx + ew * 1.2 - inner_x)
    pair(np.concatenate([bx + 1j * (centre_v - half), (bx + 1j * (centre_v + half))[::-1]]), pal["brow"])

    _draw_mouth(batch, ident, a, mw, corner_lift, width, pal)
    batch.draw(draw, mul, add)


def _draw_mouth(
    batch: _Batch,
    ident: FaceIdentity,
    a: dict[str, float],
    mw: float,
    corner_lift: float,
    width: Callable[[float], int],
    pal: dict[str, tuple],
) -> None:
    """Lips, opening, teeth. AU12/15 curve the mouth up/down; 23/24 thin and press the lips; 10 raises
    the upper lip; 25 parts the lips; 26 opens the jaw."""
    a10, a15, a23, a24, a25, a26 = a["AU10"], a["AU15"], a["AU23"], a["AU24"], a["AU25"], a["AU26"]
    cu, my = 0.5, ident.mouth_y
    press = min(1.0, 0.6 * a23 + 0.8 * a24)
    gap = (0.022 * a25 + 0.085 * a26 * (0.35 + 0.65 * a25)) * (1 - 0.9 * a24)
    gap = max(gap - 0.004, 0.0)
    raise_up = 0.016 * a10
    t = _T[15]
    bell = _BELL[15]
    xs = cu + t * mw
    bend = corner_lift * t**2
    b07 = bell**0.7
    inner_up = my - bend - (0.3 * gap + raise_up) * b07
    inner_lo = my - bend + 0.7 * gap * b07
    t_up = ident.lip_up * (1 - 0.75 * press) * (1 + 0.2 * a10)
    t_lo = ident.lip_lo * (1 - 0.75 * press)
    outer_up = inner_up - t_up * bell**0.45 * _BOW - 0.004
    outer_lo = inner_lo + t_lo * bell**0.55 + 0.003
    z_ou, z_iu, z_il, z_ol = xs + 1j * outer_up, xs + 1j * inner_up, xs + 1j * inner_lo, xs + 1j * outer_lo
    batch.add(np.concatenate([z_ou, z_ol[::-1]]), _mix(pal["lip"], pal["upper_lip"], 0.5 * press))
    batch.add(np.concatenate([z_ou, z_iu[::-1]]), pal["upper_lip"])  # the upper lip is in shadow
    # shadow under the lower lip (deeper when the lips are pressed: chin boss pushed up)
    sub = z_ol[3:-3] + 1j * (0.014 + 0.004 * a24)
    shade = min(0.18 + 0.3 * a24 + 0.15 * a15, 1.0)
    batch.add(sub, _mix(pal["below_mouth"], pal["below_mouth_dark"], shade), width(0.006))
    if gap + 0.6 * raise_up > 0.004:
        batch.add(np.concatenate([z_iu, z_il[::-1]]), pal["cavity"])
        # upper teeth: a band below the upper inner lip, more visible when AU10 lifts the lip
        teeth_h = min(0.7 * gap + 0.6 * raise_up, 0.024)
        sel = slice(2, -2)
        tu = inner_up[sel]
        tl = np.minimum(tu + teeth_h * bell[sel] ** 0.3, inner_lo[sel])
        xt = xs[sel]
        batch.add(np.concatenate([xt + 1j * tu, (xt + 1j * tl)[::-1]]), pal["teeth"])
        if gap > 0.03:  # lower teeth hint
            sel = slice(4, -4)
            xt, lo_t = xs[sel], inner_lo[sel]
            band = np.concatenate([xt + 1j * (lo_t - 0.008 * bell[sel]), (xt + 1j * lo_t)[::-1]])
            batch.add(band, pal["lower_teeth"])
    else:
        batch.add(z_iu, pal["lip_line"], width(0.005 + 0.004 * press))
    # lip corners: small dark dimples
    dimple = _DIMPLE + complex(xs[-1], (inner_up[-1] + inner_lo[-1]) / 2)
    batch.add(dimple, pal["lip_corner"])
    batch.add(_mirror(dimple), pal["lip_corner"])


# ---- public API ------------------------------------------------------------------------------------------
def _render_image(au_intensity: np.ndarray, identity: FaceIdentity, rng: np.random.Generator) -> Image.Image:
    au = np.asarray(au_intensity, dtype=float).reshape(-1)
    if au.shape != (NUM_AUS,):
        raise ValueError(
            f"au_intensity must have {NUM_AUS} values (order {', '.join(AU_NAMES)}), got {au.shape}"
        )
    au = np.clip(au, 0.0, 1.0)
    static = _static_layer(identity)
    canvas = static.copy()
    _draw_dynamic(ImageDraw.Draw(canvas), identity, au, rng)
    k, s = SUPERSAMPLE, identity.size
    margin = round(_MARGIN * s)
    # per-frame placement jitter in 1/SUPERSAMPLE pixel steps, cropped while reducing (no resampling)
    dx, dy = np.clip(np.round(rng.normal(0, identity.jitter_px * k, 2)), -k * margin, k * margin).astype(int)
    x0, y0 = k * margin + int(dx), k * margin + int(dy)
    img = canvas.reduce(k, box=(x0, y0, x0 + k * s, y0 + k * s))
    # sensor noise: a random window of the identity's noise bank plus a global brightness flicker
    noise = identity._cache["noise"]
    ox, oy = rng.integers(0, noise.shape[0] - s, 2)
    arr = np.asarray(img, dtype=np.int16) + noise[oy : oy + s, ox : ox + s].astype(np.int16)
    arr += round(rng.normal(0, 2.0)) - 128
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_face(au_intensity: np.ndarray, identity: FaceIdentity, rng: np.random.Generator) -> np.ndarray:
    """Render one aligned face crop, (size, size, 3) uint8 RGB, whose geometry follows the 12 AU
    intensities (official order, each in [0, 1]). ``rng`` drives only the per-frame jitter (gaze,
    placement, noise), so a fixed identity and intensities give the same face up to that jitter."""
    return np.asarray(_render_image(au_intensity, identity, rng))


def render_jpeg(au_intensity: np.ndarray, identity: FaceIdentity, rng: np.random.Generator) -> bytes:
    """Render and encode as the identity's camera would (JPEG quality fixed per identity, 4:2:0)."""
    buf = io.BytesIO()
    _render_image(au_intensity, identity, rng).save(
        buf, format="JPEG", quality=identity.jpeg_quality, subsampling=2, optimize=False, progressive=False
    )
    return buf.getvalue()
