"""``predict`` over an archive: one table per file, run by one or many processes into one output folder.

Per-file mode (CLI ``--per-file``, implied by ``--workers N`` and ``--shard K/N``) makes each file of
the inputs (a still, a video, a folder of numbered frames) a job of its own:

- **its table** ``OUT/<stem>.<fmt>`` is today's resumable job (:func:`mtaffect.predict.job.predict_to_file`:
  rows written as produced, resumed after a kill, the table atomic); with ``--plot``/``--video`` its
  timelines and annotated copy, with ``--report`` its page ``OUT/<stem>.html``;
- **its job record** in ``OUT/.mtaffect-jobs/`` (:mod:`mtaffect.predict.claims`) says who runs it (host,
  pid, heartbeat) and how it ended; its lock makes sure one process runs it at a time, so any number of
  processes, on one machine or on many sharing a file system, can run the same command into the same
  folder: each file is processed once, and one a killed process held is taken over and resumed.

Stems are the INPUT's name (see :func:`mtaffect.predict.extras.output_names`) for a file given alone,
``<INPUT name>_<path inside the folder>_<extension>`` for a folder's files (:func:`folder_stems`: files
added to the archive later never rename the others, unless their names differ only by case), and
``<list name>_<file stem>`` for a list's entries (parent folders added where stems collide); then made
unique over the whole plan (regardless of case) and kept clear of the names the combined outputs use
(:data:`RESERVED_STEMS`); a file named twice (a folder and a file inside it) is planned once. The plan
is computed from the whole of the inputs by every process (all shards alike), so a file has the same
stem whichever process runs it.

``--shard K/N`` keeps the files whose :func:`shard_index` (a SHA-256 of the path as expanded from the
command line) is K-1: the same split on every machine that sees the same command line, whatever the
mount point, with no coordination. Files run longest first (frames expected from the container, see
:func:`expected_frames`), so one long video does not end a parallel run alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from mtaffect.io import error_message
from mtaffect.predict.claims import Claim, JobRecords, Skip, describe_holder
from mtaffect.predict.extras import face_tracks, file_stems, model_card, output_names, safe_name, write_extras
from mtaffect.predict.job import describe_input, info_from_dict, info_to_dict, predict_to_file
from mtaffect.predict.pipeline import FileResult, Predictor, source_warnings
from mtaffect.predict.sources import (
    LIST_EXTENSIONS,
    FrameSequence,
    InputError,
    SourceInfo,
    classify,
    expand_inputs,
    media_kind,
)

#: Stems a file's outputs never take: the combined outputs of the folder (:mod:`mtaffect.predict.collect`).
RESERVED_STEMS: Final[frozenset[str]] = frozenset({"combined", "combined_summary", "report"})


@dataclass(frozen=True)
class Unit:
    """One file of the inputs and the stem of its outputs."""

    item: Path | FrameSequence
    stem: str
    arg: str  # the INPUT it came from, as given

    @property
    def source(self) -> str:
        return str(self.item)

    def table_name(self, fmt: str) -> str:
        return f"{self.stem}.{fmt}"


@dataclass
class Plan:
    """Every file of the inputs in command-line order (all shards), the INPUTs that gave none, and how
    many files were named more than once (run once)."""

    units: list[Unit]
    errors: list[str] = field(default_factory=list)
    repeated: int = 0

    def shard(self, k: int, n: int) -> list[Unit]:
        """The units of shard ``k`` of ``n`` (1-based ``k``)."""
        return [u for u in self.units if shard_index(u.source, n) == k - 1]


def plan_units(inputs: Sequence[str], *, recursive: bool = False, sequences: bool = True) -> Plan:
    """Expand ``inputs`` into files with unique, stable output stems (see the module docstring).

    Streams, cameras and arrays are refused: per-file mode runs files. An INPUT that gives no file (an
    empty folder, an unreadable list) is an error of its own; the others are planned.
    """
    units: list[Unit] = []
    errors: list[str] = []
    for arg, name in zip(inputs, output_names(inputs), strict=True):
        item = classify(arg)
        if not isinstance(item, Path):
            raise ValueError(
                f"{arg}: per-file mode (--per-file, --workers, --shard) runs files and folders; run streams "
                "and cameras without it"
            )
        try:
            files = expand_inputs([arg], recursive=recursive, sequences=sequences)
        except InputError as e:
            errors.append(str(e))
            continue
        if item.is_dir():
            stems = folder_stems(name, item, files)
        else:  # a file (its INPUT's name), or a list's entries
            listed = item.suffix.lower() in LIST_EXTENSIONS and item.is_file()
            stems = file_stems(name, [str(f) for f in files], prefix_one=listed)
        units += [Unit(f, safe_name(s), arg) for f, s in zip(files, stems, strict=True)]
    plan = Plan([], errors)
    taken: set[str] = set(RESERVED_STEMS)  # compared without case: Clip.csv is clip.csv on macOS
    files_seen: set[str] = set()
    for u in units:
        real = os.path.realpath(u.source)
        if real in files_seen:  # named twice (a folder and a file inside it): run once
            plan.repeated += 1
            continue
        files_seen.add(real)
        stem, n = u.stem, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{u.stem}-{n}"
        taken.add(stem.lower())
        plan.units.append(Unit(u.item, stem, u.arg))
    return plan


def folder_stems(name: str, folder: Path, files: Sequence[Path | FrameSequence]) -> list[str]:
    """Stems of a folder's files that no file added later can change: ``<name>_<path inside the folder,
    parts and extension joined by _>`` (``interviews_a_clip_mp4`` for ``interviews/a/clip.mp4``: with
    the extension, as ``clip.mov`` may join it); a folder of frames by its path alone."""
    stems = []
    for f in files:
        r = Path(os.path.relpath(str(f), folder))
        if isinstance(f, FrameSequence):  # a folder of frames: its path ("." when it is the folder)
            parts = [p for p in r.parts if p != "."]
        else:
            parts = [*r.parent.parts, r.stem, r.suffix.lstrip(".")]
        stems.append("_".join([name, *[p for p in parts if p]]))
    return stems


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N (Slurm: ``--shard $SLURM_ARRAY_TASK_ID/N`` with ``--array=1-N``)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard takes K/N (shard K of N, from 1), e.g. 2/8; got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text}: K must be between 1 and N (shards are numbered from 1)")
    return k, n


def shard_index(source: str, n: int) -> int:
    """Which of ``n`` shards (0-based) a file belongs to: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big") % n


def expected_frames(unit: Unit, every: int = 1) -> int:
    """Frames this file will analyse, as far as known without decoding: a still 1, a sequence its
    frames, a video the count its container declares (or duration x rate); 0 when unreadable."""
    if isinstance(unit.item, FrameSequence):
        return -(-len(unit.item.paths) // every)
    if media_kind(unit.item) == "image":
        return 1
    from mtaffect.predict.sources import VideoSource

    try:
        return VideoSource(unit.item, every).info.expected_analysed or 1
    except (InputError, OSError):
        return 0


def longest_first(units: Sequence[Unit], frames: Sequence[int]) -> list[int]:
    """Positions of ``units`` by expected frames, longest first (ties in plan order)."""
    return sorted(range(len(units)), key=lambda i: (-frames[i], i))


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Torch (or onnxruntime) threads per worker, so that workers x threads <= cores: each worker's
    share of the cores less one for its video decoding thread, and at least 1."""
    cores = cores or os.cpu_count() or 1
    share = cores // max(1, workers)
    return max(1, share - 1) if share >= 2 else 1


# ---- one file ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitOptions:
    """How each file is run and written (the same in every worker; picklable)."""

    out: Path
    fmt: str = "csv"
    overwrite: bool = False
    resume: bool = True
    fps: float | None = None
    plot: bool = False
    video: bool = False
    report: bool = False
    run_started: float = field(default_factory=time.time)
    report_settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # :func:`model_identity` of --model
    draw: tuple[str, ...] | None = None  # layers of the annotated copies (--draw; None: the faces)


def model_identity(model: str | os.PathLike | None) -> dict:
    """Which model a run used, beyond its recipe settings: the name as given and, for a checkpoint,
    export or run folder, its files' sizes and modification times (a retrained checkpoint of the same
    config is another model: a rerun must not take its tables for done)."""
    if model is None or str(model) == "default":
        return {"model": "default"}
    p = Path(model)
    if not p.exists():
        return {"model": str(model)}  # e.g. emotiefflib:<name>
    files = sorted(q for q in ([p] if p.is_file() else p.rglob("*")) if q.is_file())
    stats = [(str(q.relative_to(p) if p.is_dir() else q.name), q.stat()) for q in files]
    return {"model": str(model), "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]}


@dataclass
class Outcome:
    """What happened to one file in this process: "done", "failed" or "skipped" (``why``: "done" earlier
    with the same settings, "running" elsewhere, or "failed" elsewhere during this run)."""

    source: str
    stem: str
    status: str
    why: str = ""
    frames: int = 0
    faces: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.nan


def unit_signature(predictor: Predictor, unit: Unit, opts: UnitOptions) -> dict:
    """What makes a file's table what it is: the model and every setting that changes rows (detection,
    tracking, smoothing, ``--post``), the file (size, mtime), the frame rate given to sequences, the
    format; as JSON reads it back."""
    import json

    from mtaffect import __version__

    sig = {
        "version": __version__,
        "settings": predictor.settings(),
        "model": opts.model,
        "smoothing": [predictor.smoothing, predictor.smoothing_seconds],
        "post": None if predictor.post is None else repr(predictor.post),
        "input": describe_input(unit.item),
        "fps": opts.fps,
        "format": opts.fmt,
    }
    return json.loads(json.dumps(sig, default=str))


_FACE_PNG = re.compile(r"(?P<stem>.+)_face\d+\.png")


def _timelines(out: Path) -> dict[str, list[str]]:
    """The timeline PNGs (``<stem>_face<id>.png``) in ``out`` by stem, from one listing of the folder."""
    found: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(out) as entries:
        for e in entries:
            if m := _FACE_PNG.fullmatch(e.name):
                found.setdefault(m["stem"], []).append(e.name)
    return found


def _extras_present(
    out: Path, stem: str, plot: bool, video: bool, report: bool, pngs: Sequence[str] | None = None
) -> list[Path]:
    """Files the extras of ``stem`` would write that exist already. ``pngs``: the timeline names to look
    for (default: the folder listed, which costs a scan of it: callers over many files pass them)."""
    found = [out / f"{stem}.html"] if report else []
    if plot or video:
        found += [out / f"{stem}_annotated.jpg", out / f"{stem}_annotated.mp4"]
    if plot:
        found += [out / n for n in (_timelines(out).get(stem, []) if pngs is None else pngs)]
    return [p for p in found if p.exists()]


def read_records(units: Sequence[Unit], opts: UnitOptions) -> dict[str, dict | None]:
    """Each unit's job record by table name, read once for the checks before a run
    (:func:`check_in_the_way`, :func:`file_state`)."""
    records = JobRecords(opts.out)
    return {u.table_name(opts.fmt): records.read(u.table_name(opts.fmt)) for u in units}


def check_in_the_way(
    predictor: Predictor,
    units: Sequence[Unit],
    opts: UnitOptions,
    records: Mapping[str, dict | None] | None = None,
) -> None:
    """Refuse, before any work, outputs that a run would have to replace: a table that no record of ours
    made, or one made with other settings or from a changed file, and timelines, annotated copies or
    pages that its record does not list as its own (``--overwrite`` replaces them). A table made with
    the same settings is kept and its file skipped; outputs of a file that a run with these settings is
    writing, or was interrupted writing, are its own. ``records``: :func:`read_records` of ``units``
    (None: read here)."""
    if opts.overwrite:
        return
    records = read_records(units, opts) if records is None else records
    timelines = _timelines(opts.out) if opts.plot else {}  # one listing for every file
    blocked = []
    for u in units:
        table = opts.out / u.table_name(opts.fmt)
        if table.is_dir():
            raise IsADirectoryError(f"{table} is a folder where the table of {u.source} goes; move it away")
        rec = records.get(table.name) or {}
        same = rec.get("signature") == unit_signature(predictor, u, opts)
        if table.exists() and not same:
            why = "made with other settings, another model or from a changed file"
            blocked.append(f"{table} ({why if rec else 'not written by a per-file run'})")
        if same and rec.get("status") != "done":
            continue  # running now, or interrupted: what it wrote is its own
        ours = set(rec.get("outputs") or [])
        pngs = timelines.get(u.stem, [])
        extras = _extras_present(opts.out, u.stem, opts.plot, opts.video, opts.report, pngs)
        blocked += [f"{p} (not written by a per-file run)" for p in extras if p.name not in ours]
    if blocked:
        more = f" and {len(blocked) - 3} more" if len(blocked) > 3 else ""
        raise FileExistsError(
            f"{len(blocked)} output(s) would be replaced: {'; '.join(blocked[:3])}{more}; pass --overwrite "
            "to replace them, or choose another --out"
        )


def _missing_extras(rec: dict, opts: UnitOptions) -> bool:
    """Whether a done file's record lacks extras this run asks for (``--plot``/``--video``/``--report``
    added on a rerun): they are made from its table, not by running it again."""
    had = rec.get("extras") or {}
    return any(
        want and not had.get(k)
        for k, want in (("plot", opts.plot), ("video", opts.video), ("report", opts.report))
    )


def file_state(
    predictor: Predictor, unit: Unit, opts: UnitOptions, records: Mapping[str, dict | None] | None = None
) -> str | None:
    """What a rerun has left to do for ``unit``: None (run it), "extras" (its table is done with these
    settings; only extras asked for now are missing) or "done" (nothing: no worker needs to start).
    ``records``: :func:`read_records` of the run's units (None: this unit's is read here)."""
    name = unit.table_name(opts.fmt)
    rec = JobRecords(opts.out).read(name) if records is None else records.get(name)
    if (
        rec is None
        or rec.get("status") != "done"
        or not (opts.out / name).is_file()
        or rec.get("signature") != unit_signature(predictor, unit, opts)
    ):
        return None
    return "extras" if _missing_extras(rec, opts) else "done"


def run_unit(
    predictor: Predictor,
    unit: Unit,
    opts: UnitOptions,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Claim ``unit``, run it into its table (resuming a killed run's rows), write its extras and record
    how it ended. A file another process holds, or finished with the same settings, is skipped; one
    finished without the extras asked for now gets them from its table.

    KeyboardInterrupt leaves the partial rows and a ``running`` record whose lock is free: the next run
    resumes the file.
    """
    table = opts.out / unit.table_name(opts.fmt)
    signature = unit_signature(predictor, unit, opts)
    claim = JobRecords(opts.out).claim(
        table.name,
        signature,
        opts.run_started,
        unit.source,
        replace=opts.overwrite,
        incomplete=lambda rec: _missing_extras(rec, opts),
    )
    if isinstance(claim, Skip):
        return _skipped(unit, claim, table)
    try:
        return _run_claimed(predictor, unit, opts, claim, table, signature, progress)
    finally:
        claim.release()


def _skipped(unit: Unit, skip: Skip, table: Path) -> Outcome:
    holder = (skip.record or {}).get("path")
    if holder and holder != os.path.realpath(unit.source):  # two commands into one folder, one stem
        return Outcome(
            unit.source,
            unit.stem,
            "failed",
            error=(
                f"{unit.source}: its table name {table.name} is taken by {holder} (another command into the "
                "same --out); give this one another --out"
            ),
        )
    if skip.why == "settings":
        return Outcome(
            unit.source,
            unit.stem,
            "failed",
            error=(
                f"{table} was made with other settings by another run (its record says so); pass --overwrite "
                "to replace it"
            ),
        )
    note = f"running in {describe_holder(skip.record)}" if skip.why == "running" else ""
    return Outcome(unit.source, unit.stem, "skipped", skip.why, notes=[note] if note else [])


def _run_claimed(
    predictor: Predictor,
    unit: Unit,
    opts: UnitOptions,
    claim: Claim,
    table: Path,
    signature: dict,
    progress: Callable[[int], None] | None,
) -> Outcome:
    prev = claim.previous or {}
    same = prev.get("signature") == signature
    # what this run may replace without --overwrite: the table when an earlier run with these settings
    # made it; the extras earlier runs listed, and those a run with these settings was interrupted writing
    ours = set(prev.get("outputs") or []) - {table.name}
    if same:
        ours.add(table.name)
        if prev.get("status") != "done":
            ours |= {p.name for p in _extras_present(opts.out, unit.stem, True, True, True)}
    if same and prev.get("status") == "done" and table.is_file():  # claimed for missing extras only
        return _extras_only(predictor, unit, opts, claim, table, prev, ours)
    outcome = Outcome(unit.source, unit.stem, "failed")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (result,) = predict_to_file(
                predictor,
                [unit.item],
                table,
                opts.fmt,
                overwrite=opts.overwrite or table.name in ours,
                resume=opts.resume,
                fps=opts.fps,
                progress=progress,
                log=outcome.notes.append,
                identity=opts.model,
            )
            outcome.seconds = result.seconds
            if result.ok:
                written = _write_extras(predictor, unit, opts, result, table, ours)
        outcome.warnings = [str(w.message) for w in caught] + source_warnings(result.info)
    except Exception as e:  # a table in the way, a full disk, a file that breaks a decoder: it fails alone
        outcome.error = f"{unit.source}: {_reason(e)}"
        claim.finish("failed", error=outcome.error, seconds=outcome.seconds, outputs=sorted(ours))
        return outcome
    if not result.ok:
        outcome.error = result.error
        claim.finish(
            "failed", error=result.error, seconds=result.seconds, kind=result.info.kind, outputs=sorted(ours)
        )
        return outcome
    outcome.status, outcome.outputs = "done", written
    outcome.frames, outcome.faces = result.analysed, face_tracks([result])
    claim.finish("done", **_done_fields(result, outcome, opts, ours, written, {}))
    return outcome


def _extras_only(
    predictor: Predictor, unit: Unit, opts: UnitOptions, claim: Claim, table: Path, prev: dict, ours: set
) -> Outcome:
    """A done file's extras asked for since, made from its table; whatever happens, it stays done."""
    from mtaffect.predict.outputs import read_table
    from mtaffect.predict.plots import face_ids

    restore = {k: v for k, v in prev.items() if k not in ("status", "finished", "heartbeat")}
    outcome = Outcome(unit.source, unit.stem, "failed", why="extras")
    pngs: list[str] = []  # the timelines this file can have: one per face id of its table
    before: set[str] = set()

    def present() -> set[str]:
        return {p.name for p in _extras_present(opts.out, unit.stem, True, True, True, pngs)}

    def keep_done(**fields) -> None:  # with what this attempt wrote listed as the file's own
        outputs = sorted(set(restore.get("outputs") or []) | (present() - before))
        claim.finish("done", **{**restore, "outputs": outputs, **fields})

    try:
        info = info_from_dict(prev["info"]) if prev.get("info") else SourceInfo(unit.source, "unknown")
        seconds, frames = float(prev.get("seconds") or 0), int(prev.get("frames") or 0)
        result = FileResult(info, read_table(table), seconds, frames)
        pngs = [f"{unit.stem}_face{fid}.png" for fid in face_ids(result.table, info.file)]
        before = present()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = _write_extras(predictor, unit, opts, result, table, ours)
        outcome.warnings = [str(w.message) for w in caught]
    except Exception as e:
        outcome.error = f"{unit.source}: its table is done, but not the outputs asked for: {_reason(e)}"
        keep_done(extras_error=outcome.error)
        return outcome
    except BaseException:  # interrupted: the table is done all the same
        keep_done()
        raise
    outcome.status, outcome.outputs = "done", written
    outcome.faces = face_tracks([result])
    claim.finish("done", **_done_fields(result, outcome, opts, ours, written, prev.get("extras") or {}))
    return outcome


def _write_extras(
    predictor: Predictor, unit: Unit, opts: UnitOptions, result: FileResult, table: Path, ours: set
) -> list[str]:
    """The file's timelines, annotated copy and page; every path written (the table first)."""
    report_inputs, written = write_extras(
        [result], unit.stem, table, opts.plot, opts.video, opts.report, opts.overwrite, ours, draw=opts.draw
    )
    if opts.report:
        from mtaffect.predict.report import write_report

        page = opts.out / f"{unit.stem}.html"
        write_report(
            page,
            report_inputs,
            model_card(predictor),
            opts.report_settings,
            opts.overwrite or page.name in ours,
        )
        written.append(str(page))
    return written


def _done_fields(
    result: FileResult, outcome: Outcome, opts: UnitOptions, ours: set, written: list[str], had: dict
) -> dict:
    """A done record's fields: what the file gave, and every output of this stem that is ours."""
    asked = {"plot": opts.plot, "video": opts.video, "report": opts.report}
    return {
        "frames": result.analysed,
        "faces": outcome.faces,
        "seconds": result.seconds,
        "kind": result.info.kind,
        "info": info_to_dict(result.info),
        "extras_error": None,
        "outputs": sorted(ours | {Path(p).name for p in written}),
        "extras": {k: bool(v or had.get(k)) for k, v in asked.items()},
        "report": f"{outcome.stem}.html" if opts.report or had.get("report") else None,
    }


def _reason(e: Exception) -> str:
    return error_message(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"


__all__ = [
    "RESERVED_STEMS",
    "Outcome",
    "Plan",
    "Unit",
    "UnitOptions",
    "check_in_the_way",
    "expected_frames",
    "file_state",
    "longest_first",
    "model_identity",
    "parse_shard",
    "plan_units",
    "read_records",
    "run_unit",
    "shard_index",
    "unit_signature",
    "worker_threads",
]
