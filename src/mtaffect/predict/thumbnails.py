"""A small picture of each face id, so a report (or a user) can see which row is which person.

For each face id the row with the highest detector confidence is cut out of its frame (the box padded
by 20%, squared, resized to ``size`` pixels) and encoded as JPEG. Stills are read as the pipeline reads
them; videos are seeked to that frame's timestamp (one short decode per face, not a pass over the
video) and turned upright like the analysed frames. In-memory arrays have no file to read: no pictures.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mtaffect.predict.annotate import face_box
from mtaffect.predict.orientation import frame_rotation, upright
from mtaffect.predict.sources import InputError, SourceInfo, read_image
from mtaffect.schema import BOX_COLUMNS


def crop_face(image: np.ndarray, box, size: int = 96, pad: float = 0.2) -> Image.Image:
    """The padded square around ``box`` (clipped to the picture), resized to ``size`` x ``size``."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = face_box(box, (w, h))
    side = max(x2 - x1, y2 - y1) * (1 + 2 * pad)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    if right <= left or bottom <= top:
        return Image.new("RGB", (size, size))
    return Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right])).resize(
        (size, size), Image.Resampling.BILINEAR
    )


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _video_frame(path: Path, t: float) -> np.ndarray | None:
    """The upright RGB frame shown at ``t`` seconds from the stream start (nearest at or after)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        tb = s.time_base
        if tb is None or not math.isfinite(t):
            return None
        start = s.start_time or 0
        target = start + int(t / float(tb))
        c.seek(max(start, target), stream=s, backward=True, any_frame=False)
        eps = 0.5 / float(s.average_rate or 25)
        for fr in c.decode(s):
            if fr.pts is None or (fr.pts - start) * float(tb) >= t - eps:
                return upright(fr.to_ndarray(format="rgb24"), frame_rotation(fr))
    return None


def face_thumbnails(info: SourceInfo, table: pd.DataFrame, size: int = 96) -> dict[int, bytes]:
    """{face_id: JPEG bytes} for the faces of one input (empty when its pictures cannot be read)."""
    cols = [c for c in ("face_id", "confidence", "time", *BOX_COLUMNS) if c in table.columns]
    mask = (table["success"] == 1) & (table["file"] == info.file) if "file" in table else slice(None)
    rows = table.loc[mask, cols]  # not the table's landmark columns: no copy of them
    if not len(rows) or info.kind not in ("image", "video") or not Path(info.file).is_file():
        return {}
    # the most confident row of each face (``--aligned`` rows have no confidence: the first one)
    best = rows.loc[rows["confidence"].fillna(-1.0).groupby(rows["face_id"]).idxmax()]
    out: dict[int, bytes] = {}
    if info.kind == "image":
        try:
            image = read_image(Path(info.file))
        except InputError:
            return out
        for _, r in best.iterrows():
            out[int(r["face_id"])] = _jpeg(crop_face(image, r[list(BOX_COLUMNS)], size))
        return out
    import av

    for _, r in best.iterrows():
        try:
            frame = _video_frame(Path(info.file), float(r["time"]))
        except (OSError, av.error.FFmpegError):
            frame = None
        if frame is not None:
            out[int(r["face_id"])] = _jpeg(crop_face(frame, r[list(BOX_COLUMNS)], size))
    return out


__all__ = ["crop_face", "face_thumbnails"]
