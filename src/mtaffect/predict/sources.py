"""Media inputs for prediction: still images, folders, videos and in-memory arrays, as frame streams.

Videos are decoded as a stream with PyAV (FFmpeg): frames are produced one at a time and never kept,
so memory does not depend on the video's length. Times are the frames' own timestamps
(``pts * time_base``, relative to the stream start), which is what a variable-frame-rate video needs;
``every=N`` analyses every N-th decoded frame (the others are decoded — codecs need them — but not
converted to RGB). Decoding can run in a background thread (:func:`prefetch`), overlapping FFmpeg (which
releases the GIL) with the network.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtaffect.predict.orientation import frame_rotation, quarter_turns, upright

IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
LIST_EXTENSIONS: Final[frozenset[str]] = frozenset({".txt", ".lst"})
VIDEO_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif", ".ts", ".3gp"}
)


class InputError(ValueError):
    """An input that cannot be read; the message names the file and what to do."""


@dataclass
class Frame:
    """One analysed frame: ``index`` counts decoded frames from 0; ``time`` in seconds (NaN for stills)."""

    index: int
    time: float
    image: np.ndarray  # uint8 RGB (H, W, 3)


@dataclass
class SourceInfo:
    """What the report and the table say about an input."""

    file: str
    kind: str  # "image", "video" or "array"
    width: int = 0
    height: int = 0
    fps: float = math.nan  # average frame rate (videos)
    duration: float = math.nan  # seconds (videos, when the container knows)
    frames: int | None = None  # decoded-frame count when known up front (estimate for videos)
    codec: str = ""
    every: int = 1

    @property
    def expected_analysed(self) -> int | None:
        """Analysed frames to expect (for progress bars), when known."""
        return None if self.frames is None else -(-self.frames // self.every)


class MediaSource:
    """Iterate :class:`Frame` s of one input; ``info`` describes it."""

    info: SourceInfo

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover
        raise NotImplementedError


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def media_kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def expand_inputs(inputs: str | os.PathLike | Sequence, _depth: int = 0) -> list:
    """Paths and arrays -> a flat list of single inputs: a folder becomes its media files in natural order,
    a list file (``.txt``/``.lst``: one path a line, relative to the list's folder, ``#`` comments) its
    entries.

    Arrays pass through: (H, W, 3) is one image, (N, H, W, 3) or a list of (H, W, 3) arrays one clip.
    Missing paths are kept (they fail later, one by one, with a clear message).
    """
    if isinstance(inputs, np.ndarray | str | os.PathLike):
        items: list = [inputs]
    elif isinstance(inputs, Sequence) and inputs and all(isinstance(x, np.ndarray) for x in inputs):
        items = [np.stack(inputs)] if len({x.shape for x in inputs}) == 1 else list(inputs)
    else:
        items = list(inputs)
    out: list = []
    for item in items:
        if isinstance(item, np.ndarray):
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted((f for f in p.iterdir() if f.is_file() and media_kind(f)), key=_natural_key)
            if not files:
                raise InputError(
                    f"{p}: folder has no images or videos (extensions: "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))})"
                )
            out.extend(files)
        elif p.suffix.lower() in LIST_EXTENSIONS and p.is_file():
            if _depth > 4:
                raise InputError(f"{p}: list files nested too deep (does a list name itself?)")
            out.extend(expand_inputs(read_list(p), _depth + 1))
        else:
            out.append(p)
    return out


def read_list(path: Path) -> list[Path]:
    """Paths named in a list file, one a line (blank lines and ``#`` comments skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the list of inputs ({e})") from e
    out = []
    for line in lines:
        entry = line.split("#", 1)[0].strip()
        if entry:
            q = Path(entry).expanduser()
            out.append(q if q.is_absolute() else path.parent / q)
    if not out:
        raise InputError(f"{path}: the list names no input; write one image/video/folder path a line")
    return out


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB (H, W, 3), rotated by its EXIF orientation."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.array(im.convert("RGB"))  # writable: torch reads it in place
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable image ({e}); convert it to JPEG or PNG") from e


class ImageSource(MediaSource):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._image = read_image(path)  # read now: a bad file fails before any work
        h, w = self._image.shape[:2]
        self.info = SourceInfo(str(path), "image", w, h, frames=1)

    def __iter__(self) -> Iterator[Frame]:
        yield Frame(0, math.nan, self._image)


class ArraySource(MediaSource):
    """In-memory frames: (H, W, 3) one image, (N, H, W, 3) a clip (times from ``fps`` if given)."""

    def __init__(self, array: np.ndarray, name: str = "<array>", every: int = 1, fps: float | None = None):
        a = np.asarray(array)
        if a.ndim == 3:
            a = a[None]
            kind = "image"
        else:
            kind = "array"
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise InputError(f"{name}: expected uint8 RGB (H, W, 3) or (N, H, W, 3), got {a.dtype} {a.shape}")
        self.array, self.fps, self.every = a, fps, every
        self.info = SourceInfo(
            name, kind, a.shape[2], a.shape[1], fps or math.nan, frames=len(a), every=every
        )

    def __iter__(self) -> Iterator[Frame]:
        for i in range(0, len(self.array), self.every):
            t = i / self.fps if self.fps else math.nan
            yield Frame(i, t, self.array[i])


class VideoSource(MediaSource):
    """PyAV streaming decoder of the first video stream."""

    def __init__(self, path: Path, every: int = 1) -> None:
        import av

        self.path, self.every = path, every
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        try:
            with av.open(str(path)) as c:
                if not c.streams.video:
                    raise InputError(f"{path}: no video stream (is it an audio file?)")
                s = c.streams.video[0]
                rate = float(s.average_rate) if s.average_rate else math.nan
                dur = float(s.duration * s.time_base) if s.duration and s.time_base else math.nan
                if math.isnan(dur) and c.duration:
                    dur = c.duration / 1e6  # container duration is in microseconds
                frames = int(s.frames) if s.frames else None
                if frames is None and not (math.isnan(dur) or math.isnan(rate)):
                    frames = round(dur * rate)
                width, height = s.codec_context.width, s.codec_context.height
                # Phone videos: frames are analysed as displayed (see mtaffect.predict.orientation).
                first = next(iter(c.decode(s)), None)
                self.rotation = frame_rotation(first) if first is not None else 0.0
                if quarter_turns(self.rotation) % 2:
                    width, height = height, width
                self.info = SourceInfo(
                    str(path),
                    "video",
                    width,
                    height,
                    rate,
                    dur,
                    frames,
                    s.codec_context.name,
                    every,
                )
        except InputError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise InputError(
                f"{path}: not a readable video ({_reason(e)}); re-encode it, e.g. to H.264 MP4"
            ) from e

    def __iter__(self) -> Iterator[Frame]:
        import av

        try:
            with av.open(str(self.path)) as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"  # frame/slice threads inside FFmpeg
                tb = float(s.time_base) if s.time_base else None
                start = s.start_time if s.start_time is not None else None
                rate = self.info.fps
                for i, fr in enumerate(c.decode(s)):
                    if i % self.every:
                        continue
                    if fr.pts is not None and tb is not None:
                        base = start if start is not None else 0
                        t = (fr.pts - base) * tb
                    else:  # no timestamps: nominal rate
                        t = i / rate if rate == rate and rate > 0 else math.nan
                    yield Frame(i, float(t), upright(fr.to_ndarray(format="rgb24"), frame_rotation(fr)))
        except av.error.FFmpegError as e:
            raise InputError(
                f"{self.path}: decoding failed ({_reason(e)}); re-encode it, e.g. to H.264 MP4"
            ) from e


def _reason(e: Exception) -> str:
    """FFmpeg's message without the errno and the repeated file name."""
    return str(getattr(e, "strerror", None) or e)


def open_source(item, every: int = 1, fps: float | None = None) -> MediaSource:
    """A :class:`MediaSource` for a path (image or video, by extension, else by content) or an array."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if isinstance(item, np.ndarray):
        return ArraySource(item, every=every, fps=fps)
    path = Path(item)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass it to expand_inputs() first")
    kind = media_kind(path)
    if kind == "image":
        return ImageSource(path)
    if kind == "video":
        return VideoSource(path, every)
    try:  # unknown extension: sniff
        return ImageSource(path)
    except InputError:
        try:
            return VideoSource(path, every)
        except InputError as e:
            raise InputError(f"{path}: neither an image nor a video that can be decoded") from e


_DONE = object()


def prefetch(frames: Iterable[Frame], depth: int = 32) -> Iterator[Frame]:
    """Run ``frames`` in a background thread, ``depth`` items ahead; errors are re-raised here.

    Closing the returned generator stops the producer (it never blocks forever on a full queue).
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for f in frames:
                while not stop.is_set():
                    try:
                        q.put(f, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    worker = threading.Thread(target=produce, name="mtaffect-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # drain so the producer can see ``stop``
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)
        worker.join()
