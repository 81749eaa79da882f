"""What training and prediction iterate over: rows, or windows of consecutive annotated frames.

One definition for every path that needs frame order (the feature-store loop, image training,
``predict_store``, smoothing): names are ``<video>/<frame>.jpg``; frames are sparse, so windows are
cut from each video's *annotated* frames sorted by frame number, never across videos.

- :func:`split_image_names` gives each name's video and integer frame number (one rule,
  :func:`parse_image_name`; :func:`split_image_names_arrow` is its vectorised form, which the
  annotation reader uses too).
- :func:`make_windows` cuts each video into windows of ``window`` steps every ``stride`` frames and
  marks the steps that count (``step_mask``), so padding never enters a loss, the metric or a
  prediction. With ``stride == window`` every frame counts in exactly one window (validation and
  prediction use that, so each frame is predicted once). Where the last window would run past the
  video's end, ``edge`` decides: ``pad`` repeats its last position (masked); ``shift`` moves it back
  to end on the video's last frame, so it is full of real frames (context), and counts only the frames
  ``pad`` would have counted. A video shorter than a window is padded either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


class ImageNameError(ValueError):
    """An image name is not ``<video>/<frame>.<ext>``, so its video and frame number are unknown."""


def unsafe_name_reason(name: str) -> str | None:
    """Why an image name could point outside the dataset's image folder, or None when it cannot.

    Names are joined to ``<root>/cropped_aligned/``; an absolute path or a ``..`` part would make a
    list file read (and a store record) any file on the machine.
    """
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' part"
    return None


def first_unsafe_name(names: Sequence[str] | np.ndarray | pd.Series) -> tuple[int, str] | None:
    """Position and :func:`unsafe_name_reason` of the first name that could leave the image folder.

    For long tables (a million predictions): a vectorised pass keeps only the names that could be
    unsafe (a ``..``, a leading slash or a drive colon) and :func:`unsafe_name_reason` decides on those.
    """
    try:  # a table's string column converts without a copy
        arr = pa.array(names, type=pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        arr = pa.array(pd.Series(np.asarray(names, dtype=object)).astype(str), type=pa.string())
    arr = pc.fill_null(arr, "")
    maybe = pc.or_(
        pc.or_(pc.match_substring(arr, ".."), pc.starts_with(arr, "/")),
        pc.or_(pc.starts_with(arr, "\\"), pc.equal(pc.utf8_slice_codeunits(arr, 1, 2), ":")),
    )
    for i in np.flatnonzero(maybe.to_numpy(zero_copy_only=False)).tolist():
        reason = unsafe_name_reason(arr[i].as_py())
        if reason is not None:
            return i, reason
    return None


#: Longest frame number read from a name: 18 digits always fit an int64 (19 may not).
MAX_FRAME_DIGITS = 18


def parse_image_name(name: str) -> tuple[str, int] | None:
    """Video and frame number of one ``<video>/<frame>.<ext>`` name, or None when it is not one.

    The video is the folder part (not empty); the frame is the whole stem (up to the last dot), ASCII
    digits only, at most :data:`MAX_FRAME_DIGITS` of them.
    """
    video, _, base = name.rpartition("/")
    stem = base.rpartition(".")[0] if "." in base else base
    if not video or not stem.isascii() or not stem.isdigit() or len(stem) > MAX_FRAME_DIGITS:
        return None
    return video, int(stem)


def split_image_names_arrow(names: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`parse_image_name` of every name at once (Arrow, for long lists); None when any is not one.

    ``names`` is an Arrow string array without nulls. Returns the videos (object array) and frames.
    """
    parts = pc.split_pattern(names, "/", max_splits=1, reverse=True)
    if not pc.all(pc.equal(pc.list_value_length(parts), 2)).as_py():  # also None (empty list)
        return None
    video = pc.list_element(parts, 0)
    base = pc.list_element(parts, 1)
    stem = pc.list_element(pc.split_pattern(base, ".", max_splits=1, reverse=True), 0)
    ok = pc.and_(  # ascii_is_decimal is false for an empty stem
        pc.and_(pc.ascii_is_decimal(stem), pc.less_equal(pc.utf8_length(stem), MAX_FRAME_DIGITS)),
        pc.greater(pc.utf8_length(video), 0),
    )
    if not pc.all(ok).as_py():
        return None
    frame = pc.cast(stem, pa.int64()).to_numpy(zero_copy_only=False)  # <= 18 digits: always fits
    return video.to_numpy(zero_copy_only=False).astype(object), frame.astype(np.int64)


def split_image_names(
    images: Sequence[str] | np.ndarray | pd.Series, *, strict: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Video (object array) and integer frame number of each ``<video>/<frame>.jpg`` name.

    ``strict=False`` accepts any name: the video is the folder part (``""`` for none) and a stem that
    is not a frame number (:func:`parse_image_name`) takes the name's list position as its frame, so
    list order is kept.
    """
    arr = pa.array(pd.Series(np.asarray(images, dtype=object)).astype(str), type=pa.string())
    fast = split_image_names_arrow(arr)
    if fast is not None:
        return fast
    video_out = np.empty(len(arr), dtype=object)
    frame_out = np.zeros(len(arr), dtype=np.int64)
    for i, name in enumerate(arr.to_pylist()):
        parsed = parse_image_name(name)
        if parsed is None:
            if strict:
                raise ImageNameError(
                    f"row {i}: image {name!r} is not '<video>/<frame>.jpg', so its video and frame are "
                    "unknown"
                )
            parsed = (name.rpartition("/")[0], i)
        video_out[i], frame_out[i] = parsed
    return video_out, frame_out


#: How the last window of a video meets the video's end (see :func:`make_windows`).
WINDOW_EDGES: tuple[str, ...] = ("pad", "shift")


def make_windows(
    video: Sequence[str] | np.ndarray, frame: np.ndarray, window: int, stride: int, edge: str = "pad"
) -> tuple[np.ndarray, np.ndarray]:
    """(W, window) positions into the row arrays and the (W, window) mask of the steps that count.

    Positions of one video are sorted by frame; windows start every ``stride`` frames until one
    reaches the video's end; the last is padded by repeating its last position (``edge="pad"``), or
    moved back to end on the video's last frame (``edge="shift"``, videos of at least ``window``
    frames), its mask then marking only the frames the padded window would have counted.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    if edge not in WINDOW_EDGES:
        raise ValueError(f"window edge must be one of {', '.join(WINDOW_EDGES)}, got {edge!r}")
    video = np.asarray(video, dtype=object)
    frame = np.asarray(frame, dtype=np.int64)
    if len(video) == 0:
        return np.zeros((0, window), dtype=np.int64), np.zeros((0, window), dtype=bool)
    _, codes = np.unique(video.astype(str), return_inverse=True)
    codes = codes.astype(np.int64).reshape(-1)
    order = np.lexsort((frame, codes))  # by video, then frame
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    idx_list: list[np.ndarray] = []
    mask_list: list[np.ndarray] = []
    steps = np.arange(window)
    for seg in np.split(order, bounds):
        n = len(seg)
        starts = np.arange(0, max(n - window, 0) + stride, stride)
        starts = starts[starts < n]
        if starts[-1] + window < n:  # the stride skipped past the end: one more window reaches it
            starts = np.append(starts, starts[-1] + stride)
        pos = starts[:, None] + steps[None, :]
        mask = pos < n
        if edge == "shift" and n >= window and starts[-1] + window > n:
            first = starts[-1]  # the frames the padded window counts: first .. n - 1
            pos[-1] = (n - window) + steps
            mask[-1] = pos[-1] >= first
        idx_list.append(seg[np.minimum(pos, n - 1)])
        mask_list.append(mask)
    return np.concatenate(idx_list), np.concatenate(mask_list)


__all__ = [
    "MAX_FRAME_DIGITS",
    "WINDOW_EDGES",
    "ImageNameError",
    "first_unsafe_name",
    "make_windows",
    "parse_image_name",
    "split_image_names",
    "split_image_names_arrow",
    "unsafe_name_reason",
]
