"""Annotated video: each face's box, id, expression and valence/arousal bars drawn over the input.

A second streaming pass over the source (PyAV decode -> PIL draw -> PyAV encode): memory stays flat.
Every decoded frame is written; when only every N-th frame was analysed, a frame shows the most recent
analysed result (held, never interpolated). Output timestamps are the input's own, so a variable frame
rate video stays in sync.
"""

from __future__ import annotations

import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from mtaffect.io import atomic_path
from mtaffect.predict.plots import EXPR_COLOURS
from mtaffect.predict.sources import InputError

#: Box colours by face id (cycled).
ID_COLOURS = ("#00e676", "#2979ff", "#ff9100", "#d500f9", "#ffea00", "#00e5ff", "#ff1744", "#76ff03")


@lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _rows_by_frame(table: pd.DataFrame) -> dict[int, pd.DataFrame]:
    ok = table[table["success"] == 1]
    return {int(f): g for f, g in ok.groupby("frame")}


def _bar(
    draw: ImageDraw.ImageDraw, x: float, y: float, w: float, h: float, value: float, colour: str
) -> None:
    """A centred bar: the fill runs from the middle to ``value`` in [-1, 1]."""
    draw.rectangle([x, y, x + w, y + h], fill=(30, 30, 30), outline=(220, 220, 220))
    mid = x + w / 2
    end = mid + float(np.clip(value, -1, 1)) * w / 2
    draw.rectangle([min(mid, end), y + 1, max(mid, end), y + h - 1], fill=colour)
    draw.line([mid, y, mid, y + h], fill=(255, 255, 255))


def draw_faces(image: np.ndarray, rows: pd.DataFrame | None) -> np.ndarray:
    """Draw the rows of one frame (box, id, expression, VA bars) on a copy of ``image``."""
    if rows is None or not len(rows):
        return image
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    scale = max(1.0, min(im.size) / 480)
    font = _font(round(14 * scale))
    for _, r in rows.iterrows():
        fid = int(r["face_id"])
        col = ID_COLOURS[fid % len(ID_COLOURS)]
        x1, y1, x2, y2 = (float(r[c]) for c in ("x1", "y1", "x2", "y2"))
        lw = max(2, round(2 * scale))
        draw.rectangle([x1, y1, x2, y2], outline=col, width=lw)
        expr = str(r["expression"])
        p = float(r[f"{expr}_p"]) if f"{expr}_p" in r.index else float("nan")
        label = f"#{fid} {expr} {p:.2f}"
        tb = draw.textbbox((0, 0), label, font=font)
        th, tw = tb[3] - tb[1], tb[2] - tb[0]
        ty = y1 - th - 6 if y1 - th - 6 >= 0 else y2 + 2
        draw.rectangle([x1, ty, x1 + tw + 8, ty + th + 6], fill=EXPR_COLOURS.get(expr, "#eeeeee"))
        draw.text((x1 + 4, ty + 3 - tb[1]), label, fill=(0, 0, 0), font=font)
        bw, bh = max(60.0, x2 - x1), max(6.0, 7 * scale)
        by = y2 + 4 if ty < y1 else y2 + th + 12
        for i, (name, colour) in enumerate((("valence", "#4caf50"), ("arousal", "#ff9800"))):
            yy = by + i * (bh + 3 + th)
            draw.text(
                (x1, yy),
                f"{name[0].upper()} {float(r[name]):+.2f}",
                fill=(255, 255, 255),
                font=font,
                stroke_width=1,
                stroke_fill=(0, 0, 0),
            )
            _bar(draw, x1, yy + th + 2, bw, bh, float(r[name]), colour)
    return np.asarray(im)


def annotate_video(
    source: str | os.PathLike,
    table: pd.DataFrame,
    out: str | os.PathLike,
    overwrite: bool = False,
    codec: str | None = None,
    crf: int = 23,
) -> Path:
    """Write ``out`` (MP4): ``source`` with the rows of ``table`` (this file's) drawn on every frame."""
    import av

    source, out = Path(source), Path(out)
    rows = _rows_by_frame(table[table["file"] == str(source)] if "file" in table else table)
    keys = np.array(sorted(rows), dtype=np.int64)
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    try:
        with av.open(str(source)) as cin, atomic_path(out, overwrite=overwrite) as tmp:
            sin = cin.streams.video[0]
            sin.thread_type = "AUTO"
            rate = sin.average_rate or Fraction(25)
            with av.open(str(tmp), "w", format="mp4") as cout:
                sout = cout.add_stream(codec, rate=rate)
                sout.width, sout.height = sin.codec_context.width, sin.codec_context.height
                sout.pix_fmt = "yuv420p"
                tb = sin.time_base or Fraction(1, round(float(rate)))
                sout.codec_context.time_base = tb
                if codec == "libx264":
                    sout.options = {"crf": str(crf), "preset": "veryfast"}
                last_pts = None
                for i, fr in enumerate(cin.decode(sin)):
                    j = np.searchsorted(keys, i, side="right") - 1  # latest analysed frame <= i
                    img = fr.to_ndarray(format="rgb24")
                    img = draw_faces(img, rows[int(keys[j])] if j >= 0 else None)
                    of = av.VideoFrame.from_ndarray(img, format="rgb24")
                    pts = fr.pts if fr.pts is not None else i
                    if last_pts is not None and pts <= last_pts:  # encoders need increasing timestamps
                        pts = last_pts + 1
                    of.pts, of.time_base, last_pts = pts, tb, pts
                    for pkt in sout.encode(of):
                        cout.mux(pkt)
                for pkt in sout.encode():
                    cout.mux(pkt)
    except av.error.FFmpegError as e:
        raise InputError(f"{source}: cannot write the annotated video {out} ({e})") from e
    return out
