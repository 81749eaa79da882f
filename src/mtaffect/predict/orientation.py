"""Display rotation of phone videos: frames are analysed, drawn and written the way they are shown.

Phones store a portrait video as landscape frames plus a display matrix ("rotate 90") that players
apply. FFmpeg's decoder returns the stored frames, so without this a portrait face is analysed lying on
its side (MTCNN misses most of them) and the annotated copy comes out sideways. PyAV exposes the matrix's
angle as ``VideoFrame.rotation``: the counter-clockwise rotation that shows the frame as intended, a
multiple of 90 degrees for phone videos.
"""

from __future__ import annotations

import numpy as np


def quarter_turns(rotation: float | None) -> int:
    """Counter-clockwise rotation in degrees -> quarter turns 0..3 (other angles round to the nearest)."""
    if rotation is None or rotation != rotation:
        return 0
    return round(float(rotation) / 90.0) % 4


def upright(image: np.ndarray, rotation: float | None) -> np.ndarray:
    """``image`` (H, W, C) rotated counter-clockwise by ``rotation`` degrees (a contiguous copy when
    rotated; the same array when not)."""
    k = quarter_turns(rotation)
    return image if k == 0 else np.ascontiguousarray(np.rot90(image, k))


def frame_rotation(frame) -> float:
    """The display rotation of a decoded PyAV frame (0 when the stream has none)."""
    return float(getattr(frame, "rotation", 0) or 0)


def first_rotation(container) -> float:
    """The display rotation of an open PyAV container's first video frame (0 when it has none): the
    upright size must be known before any frame is read (a source's declared size, an output stream's).
    Decodes that frame: give a container opened for this, or one that is read from the start again."""
    first = next(iter(container.decode(container.streams.video[0])), None)
    return frame_rotation(first) if first is not None else 0.0


__all__ = ["first_rotation", "frame_rotation", "quarter_turns", "upright"]
