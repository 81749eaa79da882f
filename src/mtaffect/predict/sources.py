"""Media inputs for prediction: stills, folders, frame sequences, videos, streams, cameras and arrays.

Videos are decoded as a stream with PyAV (FFmpeg): frames are produced one at a time and never kept,
so memory does not depend on the video's length. Times are the frames' own timestamps
(``pts * time_base``, relative to the stream start), which is what a variable-frame-rate video needs;
``every=N`` analyses every N-th decoded frame (the others are decoded — codecs need them — but not
converted to RGB). Decoding can run in a background thread (:func:`prefetch`), overlapping FFmpeg (which
releases the GIL) with the network.

What an input may be (:func:`expand_inputs` turns each into single inputs):

- an image or video path; a ``file://`` URL (a local path);
- a stream URL (``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``, ``srt://``...): handed to FFmpeg
  as it is, never turned into a path;
- a camera: an int, or a string of digits that is not an existing file (``0`` is the first camera:
  ``/dev/video0`` with video4linux2 on Linux, AVFoundation on macOS), or a ``/dev/video*`` device;
- a folder: its media files in natural order; a folder whose images all have numbered names
  (``00001.jpg``..., the s-Aff-Wild2 ``cropped_aligned/<video>/`` layout or ``ffmpeg -i v.mp4 %05d.png``)
  is one *frame sequence* (tracked and smoothed like a video; frame numbers from the names, counted
  from 0 like a video's: ``00001.jpg`` is frame 0 at time 0; times need ``fps``).
  Subfolders are searched with ``recursive=True``;
- a ``.txt``/``.lst`` list of such paths, one a line;
- a uint8 array, RGB (``channels="bgr"`` for OpenCV's order): (H, W, 3) one image, (N, H, W, 3) one
  clip; a PIL image.

A video that stops before the length its container declares (a cut file, a stream that drops) keeps
the frames decoded so far and says so in :attr:`SourceInfo.ended_early` (frames decoded vs declared).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtaffect.features.decode import to_8bit
from mtaffect.io import open_regular
from mtaffect.predict.orientation import first_rotation, frame_rotation, quarter_turns, upright

IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
LIST_EXTENSIONS: Final[frozenset[str]] = frozenset({".txt", ".lst"})
VIDEO_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif", ".ts", ".3gp"}
)
#: URL schemes handed to FFmpeg as they are (``file://`` URLs become local paths instead).
STREAM_SCHEMES: Final[frozenset[str]] = frozenset(
    {"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp", "mms", "hls"}
)
CHANNELS: Final[tuple[str, str]] = ("rgb", "bgr")
#: What an input may be, as error messages say it.
ACCEPTED: Final[str] = (
    "an image, video or folder path (str or os.PathLike), a stream URL, a camera number, a uint8 RGB "
    "array, a PIL image, or a list of these"
)
#: A container's frame count estimated from its duration may be off by this much (frames, or fraction).
_ESTIMATE_SLACK: Final[tuple[int, float]] = (3, 0.01)


class InputError(ValueError):
    """An input that cannot be read; the message names the file and what to do."""


@dataclass
class Frame:
    """One analysed frame: ``index`` is its frame number, from 0 for every kind of input (the decoded-frame
    count of a video; for a frame sequence its file's number less the numbering's origin, see
    :class:`FrameSequence`); ``time`` in seconds (NaN for stills, and for sequences without an fps)."""

    index: int
    time: float
    image: np.ndarray  # uint8 RGB (H, W, 3); with aligned input, the backbone-ready crop


@dataclass
class SourceInfo:
    """What the report and the table say about an input."""

    file: str
    kind: str  # "image", "video", "stream", "sequence" or "array"
    width: int = 0
    height: int = 0
    fps: float = math.nan  # average frame rate (videos)
    duration: float = math.nan  # seconds (videos, when the container knows)
    frames: int | None = None  # decoded-frame count when known up front (estimate for videos)
    codec: str = ""
    every: int = 1
    #: After decoding: frames decoded (videos and streams), and why the input stopped early, if it did.
    decoded: int | None = None
    ended_early: str | None = None
    #: Frames of a sequence that could not be read: (file, reason); they get no row.
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def expected_analysed(self) -> int | None:
        """Analysed frames to expect (for progress bars), when known."""
        return None if self.frames is None else -(-self.frames // self.every)

    @property
    def temporal(self) -> bool:
        """Frames in time order (tracking over frames, smoothing, temporal models apply)."""
        return self.kind in ("video", "stream", "sequence", "array")


class MediaSource:
    """Iterate :class:`Frame` s of one input; ``info`` describes it. ``after`` (a frame number) skips the
    frames up to it, which is how a job resumes."""

    info: SourceInfo
    after: int = -1

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover
        raise NotImplementedError


# ---- what an input is ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSequence:
    """A folder of numbered frames (``00001.jpg``...) treated as one clip; ``frames``: the numbers in the
    names, sorted.

    Frame numbering starts at 1 (ffmpeg's ``%05d``, s-Aff-Wild2's ``cropped_aligned/<video>/00001.jpg``),
    or at 0 when a file is numbered 0: a frame's number is its file's less that :attr:`origin`, so that
    a sequence's first frame is frame 0 at time 0, as a video's is, and a frame extracted from a video
    keeps that video's frame number. Gaps in the numbering (s-Aff-Wild2 leaves out frames without a
    face) stay gaps.
    """

    folder: Path
    paths: tuple[Path, ...]
    frames: tuple[int, ...]

    def __str__(self) -> str:
        return str(self.folder)

    @property
    def origin(self) -> int:
        """The file number of the sequence's frame 0: 0 when a file is numbered 0, else 1."""
        return 0 if self.frames and min(self.frames) == 0 else 1


@dataclass(frozen=True)
class StreamInput:
    """A network stream or a camera, opened by FFmpeg as ``url`` (with ``av_format`` for devices)."""

    url: str
    av_format: str | None = None
    name: str = ""

    def __str__(self) -> str:
        return self.name or self.url


@dataclass(frozen=True)
class ArrayInput:
    """An in-memory image or clip with a name (e.g. a PIL image's file name)."""

    array: np.ndarray
    name: str = "<array>"

    def __str__(self) -> str:
        return self.name


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def media_kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def input_name(item) -> str:
    """How an input is named in tables, messages and reports (URLs exactly as given)."""
    if isinstance(item, np.ndarray):
        return "<array>"
    if isinstance(item, Image.Image):
        return str(getattr(item, "filename", "") or "<PIL image>")
    return str(item)


def camera_input(index: int, platform: str | None = None) -> StreamInput:
    """The FFmpeg device for camera ``index`` on this platform (Linux video4linux2, macOS AVFoundation)."""
    platform = platform or sys.platform
    if index < 0:
        raise InputError(f"camera {index}: a camera number is 0 or more")
    if platform.startswith("linux"):
        return StreamInput(f"/dev/video{index}", "v4l2", f"camera{index}")
    if platform == "darwin":
        return StreamInput(str(index), "avfoundation", f"camera{index}")
    raise InputError(
        f"camera {index}: cameras by number work on Linux and macOS; on Windows pass the DirectShow "
        "device as a stream, e.g. via an RTSP/HTTP server, or record a file first"
    )


def classify(item) -> object:
    """One raw input -> what it is: Path, np.ndarray, ArrayInput, StreamInput (URL or camera).

    Strings are never turned into paths before this check, so ``rtsp://host/x`` keeps its ``//``.
    """
    if isinstance(item, bool):
        raise InputError(f"{item!r}: not an input (give a path, URL, camera number or array)")
    if isinstance(item, int | np.integer):
        return camera_input(int(item))
    if isinstance(item, Image.Image):
        name = input_name(item)
        with _image_errors(name):
            return ArrayInput(pil_to_array(item), name)
    if isinstance(item, np.ndarray | FrameSequence | StreamInput | ArrayInput):
        return item
    if isinstance(item, bytes):  # a path as the OS gives it
        item = os.fsdecode(item)
    if not isinstance(item, str | os.PathLike):
        raise TypeError(f"{item!r} ({type(item).__name__}) is not an input: give {ACCEPTED}")
    if isinstance(item, str):
        scheme = urlsplit(item).scheme.lower() if "://" in item else ""
        if scheme == "file":
            parts = urlsplit(item)
            if parts.netloc not in ("", "localhost"):
                raise InputError(f"{item}: a file:// URL on another host; mount it and give the path")
            return Path(url2pathname(unquote(parts.path)))
        if scheme in STREAM_SCHEMES:
            return StreamInput(item)
        if scheme:
            raise InputError(
                f"{item}: unknown URL scheme {scheme!r}; streams: {', '.join(sorted(STREAM_SCHEMES))}"
            )
        if item.isdigit() and not Path(item).exists():
            return camera_input(int(item))
    p = Path(item)
    if str(p).startswith("/dev/video") and p.exists() and not p.is_file():
        return StreamInput(str(p), "v4l2", p.name)
    return p


def pil_to_array(im: Image.Image) -> np.ndarray:
    """A PIL image as uint8 RGB (H, W, 3), rotated by its EXIF orientation: the one conversion of an
    image in memory and of one read from a file (:func:`read_image`), so both give the same pixels
    (16-bit values scaled, not clipped: :func:`mtaffect.features.decode.to_8bit`)."""
    im = ImageOps.exif_transpose(im) or im
    return np.array(to_8bit(im, "RGB"))  # writable: torch reads it in place


def expand_inputs(inputs, _depth: int = 0, *, recursive: bool = False, sequences: bool = True) -> list:
    """Paths, URLs, cameras and arrays -> a flat list of single inputs.

    A folder becomes its media files in natural order (hidden files skipped); with ``sequences`` a
    folder of numbered images becomes one :class:`FrameSequence`; with ``recursive`` its subfolders are
    expanded the same way (each folder of numbered frames its own sequence), else they are skipped
    with a warning. A list file (``.txt``/``.lst``: one path a line, relative to the list's folder,
    ``#`` comments) becomes its entries.

    Arrays pass through: (H, W, 3) is one image, (N, H, W, 3) or a list of same-sized (H, W, 3) arrays
    one clip (a list of clips: one input each). A list may hold lists (each expanded the same way).
    Missing paths are kept (they fail later, one by one, with a clear message); anything else that is no
    input is a TypeError naming what is accepted, before any work.
    """
    if isinstance(inputs, _SINGLE):
        items: list = [inputs]
    elif _is_clip(inputs):
        items = [np.stack(inputs)]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, Mapping):
        items = list(inputs)
    else:
        raise TypeError(f"inputs must be {ACCEPTED}; got {type(inputs).__name__}")
    out: list = []
    for raw in items:
        if isinstance(raw, list | tuple):  # a list in the list: its own inputs
            if _depth > 4:
                raise TypeError(f"inputs: lists nested too deep; give {ACCEPTED}")
            out.extend(expand_inputs(raw, _depth + 1, recursive=recursive, sequences=sequences))
            continue
        item = classify(raw)
        if not isinstance(item, Path):
            out.append(item)
        elif item.is_dir():
            found = _expand_folder(item, recursive, sequences)
            if not found:
                raise InputError(_empty_folder_message(item, recursive))
            out.extend(found)
        elif item.suffix.lower() in LIST_EXTENSIONS and item.is_file():
            if _depth > 4:
                raise InputError(f"{item}: list files nested too deep (does a list name itself?)")
            out.extend(expand_inputs(read_list(item), _depth + 1, recursive=recursive, sequences=sequences))
        else:
            out.append(item)
    return out


#: Inputs that are one input, never a list of them.
_SINGLE = (np.ndarray, str, bytes, os.PathLike, int, Image.Image, FrameSequence, StreamInput, ArrayInput)


def _is_clip(inputs) -> bool:
    """Whether ``inputs`` is a list of same-sized (H, W, C) arrays: the frames of one clip."""
    if not (isinstance(inputs, Sequence) and inputs and all(isinstance(x, np.ndarray) for x in inputs)):
        return False
    return inputs[0].ndim == 3 and len({x.shape for x in inputs}) == 1


def _listdir(folder: Path) -> tuple[list[Path], list[Path]]:
    """(media files, subfolders) of ``folder`` in natural order, hidden entries skipped."""
    try:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    except OSError as e:
        raise InputError(f"{folder}: cannot list the folder ({e.strerror or e})") from e
    files = sorted((e for e in entries if e.is_file() and media_kind(e)), key=_natural_key)
    dirs = sorted((e for e in entries if e.is_dir()), key=_natural_key)
    return files, dirs


def numbered_frames(images: Sequence[Path]) -> tuple[int, ...] | None:
    """Frame numbers when every image name is a number (``00017.jpg`` -> 17) and they are distinct."""
    if len(images) < 2 or not all(p.stem.isascii() and p.stem.isdigit() for p in images):
        return None
    frames = tuple(int(p.stem) for p in images)
    return frames if len(set(frames)) == len(frames) else None


def _expand_folder(folder: Path, recursive: bool, sequences: bool, seen: set | None = None) -> list:
    """A folder's inputs; ``seen`` (the real folders and files visited so far in this expansion) makes
    each real folder searched once and each video or still counted once, however symbolic links loop
    or repeat (a sequence's frames are kept as they are: a repeated frame is a frame)."""
    seen = set() if seen is None else seen
    if not _first_visit(folder, seen):
        return []
    files, dirs = _listdir(folder)
    images = [f for f in files if media_kind(f) == "image"]
    frames = numbered_frames(images) if sequences else None
    # the files themselves before links to them: a link to a file met here is the one dropped
    once = {f for f in sorted(files, key=Path.is_symlink) if _first_visit(f, seen)}
    if frames is not None:
        order = np.argsort(frames, kind="stable")
        seq = FrameSequence(folder, tuple(images[i] for i in order), tuple(frames[i] for i in order))
        out: list = [seq, *(f for f in files if media_kind(f) == "video" and f in once)]
    else:
        out = [f for f in files if f in once]
    if recursive:
        for d in dirs:
            out.extend(_expand_folder(d, recursive, sequences, seen))
    elif dirs and out:
        warnings.warn(
            f"{folder}: {len(dirs)} subfolder(s) not searched ({', '.join(d.name for d in dirs[:3])}"
            f"{', ...' if len(dirs) > 3 else ''}); pass --recursive (recursive=True) to include them",
            stacklevel=3,
        )
    return out


def _first_visit(path: Path, seen: set) -> bool:
    """Whether the real file or folder behind ``path`` is met for the first time (then noted)."""
    try:
        st = path.stat()
    except OSError:
        return True  # unreadable: listed, and it fails later with its own message
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _empty_folder_message(folder: Path, recursive: bool) -> str:
    exts = ", ".join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
    if not recursive and _listdir(folder)[1]:
        return (
            f"{folder}: no images or videos at the top of the folder; pass --recursive to search its "
            "subfolders"
        )
    return f"{folder}: folder has no images or videos (extensions: {exts})"


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


# ---- reading images ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _image_errors(name: Path | str) -> Iterator[None]:
    """Failures of reading or converting image ``name`` as :class:`InputError` naming it."""
    try:
        yield
    except FileNotFoundError as e:
        raise InputError(f"{name}: file not found") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{name}: not a readable image ({e}); convert it to JPEG or PNG") from e


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB (H, W, 3), rotated by its EXIF orientation (:func:`pil_to_array`)."""
    with _image_errors(path), open_regular(path) as fh, Image.open(fh) as im:  # a FIFO never blocks
        return pil_to_array(im)


def guarded(reader: Callable[[Path], np.ndarray]) -> Callable[[Path], np.ndarray]:
    """``reader`` with the failures that concern one file alone turned into :class:`InputError`: an
    image over PIL's decompression-bomb limit, or one too large for memory."""

    def read(path: Path) -> np.ndarray:
        try:
            return reader(path)
        except Image.DecompressionBombError as e:
            raise InputError(
                f"{path}: image too large to decode safely ({e}); downscale it, or raise "
                "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
            ) from e
        except MemoryError as e:
            raise InputError(f"{path}: not enough memory to decode this image; downscale it") from e

    return read


def read_face_crop(path: Path, size: int, colour: str) -> np.ndarray:
    """An already aligned face decoded exactly as feature extraction decodes it
    (:func:`mtaffect.features.decode.decode_image`: JPEG draft scaling, luma plane for greyscale
    backbones, the same resize), so a checkpoint sees the pixels of its feature store."""
    from mtaffect.features.decode import decode_image

    with _image_errors(path):
        return decode_image(path, size, colour)


# ---- sources ---------------------------------------------------------------------------------------------


class ImageSource(MediaSource):
    def __init__(self, path: Path, reader: Callable[[Path], np.ndarray] = read_image) -> None:
        self.path = path
        self._image = guarded(reader)(path)  # read now: a bad file fails before any work
        h, w = self._image.shape[:2]
        self.info = SourceInfo(str(path), "image", w, h, frames=1)

    def __iter__(self) -> Iterator[Frame]:
        if self.after < 0:
            yield Frame(0, math.nan, self._image)


class SequenceSource(MediaSource):
    """A folder of numbered frames, read one at a time. Frame numbers count from 0
    (:attr:`FrameSequence.origin`); times are ``frame / fps`` when ``fps`` is given, else NaN: a folder of
    images holds no frame rate, and a guessed one would time every row wrongly (the pipeline says so once,
    :func:`mtaffect.predict.pipeline.source_warnings`).

    An unreadable frame is skipped and listed in ``info.unreadable`` (the others still count); the
    pipeline warns about it once the sequence is done (sources never warn: they may run in a thread).
    """

    def __init__(
        self,
        seq: FrameSequence,
        reader: Callable[[Path], np.ndarray] = read_image,
        every: int = 1,
        fps: float | None = None,
    ) -> None:
        self.seq, self.every, self.fps = seq, every, fps
        self.reader = guarded(reader)
        first = self._first_readable()
        h, w = first.shape[:2]
        self.info = SourceInfo(
            str(seq.folder), "sequence", w, h, fps or math.nan, frames=len(seq.paths), every=every
        )

    def _first_readable(self) -> np.ndarray:
        errors = []
        for p in self.seq.paths[:5]:
            try:
                return self.reader(p)
            except InputError as e:
                errors.append(str(e))
        raise InputError(f"{self.seq.folder}: cannot read its first frames ({errors[0]})")

    def __iter__(self) -> Iterator[Frame]:
        origin = self.seq.origin
        for k in range(0, len(self.seq.paths), self.every):
            path, index = self.seq.paths[k], self.seq.frames[k] - origin
            if index <= self.after:
                continue
            try:
                image = self.reader(path)
            except InputError as e:
                self.info.unreadable.append((str(path), str(e)))
                continue
            yield Frame(index, index / self.fps if self.fps else math.nan, image)


class ArraySource(MediaSource):
    """In-memory frames: (H, W, 3) one image, (N, H, W, 3) a clip (times from ``fps`` if given).

    Arrays are RGB; ``channels="bgr"`` reverses OpenCV's order.
    """

    def __init__(
        self,
        array: np.ndarray,
        name: str = "<array>",
        every: int = 1,
        fps: float | None = None,
        channels: str = "rgb",
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if channels not in CHANNELS:
            raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
        a = np.asarray(array)
        if a.ndim == 3:
            a = a[None]
            kind = "image"
        else:
            kind = "array"
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise InputError(f"{name}: expected uint8 RGB (H, W, 3) or (N, H, W, 3), got {a.dtype} {a.shape}")
        if channels == "bgr":
            a = a[..., ::-1]
        self.array, self.fps, self.every, self.prepare = a, fps, every, prepare
        self.info = SourceInfo(
            name, kind, a.shape[2], a.shape[1], fps or math.nan, frames=len(a), every=every
        )

    def __iter__(self) -> Iterator[Frame]:
        for i in range(0, len(self.array), self.every):
            if i <= self.after:
                continue
            t = i / self.fps if self.fps else math.nan
            image = np.ascontiguousarray(self.array[i])
            yield Frame(i, t, self.prepare(image) if self.prepare else image)


class VideoSource(MediaSource):
    """PyAV streaming decoder of the first video stream of a file, a stream URL or a camera.

    When decoding stops before the frame count the container declares (exactly, or estimated from its
    duration), or FFmpeg fails after some frames, the frames so far are kept and ``info.ended_early``
    says what happened; ``info.decoded`` counts the decoded frames.
    """

    def __init__(
        self,
        path: Path | str,
        every: int = 1,
        *,
        av_format: str | None = None,
        name: str | None = None,
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        import av

        self.path, self.every, self.av_format, self.prepare = path, every, av_format, prepare
        self.live = not isinstance(path, Path)
        label = name or str(path)
        if isinstance(path, Path) and not path.is_file():  # a local file (not live)
            raise InputError(f"{path}: file not found")
        try:
            with self._open() as c:
                if not c.streams.video:
                    raise InputError(f"{label}: no video stream (is it an audio file?)")
                s = c.streams.video[0]
                rate = float(s.average_rate) if s.average_rate else math.nan
                dur = float(s.duration * s.time_base) if s.duration and s.time_base else math.nan
                if math.isnan(dur) and c.duration:
                    dur = c.duration / 1e6  # container duration is in microseconds
                frames = int(s.frames) if s.frames else None
                self._declared_exact = frames is not None
                if frames is None and not (math.isnan(dur) or math.isnan(rate)):
                    frames = round(dur * rate)
                width, height = s.codec_context.width, s.codec_context.height
                # Phone videos: frames are analysed as displayed (see mtaffect.predict.orientation).
                # A live stream is not decoded ahead (it would wait for, and lose, a frame): upright
                # frames are still turned one by one, only the declared size stays the coded one.
                if not self.live and quarter_turns(first_rotation(c)) % 2:
                    width, height = height, width
                self.info = SourceInfo(
                    str(path),
                    "stream" if self.live else "video",
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
            if label != str(path):
                label = f"{label} ({path})"
            what = "stream or camera" if self.live else "video"
            advice = (
                "check the URL or device and that it is reachable"
                if self.live
                else "re-encode it, e.g. to H.264 MP4"
            )
            raise InputError(f"{label}: not a readable {what} ({_reason(e)}); {advice}") from e

    def _open(self):
        import av

        return av.open(str(self.path), format=self.av_format, timeout=(10.0, 10.0) if self.live else None)

    def __iter__(self) -> Iterator[Frame]:
        import av

        decoded = 0
        try:
            with self._open() as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"  # frame/slice threads inside FFmpeg
                tb = float(s.time_base) if s.time_base else None
                start = s.start_time if s.start_time is not None else None
                rate = self.info.fps
                for i, fr in enumerate(c.decode(s)):
                    decoded = i + 1
                    if i % self.every or i <= self.after:
                        continue
                    if fr.pts is not None and tb is not None:
                        base = start if start is not None else 0
                        t = (fr.pts - base) * tb
                    else:  # no timestamps: nominal rate
                        t = i / rate if rate == rate and rate > 0 else math.nan
                    image = upright(fr.to_ndarray(format="rgb24"), frame_rotation(fr))
                    yield Frame(i, float(t), self.prepare(image) if self.prepare else image)
        except av.error.FFmpegError as e:
            if decoded == 0:
                raise InputError(
                    f"{self.path}: decoding failed ({_reason(e)}); re-encode it, e.g. to H.264 MP4"
                ) from e
            self._finish(decoded, _reason(e))
            return
        self._finish(decoded, None)

    def _finish(self, decoded: int, error: str | None) -> None:
        """Record how decoding ended: frames decoded, and whether that is short of the declared length."""
        info = self.info
        info.decoded = decoded
        declared = info.frames
        if error is not None:
            of = f" of {declared} declared" if declared else ""
            info.ended_early = f"decoding stopped after {decoded}{of} frames ({error})"
        elif declared and declared - decoded > self._slack(declared):
            how = "declares" if self._declared_exact else "implies by its duration"
            info.ended_early = f"decoded {decoded} of the {declared} frames the container {how}"

    def _slack(self, declared: int) -> int:
        if self._declared_exact:
            return 1
        return max(_ESTIMATE_SLACK[0], round(_ESTIMATE_SLACK[1] * declared))


def _reason(e: Exception) -> str:
    """FFmpeg's message without the errno and the repeated file name."""
    return str(getattr(e, "strerror", None) or e)


def open_source(
    item,
    every: int = 1,
    fps: float | None = None,
    *,
    channels: str = "rgb",
    reader: Callable[[Path], np.ndarray] | None = None,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> MediaSource:
    """A :class:`MediaSource` for one expanded input (see :func:`expand_inputs`).

    Paths are images or videos by extension, else by content. ``reader`` decodes image files (default
    :func:`read_image`); ``prepare`` maps decoded video/array frames (both used for aligned faces).
    ``fps`` gives times to arrays and frame sequences; ``channels`` is the arrays' channel order.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    reader = reader or read_image
    item = classify(item)
    if isinstance(item, np.ndarray):
        return ArraySource(item, every=every, fps=fps, channels=channels, prepare=prepare)
    if isinstance(item, ArrayInput):
        return ArraySource(item.array, item.name, every, fps, "rgb", prepare)
    if isinstance(item, FrameSequence):
        return SequenceSource(item, reader, every, fps)
    if isinstance(item, StreamInput):
        return VideoSource(item.url, every, av_format=item.av_format, name=str(item), prepare=prepare)
    path = Path(item)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass it to expand_inputs() first")
    if not path.is_file():  # a FIFO would block the reader forever; a device or socket is no image
        raise InputError(f"{path}: not a regular file (a pipe, socket or device); give an image or video")
    kind = media_kind(path)
    if kind == "image":
        return ImageSource(path, reader)
    if kind == "video":
        return VideoSource(path, every, prepare=prepare)
    try:  # unknown extension: sniff
        return ImageSource(path, reader)
    except InputError:
        try:
            return VideoSource(path, every, prepare=prepare)
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
