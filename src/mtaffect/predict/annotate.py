"""Annotated copies: each face's box, id, expression and valence/arousal bars drawn over the input.

What is drawn are layers (``draw``, :data:`DRAW_LAYERS`): ``faces`` (the overlay above; the default) and
``landmarks`` (the 478 dense landmarks of each face as small dots in its box's colour, from the table's
``x_i``/``y_i`` columns: a table made with ``--landmarks dense``; drawing them from a table without those
columns is a ValueError saying so). A face the landmarker did not measure (NaN coordinates) gets no dots.

Videos: a second streaming pass over the source (PyAV demux -> decode -> PIL draw -> encode -> mux):
memory stays flat. Every decoded frame is written; when only every N-th frame was analysed, a frame
shows the most recent analysed result (held, never interpolated). Output timestamps are the input's own,
so a variable frame rate video stays in sync (a folder of numbered frames plays at ``--fps``,
:func:`annotate_sequence`). The audio stream is copied as is (re-encoded to AAC when
its codec cannot go into MP4), and a phone video's display rotation is applied to the pixels, so the
copy plays upright everywhere (the table's boxes are in upright coordinates too). Stills: one annotated
image per input. Every overlay is placed inside the picture, whatever the face's position.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Final, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageColor, ImageDraw, ImageFont

from mtaffect.io import atomic_path
from mtaffect.predict.orientation import first_rotation, frame_rotation, quarter_turns, upright
from mtaffect.predict.plots import EXPR_COLOURS
from mtaffect.predict.sources import InputError, read_image
from mtaffect.predict.video_out import add_video_stream
from mtaffect.schema import BOX_COLUMNS, EXPR_PROB_COLUMNS, NUM_DENSE_LANDMARKS, VA_NAMES

#: Audio codecs an MP4 file takes as they are; others are re-encoded to AAC.
MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"})

#: Box colours by face id (cycled).
ID_COLOURS = ("#00e676", "#2979ff", "#ff9100", "#d500f9", "#ffea00", "#00e5ff", "#ff1744", "#76ff03")

#: What an annotated copy can draw: ``faces`` (box, id, expression, valence/arousal bars) and
#: ``landmarks`` (the dense landmarks as dots; the table needs ``--landmarks dense``).
DRAW_LAYERS: Final[tuple[str, ...]] = ("faces", "landmarks")
#: The layers drawn when ``draw`` is None: the face overlay alone.
DEFAULT_DRAW: Final[frozenset[str]] = frozenset({"faces"})
DENSE_X_COLUMNS: Final[tuple[str, ...]] = tuple(f"x_{i}" for i in range(NUM_DENSE_LANDMARKS))
DENSE_Y_COLUMNS: Final[tuple[str, ...]] = tuple(f"y_{i}" for i in range(NUM_DENSE_LANDMARKS))
#: The columns :func:`draw_faces` reads for the ``faces`` layer (a narrow copy is iterated, not the
#: table's hundreds of landmark columns).
_FACE_COLUMNS: Final[tuple[str, ...]] = ("face_id", *BOX_COLUMNS, "expression", *EXPR_PROB_COLUMNS, *VA_NAMES)


def check_draw(draw: Collection[str] | str | None) -> frozenset[str]:
    """``draw`` as a set of layer names (None: :data:`DEFAULT_DRAW`; a string: that one layer); an unknown
    name is a ValueError listing :data:`DRAW_LAYERS`."""
    if draw is None:
        return DEFAULT_DRAW
    layers = frozenset([draw] if isinstance(draw, str) else draw)
    unknown = sorted(layers - set(DRAW_LAYERS))
    if unknown:
        raise ValueError(
            f"cannot draw {', '.join(map(repr, unknown))}: the layers are {', '.join(DRAW_LAYERS)}"
        )
    return layers


def check_draw_table(table: pd.DataFrame, draw: Collection[str] | str | None) -> frozenset[str]:
    """:func:`check_draw`, and a ValueError when ``draw`` has ``landmarks`` and ``table`` lacks the dense
    landmark columns (``x_0..x_477``, ``y_0..y_477``)."""
    layers = check_draw(draw)
    if "landmarks" in layers:
        missing = [c for c in (*DENSE_X_COLUMNS, *DENSE_Y_COLUMNS) if c not in table.columns]
        if missing:
            raise ValueError(
                "drawing landmarks needs the dense landmark columns x_0..x_477 and y_0..y_477, which this "
                f"table lacks ({len(missing)} missing, e.g. {missing[0]}): run `mtaffect predict` with "
                "--landmarks dense"
            )
    return layers


@lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _rows_by_frame(table: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """The face rows of each frame, with the columns the ``faces`` layer reads (not the table's hundreds
    of landmark columns: no second copy of those)."""
    ok = table[table["success"] == 1]
    ok = ok[[c for c in ("frame", *_FACE_COLUMNS) if c in ok.columns]]
    return {int(f): g for f, g in ok.groupby("frame")}


def _file_rows(table: pd.DataFrame, file, layers: frozenset[str]) -> pd.DataFrame:
    """The rows of ``file`` (all rows when the table has no ``file`` column), with the columns the
    ``layers`` read (one narrow copy: not the depth or whatever else a wide table holds)."""
    dense = (*DENSE_X_COLUMNS, *DENSE_Y_COLUMNS) if "landmarks" in layers else ()
    cols = [c for c in ("frame", "success", *_FACE_COLUMNS, *dense) if c in table.columns]
    return table.loc[table["file"] == str(file) if "file" in table else slice(None), cols]


#: One frame's dense landmarks: (face ids (n,), x (n, 478), y (n, 478)).
Points = tuple[np.ndarray, np.ndarray, np.ndarray]


def _dense_points(rows: pd.DataFrame) -> Points:
    check_draw_table(rows, {"landmarks"})
    return (
        rows["face_id"].to_numpy(np.int64),
        rows[list(DENSE_X_COLUMNS)].to_numpy(np.float32),
        rows[list(DENSE_Y_COLUMNS)].to_numpy(np.float32),
    )


def _points_by_frame(table: pd.DataFrame) -> dict[int, Points]:
    """The dense landmarks of each frame's face rows, read from the table once (a video draws them on
    every frame)."""
    ok = table[table["success"] == 1]
    ids, xs, ys = _dense_points(ok)
    groups = ok.groupby("frame").indices if len(ok) else {}
    return {int(f): (ids[i], xs[i], ys[i]) for f, i in groups.items()}


def _bar(
    draw: ImageDraw.ImageDraw, x: float, y: float, w: float, h: float, value: float, colour: str
) -> None:
    """A centred bar: the fill runs from the middle to ``value`` in [-1, 1]."""
    draw.rectangle([x, y, x + w, y + h], fill=(30, 30, 30), outline=(220, 220, 220))
    mid = x + w / 2
    end = mid + float(np.clip(value, -1, 1)) * w / 2
    draw.rectangle([min(mid, end), y + 1, max(mid, end), y + h - 1], fill=colour)
    draw.line([mid, y, mid, y + h], fill=(255, 255, 255))


class Layout(NamedTuple):
    """Where one face's overlays go (pixel rectangles x1, y1, x2, y2), all inside the picture."""

    label: tuple[float, float, float, float]
    bars: tuple[tuple[float, float, float, float], ...]  # valence, arousal: text + bar each
    bar_width: float
    bar_height: float


def _clamp(x: float, lo: float, hi: float) -> float:
    return float(min(max(x, lo), max(lo, hi)))


def overlay_layout(
    box: tuple[float, float, float, float], size: tuple[int, int], text: tuple[float, float], scale: float
) -> Layout:
    """Positions of the label (above the box, else below) and the two VA bars (below the box, else
    above, else inside its bottom), shifted so nothing leaves the ``size`` = (W, H) picture."""
    w, h = size
    x1, y1, x2, y2 = box
    tw, th = text
    label_h, label_w = th + 6, tw + 8
    ly = y1 - label_h if y1 - label_h >= 0 else y2 + 2
    lx = _clamp(x1, 0, w - label_w - 1)
    ly = _clamp(ly, 0, h - label_h - 1)
    bw, bh = min(max(60.0, x2 - x1), w - 2.0), max(6.0, 7 * scale)
    row = th + 2 + bh + 3  # text line, bar, gap
    block = 2 * row
    below = max(y2, ly + label_h if ly > y1 else y2) + 4
    if below + block <= h:
        by = below
    elif y1 - block - (label_h if ly < y1 else 0) - 4 >= 0:
        by = y1 - block - (label_h if ly < y1 else 0) - 4
    else:
        by = h - block - 1
    by = _clamp(by, 0, h - block - 1)
    bx = _clamp(x1, 0, w - bw - 1)
    bars = tuple((bx, by + i * row, bx + bw, by + i * row + row - 3) for i in range(2))
    return Layout((lx, ly, lx + label_w, ly + label_h), bars, bw, bh)


def face_box(box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` as floats; a row without a box (``--aligned`` input: the picture is the face) is the
    whole ``size`` = (W, H) picture."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if all(np.isfinite((x0, y0, x1, y1))):
        return x0, y0, x1, y1
    return 0.0, 0.0, size[0] - 1.0, size[1] - 1.0


def _dot_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of the pixels of a dot of ``radius`` (0: one pixel; 1: 3x3; 2: a 5x5 disc)."""
    d = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    keep = dy**2 + dx**2 <= radius * radius + radius
    return dy[keep], dx[keep]


def draw_landmarks(image: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """A copy of the RGB ``image`` with each row's dense landmarks (``x_i``, ``y_i`` in pixel-edge
    coordinates: pixel ``floor(x), floor(y)``) set to its face id's colour. A dot is one pixel for a face
    under 160 pixels wide, bigger for bigger faces; points off the picture or NaN are skipped."""
    return _paint_points(image, _dense_points(rows))


def _paint_points(image: np.ndarray, points: Points) -> np.ndarray:
    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    for fid, x, y in zip(*points, strict=True):
        fin = np.isfinite(x) & np.isfinite(y)
        if not fin.any():
            continue
        x, y = x[fin], y[fin]
        dy, dx = _dot_offsets(int(np.clip((x.max() - x.min()) // 160, 0, 2)))
        py = (np.floor(y).astype(np.int64)[:, None] + dy[None]).ravel()
        px = (np.floor(x).astype(np.int64)[:, None] + dx[None]).ravel()
        inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        out[py[inside], px[inside]] = ImageColor.getrgb(ID_COLOURS[int(fid) % len(ID_COLOURS)])
    return out


def draw_faces(
    image: np.ndarray, rows: pd.DataFrame | None, draw: Collection[str] | str | None = None
) -> np.ndarray:
    """Draw the rows of one frame on a copy of ``image``: the layers of ``draw`` (see
    :func:`check_draw`; None: box, id, expression, VA bars)."""
    return _draw(image, rows, check_draw(draw))


def _draw(
    image: np.ndarray, rows: pd.DataFrame | None, layers: frozenset[str], points: Points | None = None
) -> np.ndarray:
    """:func:`draw_faces` with checked ``layers``; ``points``: the rows' dense landmarks when read
    already (:func:`_points_by_frame`)."""
    if rows is None or not len(rows):
        return image
    if "landmarks" in layers:
        image = _paint_points(image, _dense_points(rows) if points is None else points)
    if "faces" not in layers:
        return image
    rows = rows[[c for c in _FACE_COLUMNS if c in rows.columns]]
    im = Image.fromarray(image)
    pen = ImageDraw.Draw(im)
    scale = max(1.0, min(im.size) / 480)
    font = _font(round(14 * scale))
    for _, r in rows.iterrows():
        fid = int(r["face_id"])
        col = ID_COLOURS[fid % len(ID_COLOURS)]
        x1, y1, x2, y2 = face_box(r[list(BOX_COLUMNS)], im.size)
        lw = max(2, round(2 * scale))
        pen.rectangle([x1, y1, x2, y2], outline=col, width=lw)
        expr = str(r["expression"])
        p = float(r[f"{expr}_p"]) if f"{expr}_p" in r.index else float("nan")
        label = f"#{fid} {expr} {p:.2f}"
        tb = pen.textbbox((0, 0), label, font=font)
        th, tw = tb[3] - tb[1], tb[2] - tb[0]
        lay = overlay_layout((x1, y1, x2, y2), im.size, (tw, th), scale)
        pen.rectangle(list(lay.label), fill=EXPR_COLOURS.get(expr, "#eeeeee"))
        pen.text((lay.label[0] + 4, lay.label[1] + 3 - tb[1]), label, fill=(0, 0, 0), font=font)
        for (name, colour), (bx, by, _, _) in zip(
            zip(VA_NAMES, ("#4caf50", "#ff9800"), strict=True), lay.bars, strict=True
        ):
            pen.text(
                (bx, by - tb[1]),
                f"{name[0].upper()} {float(r[name]):+.2f}",
                fill=(255, 255, 255),
                font=font,
                stroke_width=1,
                stroke_fill=(0, 0, 0),
            )
            _bar(pen, bx, by + th + 2, lay.bar_width, lay.bar_height, float(r[name]), colour)
    return np.asarray(im)


def annotate_image(
    source: str | os.PathLike | np.ndarray,
    table: pd.DataFrame,
    out: str | os.PathLike,
    overwrite: bool = False,
    draw: Collection[str] | str | None = None,
) -> Path:
    """Write ``out`` (format by suffix, e.g. .jpg or .png): the still ``source`` (a path, read as the
    pipeline reads it, EXIF orientation applied, or an RGB array) with its rows of ``table`` drawn
    (the layers of ``draw``, :func:`check_draw`; None: the face overlay)."""
    layers = check_draw_table(table, draw)
    out = Path(out)
    image = source if isinstance(source, np.ndarray) else read_image(Path(source))
    rows = table
    if "file" in table and not isinstance(source, np.ndarray):
        rows = table[table["file"] == str(source)]
    ok = rows[rows["success"] == 1] if "success" in rows else rows
    drawn = Image.fromarray(draw_faces(image, ok, layers))
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"{out}: unknown image suffix; use .jpg or .png")
    with atomic_path(out, overwrite=overwrite) as tmp:
        drawn.save(tmp, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out


def annotate_video(
    source: str | os.PathLike,
    table: pd.DataFrame,
    out: str | os.PathLike,
    overwrite: bool = False,
    codec: str | None = None,
    crf: int = 23,
    draw: Collection[str] | str | None = None,
) -> Path:
    """Write ``out`` (MP4): ``source`` upright, with the rows of ``table`` (this file's) drawn on every
    frame (the layers of ``draw``, :func:`check_draw`; None: the face overlay) and its first audio
    stream kept."""
    import av

    layers = check_draw_table(table, draw)
    source, out = Path(source), Path(out)
    mine = _file_rows(table, source, layers)
    rows = _rows_by_frame(mine)
    points = _points_by_frame(mine) if "landmarks" in layers else {}
    keys = np.array(sorted(rows), dtype=np.int64)
    try:
        with av.open(str(source)) as cin, atomic_path(out, overwrite=overwrite) as tmp:
            sin = cin.streams.video[0]
            sin.thread_type = "AUTO"
            ain = cin.streams.audio[0] if cin.streams.audio else None
            rate = sin.average_rate or Fraction(25)
            tb = sin.time_base or Fraction(1, round(float(rate)))
            width, height = sin.codec_context.width, sin.codec_context.height
            with av.open(str(source)) as c:  # its own container: cin is read from its first frame
                turned = quarter_turns(first_rotation(c)) % 2
            if turned:
                width, height = height, width
            with av.open(str(tmp), "w", format="mp4") as cout:
                sout = add_video_stream(cout, codec, rate, (width, height), crf)
                sout.codec_context.time_base = tb
                aout, transcode = _audio_stream(cout, ain)
                count = 0
                last_pts: int | None = None

                def put_video(fr: av.VideoFrame) -> None:
                    nonlocal count, last_pts
                    i = count
                    count += 1
                    j = np.searchsorted(keys, i, side="right") - 1  # latest analysed frame <= i
                    img = upright(fr.to_ndarray(format="rgb24"), frame_rotation(fr))
                    k = int(keys[j]) if j >= 0 else -1  # -1: before the first analysed frame (no rows)
                    img = _draw(img, rows.get(k), layers, points.get(k))
                    of = av.VideoFrame.from_ndarray(img, format="rgb24")
                    pts = fr.pts if fr.pts is not None else i
                    if last_pts is not None and pts <= last_pts:  # encoders need increasing timestamps
                        pts = last_pts + 1
                    of.pts, of.time_base, last_pts = pts, tb, pts
                    for pkt in sout.encode(of):
                        cout.mux(pkt)

                streams = [sin] if ain is None else [sin, ain]
                for packet in cin.demux(*streams):
                    if packet.stream.type == "video":
                        for fr in packet.decode():
                            if isinstance(fr, av.VideoFrame):  # always, on the video stream
                                put_video(fr)
                    elif packet.dts is not None:
                        _put_audio(cout, aout, transcode, packet)
                for pkt in sout.encode():
                    cout.mux(pkt)
                if transcode is not None:
                    _flush_audio(cout, aout, transcode)
    except av.error.FFmpegError as e:
        raise InputError(f"{source}: cannot write the annotated video {out} ({e})") from e
    return out


def annotate_sequence(
    folder: str | os.PathLike,
    table: pd.DataFrame,
    out: str | os.PathLike,
    fps: float | None = None,
    overwrite: bool = False,
    codec: str | None = None,
    crf: int = 23,
    draw: Collection[str] | str | None = None,
) -> Path:
    """Write ``out`` (MP4): the numbered frames of ``folder`` (a frame sequence, numbered as
    :class:`~mtaffect.predict.sources.FrameSequence` says) with this folder's rows of ``table`` drawn,
    played at ``fps`` (None or NaN: :data:`~mtaffect.predict.tracking.DEFAULT_RATE`, as tracking
    assumed). A gap in the numbering is a gap in time (the frame before it stays on screen); a frame of
    another size is resized to the first one's; unreadable frames are left out. ``draw``: the layers
    drawn (:func:`check_draw`; None: the face overlay)."""
    import av

    layers = check_draw_table(table, draw)

    from mtaffect.predict.sources import SequenceSource, expand_inputs
    from mtaffect.predict.tracking import rate_or_default

    folder, out = Path(folder), Path(out)
    seq = next((s for s in expand_inputs(folder, sequences=True) if Path(str(s)) == folder), None)
    if seq is None:
        raise InputError(f"{folder}: not a folder of numbered frames; nothing to annotate")
    mine = _file_rows(table, folder, layers)
    rows = _rows_by_frame(mine)
    points = _points_by_frame(mine) if "landmarks" in layers else {}
    keys = np.array(sorted(rows), dtype=np.int64)
    rate = Fraction(rate_or_default(float(fps) if fps is not None else math.nan)).limit_denominator(1001)
    source = SequenceSource(seq)
    width, height = source.info.width, source.info.height
    try:
        with atomic_path(out, overwrite=overwrite) as tmp, av.open(str(tmp), "w", format="mp4") as cout:
            sout = add_video_stream(cout, codec, rate, (width + width % 2, height + height % 2), crf)
            sout.codec_context.time_base = 1 / rate
            for fr in source:
                j = np.searchsorted(keys, fr.index, side="right") - 1  # latest analysed frame <= this one
                img = fr.image
                if img.shape[:2] != (height, width):
                    img = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))
                k = int(keys[j]) if j >= 0 else -1  # -1: before the first analysed frame (no rows)
                img = _draw(img, rows.get(k), layers, points.get(k))
                img = np.pad(img, ((0, height % 2), (0, width % 2), (0, 0)))  # yuv420p: even sides
                of = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                of.pts, of.time_base = fr.index, 1 / rate
                for pkt in sout.encode(of):
                    cout.mux(pkt)
            for pkt in sout.encode():
                cout.mux(pkt)
    except av.error.FFmpegError as e:
        raise InputError(f"{folder}: cannot write the annotated video {out} ({e})") from e
    return out


def _audio_stream(cout, ain):
    """(output audio stream, resampler or None): a copy of ``ain`` when MP4 takes its codec, else AAC."""
    if ain is None:
        return None, None
    if ain.codec_context.name in MP4_AUDIO_CODECS:
        return cout.add_stream_from_template(ain), None
    import av

    aout = cout.add_stream("aac", rate=ain.codec_context.sample_rate or 44100)
    return aout, av.AudioResampler(
        format="fltp", layout=aout.codec_context.layout, rate=aout.codec_context.sample_rate
    )


def _put_audio(cout, aout, resampler, packet) -> None:
    if resampler is None:
        packet.stream = aout
        cout.mux(packet)
        return
    for frame in packet.decode():
        frame.pts = None
        for f in resampler.resample(frame):
            for pkt in aout.encode(f):
                cout.mux(pkt)


def _flush_audio(cout, aout, resampler) -> None:
    for f in resampler.resample(None):
        for pkt in aout.encode(f):
            cout.mux(pkt)
    for pkt in aout.encode(None):
        cout.mux(pkt)
