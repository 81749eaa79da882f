"""What a finished input gives besides its table: timeline PNGs, annotated stills and videos, report
entries, and the one line that says what was written.

Shared by ``mtaffect predict`` (one table per INPUT) and per-file mode (:mod:`mtaffect.predict.archive`,
run in worker processes too): nothing here prints.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from mtaffect.predict.pipeline import FileResult
from mtaffect.predict.report import ReportInput
from mtaffect.predict.sources import StreamInput, classify, media_kind

#: The stem of the one table that the still images named on a command line share.
STILLS_TABLE: Final[str] = "images"


@dataclass(frozen=True)
class TableInputs:
    """One table of a ``predict`` run: its stem and the INPUTs whose rows it holds.

    Attributes:
        name: the table's stem (``OUT/<name>.<format>``).
        inputs: the command-line INPUTs it holds (one, or the still images of :func:`input_tables`).
        stills: whether it is the shared table of still images (their outputs keep their own stems).
    """

    name: str
    inputs: tuple[str, ...]
    stills: bool = False

    @property
    def label(self) -> str:
        """How messages name it: the INPUT as given, or the number of stills."""
        return f"{len(self.inputs)} still images" if self.stills else self.inputs[0]


def _input_base(arg: str) -> str:
    try:
        item = classify(arg)
    except ValueError:
        item = Path(arg)
    if isinstance(item, StreamInput):
        parts = urlsplit(item.url)
        return item.name or Path(parts.path).stem or (parts.hostname or "stream")
    assert isinstance(item, Path)  # classify gives a str a Path or a StreamInput
    p = item
    return p.name if p.is_dir() else p.stem


def _distinct(bases: Sequence[str]) -> list[str]:
    """Safe stems, a repeated one numbered (clip, clip-2, ...)."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for base in map(safe_name, bases):
        n = seen.get(base, 0) + 1
        seen[base] = n
        names.append(base if n == 1 else f"{base}-{n}")
    return names


def output_names(inputs: Sequence[str]) -> list[str]:
    """A distinct file stem per INPUT (clip, clip-2, ...); URLs and cameras get a name of their own."""
    return _distinct([_input_base(arg) for arg in inputs])


def is_still(arg: str) -> bool:
    """Whether a command-line INPUT names one still image (a missing one too: it fails on its own)."""
    try:
        item = classify(arg)
    except ValueError:
        return False
    return isinstance(item, Path) and not item.is_dir() and media_kind(item) == "image"


def input_tables(inputs: Sequence[str]) -> list[TableInputs]:
    """The tables of a ``predict`` run, in the order of the INPUTs.

    Two or more still images on the command line (``photos/*.jpg``) share one table,
    ``OUT/images.<format>`` (one row per face, the ``file`` column says whose), placed where the first of
    them is; every other INPUT (a video, a folder, a list, a stream) has its own table, as a single still
    does. A table per still is per-file mode's (``--per-file``, :mod:`mtaffect.predict.archive`).

    Args:
        inputs: the command's INPUTs, as given.

    Returns:
        One :class:`TableInputs` per table, with distinct stems.
    """
    stills = [a for a in inputs if is_still(a)]
    shared = len(stills) > 1
    groups: list[tuple[str, tuple[str, ...], bool]] = []
    for arg in inputs:
        if shared and arg in stills:
            if arg == stills[0]:
                groups.append((STILLS_TABLE, tuple(stills), True))
            continue
        groups.append((_input_base(arg), (arg,), False))
    names = _distinct([base for base, _, _ in groups])
    return [TableInputs(n, args, s) for n, (_, args, s) in zip(names, groups, strict=True)]


def safe_name(text: str) -> str:
    """``text`` as a file stem: runs of anything but letters, digits, ``.``, ``-`` and ``_`` become ``_``."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "input"


def file_stems(name: str, files: Sequence[str], prefix_one: bool = False) -> list[str]:
    """Output stems of an INPUT's files: ``name`` alone for one file (unless ``prefix_one``), else
    ``name_<file stem>`` (``name`` empty: the file stems alone); where two files share a stem, their
    extension (``s1_mp4``, ``s1_avi``: same folder) or as many parent folders as tell them apart
    (``a_clip``, ``b_clip``: ``--recursive``)."""
    if len(files) == 1 and not prefix_one and name:
        return [name]
    paths = [Path(f) for f in files]
    in_folder = Counter((p.parent, p.stem) for p in paths)
    base = [p.stem + (p.suffix.replace(".", "_") if in_folder[p.parent, p.stem] > 1 else "") for p in paths]
    depth = [0] * len(paths)
    while True:
        stems = [
            "_".join((*p.parent.parts[len(p.parent.parts) - d :], b)) if d else b
            for p, b, d in zip(paths, base, depth, strict=True)
        ]
        twice = {s for s, n in Counter(stems).items() if n > 1}
        grew = False
        for i, s in enumerate(stems):
            if s in twice and depth[i] < len(paths[i].parent.parts):
                depth[i] += 1
                grew = True
        if not grew:
            return [f"{name}_{s}" if name else s for s in stems]


def model_card(predictor) -> dict:
    """The model table of the report: the engine's card and the AU thresholds in use."""
    card = predictor.engine.card()
    card["AU thresholds"] = ", ".join(f"{t:.2f}" for t in predictor.au_thresholds)
    return card


def face_tracks(results: Sequence[FileResult]) -> int:
    """Face tracks (distinct ids with at least one detected face) over ``results``' tables."""
    return sum(
        int(r.table.loc[r.table["success"] == 1].groupby(["file", "face_id"]).ngroups) for r in results
    )


def write_extras(
    good: Sequence[FileResult],
    name: str,
    table_path: Path,
    plot: bool,
    video: bool,
    report: bool,
    overwrite: bool,
    ours: Collection[str] = (),
    draw: Collection[str] | None = None,
) -> tuple[list[ReportInput], list[str]]:
    """Timelines, annotated stills/videos and report entries of an INPUT's successful results, written
    beside its table; returns the report entries and every path written (the table first). An existing
    file is replaced only with ``overwrite`` or when its name is in ``ours`` (an earlier run wrote it).
    ``draw``: what the annotated copies show (:func:`mtaffect.predict.annotate.check_draw`; None: the
    face overlay; with ``landmarks`` the tables need the dense landmark columns, else a ValueError
    before anything is written). ``name`` empty: each file's outputs are named by its own stem (the
    shared table of still images)."""
    out = table_path.parent
    if plot or video:
        from mtaffect.predict.annotate import check_draw, check_draw_table

        draw = check_draw(draw)
        for r in good:  # every annotated file's table checked before the first output is written
            if r.info.kind == "image" or (video and r.info.kind in ("video", "sequence")):
                check_draw_table(r.table, draw)

    def replace(path: Path) -> bool:
        return overwrite or path.name in ours

    written = [str(table_path)]
    report_inputs = []
    for r, stem in zip(good, file_stems(name, [r.info.file for r in good]), strict=True):
        outputs = [str(table_path)]
        pngs = {}
        if plot or report:
            from mtaffect.predict.plots import timeline_pngs, write_png

            pngs = timeline_pngs(r.table, r.info.file)
            if plot:
                for fid, data in pngs.items():
                    png = out / f"{stem}_face{fid}.png"
                    outputs.append(str(write_png(data, png, overwrite=replace(png))))
        if (plot or video) and r.info.kind == "image":
            from mtaffect.predict.annotate import annotate_image

            jpg = out / f"{stem}_annotated.jpg"
            p = annotate_image(r.info.file, r.table, jpg, overwrite=replace(jpg), draw=draw)
            outputs.append(str(p))
        if video and r.info.kind == "video":
            from mtaffect.predict.annotate import annotate_video

            mp4 = out / f"{stem}_annotated.mp4"
            p = annotate_video(r.info.file, r.table, mp4, overwrite=replace(mp4), draw=draw)
            outputs.append(str(p))
        if video and r.info.kind == "sequence":  # a folder of numbered frames: a video at --fps
            from mtaffect.predict.annotate import annotate_sequence

            mp4 = out / f"{stem}_annotated.mp4"
            p = annotate_sequence(
                r.info.file, r.table, mp4, fps=r.info.fps, overwrite=replace(mp4), draw=draw
            )
            outputs.append(str(p))
        written += outputs[1:]
        report_inputs.append(ReportInput(r.info, r.table, pngs, r.seconds, r.analysed, outputs))
    return report_inputs, written


def summary_line(arg: str, good: Sequence[FileResult], written: Sequence[str]) -> str:
    """``INPUT: N frames, K face track(s), R frames/s -> outputs`` (``arg``: how the INPUT is named)."""
    n_frames = sum(r.analysed for r in good)
    secs = sum(r.seconds for r in good)
    rate = f", {n_frames / secs:.1f} frames/s" if secs > 0 else ""
    return f"{arg}: {n_frames} frames, {face_tracks(good)} face track(s){rate} -> {', '.join(written)}"


__all__ = [
    "STILLS_TABLE",
    "TableInputs",
    "face_tracks",
    "file_stems",
    "input_tables",
    "is_still",
    "model_card",
    "output_names",
    "safe_name",
    "summary_line",
    "write_extras",
]
