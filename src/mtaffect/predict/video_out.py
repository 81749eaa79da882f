"""The one way mtaffect opens a video stream to write: the codec chosen once, yuv420p, the x264 settings.

Annotated videos and the demo's generated media share it, so a codec or quality change is made here.
PyAV is imported by the caller (it is optional at import time of the callers' modules).
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from av.container import OutputContainer
    from av.video.stream import VideoStream


def default_codec() -> str:
    """The H.264 encoder when this PyAV build has it, else MPEG-4 Part 2 (every build has that).

    Returns:
        An FFmpeg encoder name.
    """
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def add_video_stream(
    container: OutputContainer,
    codec: str | None,
    rate: Fraction,
    size: tuple[int, int] | None = None,
    crf: int = 23,
) -> VideoStream:
    """Add a yuv420p video stream to ``container``.

    Args:
        container: an output container opened by ``av.open(path, "w")``.
        codec: an FFmpeg video encoder; None: :func:`default_codec`.
        rate: the nominal frame rate.
        size: (width, height) of the frames; None: set by the caller before the first frame.
        crf: x264's constant rate factor (quality; lower is better), used only with libx264.

    Returns:
        The stream, ready for ``encode``.

    Raises:
        ValueError: ``codec`` names an audio or subtitle encoder.
    """
    from av.video.stream import VideoStream

    codec = codec or default_codec()
    stream = container.add_stream(codec, rate=rate)
    if not isinstance(stream, VideoStream):
        raise ValueError(f"{codec}: not a video encoder")
    stream.pix_fmt = "yuv420p"
    if size is not None:
        stream.width, stream.height = size
    if codec == "libx264":
        stream.options = {"crf": str(crf), "preset": "veryfast"}
    return stream
