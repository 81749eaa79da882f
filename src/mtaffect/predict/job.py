"""Long prediction jobs that survive being killed, and the output folder they write into.

A table job (:func:`predict_to_file`) writes each row as soon as it is final, into a hidden partial
folder beside its table; a rerun of the same job (same inputs, same settings) resumes after the last
completed frame; the table appears, atomically, only when every input is done, and the partial folder is
then removed. For the table ``OUT/clip.csv``::

    OUT/.clip.csv.mtaffect-partial/
        job.json    format marker, the job's signature, finished inputs, where the current one stands
        rows.csv    raw rows (before smoothing / post-processing), appended chunk by chunk

``job.json`` is replaced atomically at most every ``COMMIT_SECONDS`` and at the end of each input; it
records how many bytes of ``rows.csv`` are committed, so a half-written last line is cut on resume.
Smoothing and post-processing run on the whole table at the end (they need the future), so a resumed
job gives the table an uninterrupted one gives: the tracker carries on with the faces and ids of the
last completed frame (appearance is learnt again from there), and the detection schedule
(``detect_every``) continues where it stopped. Temporal checkpoints restart their windows at the resume
point. Ids that late re-identification merged (``Resume.aliases``) are saved with the progress and the
finished inputs, so rows written under a young track's id before the merge (even before an interruption)
get the merged id in the table; the re-identification gallery itself is not saved: a face that left
before the interruption and comes back after it gets a new id, and a shot cut exactly at the resume point
is not seen as one. Live streams and cameras cannot be resumed: a rerun starts them again.

:class:`OutputFolder` is what the CLI holds while it writes: the folder is checked before any work (an
existing file named as the folder, a folder that cannot be created), locked against a second
``mtaffect predict`` writing into it, and cleared of the hidden ``.<name>.XXXXXXXX.part`` files a killed
run left behind (only those: the temporary-file names :mod:`mtaffect.io` gives predict's outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from mtaffect.io import check_writable
from mtaffect.persist import (
    PREDICT_JOB,
    Lock,
    LockBusy,
    foreign_entries,
    header,
    read_json,
    write_json,
)
from mtaffect.predict.outputs import TableBuilder, empty_table, read_table, write_table
from mtaffect.predict.pipeline import FileResult, Predictor, Resume
from mtaffect.predict.sources import (
    ArrayInput,
    FrameSequence,
    InputError,
    SourceInfo,
    StreamInput,
    expand_inputs,
    input_name,
)
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS

PARTIAL_SUFFIX: Final[str] = ".mtaffect-partial"
JOB_FILE, ROWS_FILE = str(PREDICT_JOB.marker), "rows.csv"
COMMIT_SECONDS: Final[float] = 1.0
INPUT_COLUMN: Final[str] = "_input"  # rows.csv only: which input (by position) a row belongs to
#: Hidden temporary files of mtaffect.io.atomic_path (``.<target>.<8 chars of mkstemp>.part``) whose
#: target is a kind of file predict writes.
#: Per-file runs share a folder: a shared lock is tried this long before a run of the other kind is
#: taken to hold it; their ``.part`` files count as a killed run's after this long.
SHARED_LOCK_WAIT_S: Final[float] = 2.0
STALE_PART_AGE_S: Final[float] = 3600.0
STALE_PART = re.compile(r"^\.(?P<target>.+\.(?:csv|parquet|html|png|mp4))\.[a-z0-9_]{8}\.part$")


def partial_dir(target: Path) -> Path:
    """The hidden folder where the rows of ``target`` accumulate."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def describe_input(item) -> dict:
    """What identifies an input in a job's signature (a changed file is a different job)."""
    if isinstance(item, FrameSequence):
        return {"sequence": str(item.folder), "frames": len(item.paths), "last": str(item.paths[-1].name)}
    if isinstance(item, StreamInput):
        return {"stream": item.url, "format": item.av_format}
    if isinstance(item, np.ndarray | ArrayInput):
        a = item if isinstance(item, np.ndarray) else item.array
        a = np.ascontiguousarray(a)
        return {"array": input_name(item), "shape": list(a.shape), "crc32": zlib.crc32(a.data)}
    p = Path(item)
    try:
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(p)}


def info_to_dict(info: SourceInfo) -> dict:
    """A SourceInfo as JSON-ready data (job files and job records)."""
    return dataclasses.asdict(info)


def info_from_dict(d: dict) -> SourceInfo:
    """The SourceInfo :func:`info_to_dict` wrote (unknown keys ignored)."""
    fields = {f.name for f in dataclasses.fields(SourceInfo)}
    d = {k: v for k, v in d.items() if k in fields}
    d["unreadable"] = [tuple(x) for x in d.get("unreadable", [])]
    return SourceInfo(**d)


def _resume_dict(r: Resume) -> dict:
    return {
        "after": int(r.after),
        "steps": int(r.steps),
        "next_id": int(r.next_id),
        "boxes": np.asarray(r.boxes, np.float64).tolist(),
        "ids": np.asarray(r.ids, np.int64).tolist(),
        "aliases": {str(k): int(v) for k, v in r.aliases.items()},
    }


def _resume_from(d: dict) -> Resume:
    return Resume(
        int(d["after"]),
        int(d["steps"]),
        int(d["next_id"]),
        np.asarray(d["boxes"], np.float32).reshape(-1, 4),
        np.asarray(d["ids"], np.int64),
        {int(k): int(v) for k, v in d.get("aliases", {}).items()},
    )


class PartialTable:
    """The partial folder of one table job: rows appended as produced, progress committed atomically.

    An existing partial folder with the same signature is resumed (unless ``resume=False``); one with
    another signature is discarded (it is ours: its ``job.json`` says so); a folder of that name that is
    not ours is never touched: that is an error.
    """

    def __init__(
        self,
        target: Path,
        signature: dict,
        resume: bool = True,
        log: Callable[[str], None] | None = None,
        thresholds: np.ndarray | None = None,
    ) -> None:
        self.target, self.folder = target, partial_dir(target)
        self.thresholds = np.full(NUM_AUS, DEFAULT_AU_THRESHOLD) if thresholds is None else thresholds
        self.signature = json.loads(json.dumps(signature, default=str))  # as it reads back from job.json
        self.log = log or (lambda _msg: None)
        self.state = {
            **header(PREDICT_JOB),
            "signature": self.signature,
            "done": {},
            "current": None,
            "rows_bytes": 0,
        }
        old = self._load_existing()
        if old is not None and resume and old["signature"] == self.signature:
            self.state = old
            self._truncate_rows(old["rows_bytes"])
        else:
            if old is not None:
                why = "--no-resume" if not resume else "its inputs or settings differ"
                self.log(f"discarding the unfinished rows of an earlier run of {target.name} ({why})")
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            self._rows_path.write_bytes(b"")
            self._commit()
        self._fh = open(self._rows_path, "ab")  # noqa: SIM115 - held open while the job appends
        self._bytes = self._fh.tell()  # rows.csv bytes that go with state["current"]
        self._pending = TableBuilder()
        self._pending_point: tuple[int, Resume, SourceInfo, float] | None = None
        self._last_commit = time.monotonic()

    @property
    def _rows_path(self) -> Path:
        return self.folder / ROWS_FILE

    def _load_existing(self) -> dict | None:
        if not self.folder.exists():
            return None
        state: dict = {}
        ours = self.folder.is_dir() and not self.folder.is_symlink()
        try:
            state = read_json(self.folder / JOB_FILE, PREDICT_JOB.what) if ours else {}
        except ValueError:
            ours = False
        if not ours or state.get("format") != PREDICT_JOB.name or foreign_entries(self.folder, PREDICT_JOB):
            raise FileExistsError(
                f"{self.folder} exists but is not an mtaffect partial table (no {JOB_FILE} of ours, or files "
                "of someone else); move it away: it is left untouched"
            )
        if state.get("format_version") != PREDICT_JOB.version:
            return {**state, "signature": None}  # another version's rows: resumable by nobody, discarded
        return state

    def _truncate_rows(self, committed: int) -> None:
        size = self._rows_path.stat().st_size if self._rows_path.exists() else -1
        if size < committed:  # rows lost (e.g. power failure before the data reached the disk): restart
            self.log(f"the unfinished rows of {self.target.name} are damaged; starting again")
            self.state.update(done={}, current=None, rows_bytes=0)
            self._rows_path.write_bytes(b"")
            self._commit()
            return
        with open(self._rows_path, "r+b") as fh:
            fh.truncate(committed)

    # ---- progress --------------------------------------------------------------------------------------

    def finished(self, index: int) -> dict | None:
        """The record of input ``index`` when a previous run finished it."""
        return self.state["done"].get(str(index))

    def resume_point(self, index: int, live: bool) -> tuple[Resume | None, dict | None]:
        """Where input ``index`` stands (None: from the start) and its saved record. A live stream cannot
        be resumed: its rows so far are dropped and it starts again."""
        cur = self.state["current"]
        if cur is None or cur["index"] != index:
            return None, None
        if live:
            self._fh.truncate(cur["start_bytes"])
            self._fh.seek(0, os.SEEK_END)
            self._bytes = self._fh.tell()
            self.state["current"] = None
            return None, None
        return _resume_from(cur["resume"]), cur

    def append(
        self, index: int, rows: TableBuilder, resume: Resume, info: SourceInfo, seconds: float
    ) -> None:
        """Final rows of input ``index`` and the point they reach; written out (and committed) at most
        every ``COMMIT_SECONDS`` (a DataFrame and a CSV write cost more than a chunk of frames)."""
        self._pending.extend(rows)
        self._pending_point = (index, resume, info, seconds)
        if time.monotonic() - self._last_commit >= COMMIT_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows and commit the point they reach, together: an interruption between
        the two leaves the rows uncommitted (they are cut on resume and computed again)."""
        if self._pending_point is None:
            return
        index, resume, info, seconds = self._pending_point
        cur = self.state["current"]
        if cur is None or cur["index"] != index:
            cur = {"index": index, "start_bytes": self._bytes}
        self._fh.flush()
        self._fh.truncate(self._bytes)  # whatever an interrupted write left after the committed rows
        if len(self._pending):
            table = self._pending.build(self.thresholds)
            table.insert(0, INPUT_COLUMN, index)
            header = self._bytes == 0
            self._fh.write(table.to_csv(index=False, header=header, float_format="%.9g").encode("utf-8"))
        cur = {**cur, "resume": _resume_dict(resume), "info": info_to_dict(info), "seconds": seconds}
        self.state["current"], self._bytes = cur, self._fh.tell()
        self._pending, self._pending_point = TableBuilder(), None
        self._commit()

    def finish(
        self,
        index: int,
        info: SourceInfo,
        seconds: float,
        analysed: int,
        error: str | None,
        aliases: dict[int, int] | None = None,
    ) -> None:
        """Input ``index`` is done (or failed): recorded at once, with the face ids late
        re-identification merged (applied to its rows when the table is built)."""
        self.flush()
        self.state["done"][str(index)] = {
            "info": info_to_dict(info),
            "seconds": seconds,
            "analysed": analysed,
            "error": error,
            "aliases": {str(k): int(v) for k, v in (aliases or {}).items()},
        }
        self.state["current"] = None
        self._bytes = self._fh.tell()
        self._commit()

    def _commit(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.flush()
            self.state["rows_bytes"] = self._bytes
        write_json(self.folder / JOB_FILE, self.state)
        self._last_commit = time.monotonic()

    # ---- the end ---------------------------------------------------------------------------------------

    def rows(self) -> pd.DataFrame:
        """Every committed row (with the input column), once each input is finished (:meth:`finish`
        committed it)."""
        if self.state["rows_bytes"] == 0:
            t = empty_table()
            t.insert(0, INPUT_COLUMN, pd.Series(dtype="int64"))
            return t
        return read_table(self._rows_path)

    def close(self) -> None:
        """Interrupted: keep what is final (the pending rows go out with their point)."""
        with contextlib.suppress(OSError):
            if self._pending_point is not None:
                self.flush()  # commits the rows with their point
            else:
                self._commit()  # what changed since the last commit (a live stream's rows dropped)
        self._fh.close()

    def remove(self) -> None:
        """The table is written: the partial folder goes."""
        self._fh.close()
        shutil.rmtree(self.folder)


def predict_to_file(
    predictor: Predictor,
    inputs,
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    overwrite: bool = False,
    resume: bool = True,
    fps: float | None = None,
    recursive: bool = False,
    sequences: bool = True,
    channels: str = "rgb",
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[SourceInfo], None] | None = None,
    log: Callable[[str], None] | None = None,
    identity: dict | None = None,
) -> list[FileResult]:
    """Predict ``inputs`` into one table at ``path`` as a resumable job; one FileResult per input.

    Rows are written as they are produced; after a crash or a kill, the same call resumes. The table is
    written (atomically) when every input is done, unless every input failed. An existing table is
    refused before any work unless ``overwrite``. ``identity``: what else names the model (e.g. its
    files' sizes and times, :func:`mtaffect.predict.archive.model_identity`): rows of a retrained
    checkpoint of the same config are not resumed as this one's.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".") or "csv"
    check_writable(path, overwrite)
    items = expand_inputs(inputs, recursive=recursive, sequences=sequences)
    signature = {
        "settings": predictor.settings(),
        "inputs": [describe_input(i) for i in items],
        "fps": fps,
        "channels": channels,
        **({"identity": identity} if identity else {}),
    }
    part = PartialTable(path, signature, resume, log, predictor.au_thresholds)
    try:
        for index, item in enumerate(items):
            if part.finished(index) is None:
                _run_input(predictor, part, index, item, fps, channels, progress, on_start, log)
        results = _results(predictor, part, items)
    except BaseException:
        part.close()
        raise
    good = [r for r in results if r.ok]
    if not good:
        part.remove()
        return results
    tables = [r.table for r in good if len(r.table)]
    write_table(pd.concat(tables, ignore_index=True) if tables else empty_table(), path, fmt, overwrite)
    part.remove()
    return results


def _run_input(
    predictor: Predictor,
    part: PartialTable,
    index: int,
    item,
    fps: float | None,
    channels: str,
    progress: Callable[[int], None] | None,
    on_start: Callable[[SourceInfo], None] | None,
    log: Callable[[str], None] | None,
) -> None:
    """Run one input into the partial table, resuming it when a previous run got part of the way."""
    t0 = time.perf_counter()
    try:
        source = predictor.open(item, fps=fps, channels=channels)
    except InputError as e:
        part.finish(index, SourceInfo(input_name(item), "unknown"), 0.0, 0, str(e))
        return
    start, record = part.resume_point(index, live=source.info.kind == "stream")
    before = float(record.get("seconds", 0.0)) if record else 0.0
    if start is not None and log is not None:
        log(f"resuming {source.info.file} after frame {start.after}")
    if record and "info" in record:  # frames a sequence could not read before the interruption
        source.info.unreadable[:0] = [tuple(x) for x in record["info"].get("unreadable", [])]
    if on_start is not None:
        on_start(source.info)
    analysed = start.steps if start is not None else 0
    aliases = start.aliases if start is not None else {}
    try:
        for batch in _interruptible(predictor.stream_source(source, progress, start), source.info):
            analysed, aliases = batch.resume.steps, batch.resume.aliases
            part.append(index, batch.rows, batch.resume, source.info, before + time.perf_counter() - t0)
    except InputError as e:
        part.finish(index, source.info, before + time.perf_counter() - t0, analysed, str(e), aliases)
        return
    part.finish(index, source.info, before + time.perf_counter() - t0, analysed, None, aliases)


def _interruptible(batches: Iterator, info: SourceInfo) -> Iterator:
    """A live stream or camera ends cleanly at Ctrl-C (its rows are kept); a file is interrupted."""
    try:
        yield from batches
    except KeyboardInterrupt:
        if info.kind != "stream":
            raise
        # stopping a live stream is its normal end: the rows so far are its table


def _results(predictor: Predictor, part: PartialTable, items: list) -> list[FileResult]:
    """Each input's final table from the committed rows (smoothing/post-processing applied now)."""
    rows = part.rows()
    by_input = dict(iter(rows.groupby(INPUT_COLUMN, sort=False))) if len(rows) else {}
    out = []
    for index, _ in enumerate(items):
        rec = part.finished(index)
        assert rec is not None  # every input was run to its end (or its error) before this
        info = info_from_dict(rec["info"])
        if rec["error"] is not None:
            out.append(FileResult(info, empty_table(), rec["seconds"], 0, rec["error"]))
            continue
        table = by_input.get(index)
        table = empty_table() if table is None else table.drop(columns=INPUT_COLUMN).reset_index(drop=True)
        aliases = {int(k): int(v) for k, v in rec.get("aliases", {}).items()}
        table = predictor.finish_table(table, info, aliases)
        out.append(FileResult(info, table, rec["seconds"], rec["analysed"]))
    return out


class OutputFolder:
    """The folder a ``predict`` run writes into, held for the run (a context manager).

    Entering checks it before any work (an existing file of that name, or a folder that cannot be
    created, is a clear error), locks it, and removes the hidden ``.part`` files of killed runs
    (:data:`STALE_PART`); nothing else in the folder is touched.

    A run of one table per INPUT takes the lock exclusively: a second ``mtaffect predict`` into the same
    folder is refused, not interleaved. A per-file run (``shared=True``) takes it shared: any number of
    per-file runs share the folder (each file is claimed on its own, :mod:`mtaffect.predict.claims`),
    while a run of the other kind is refused; there, only ``.part`` files untouched for an hour are
    taken for a killed run's.
    """

    def __init__(
        self, path: str | os.PathLike, log: Callable[[str], None] | None = None, shared: bool = False
    ) -> None:
        self.path = Path(path)
        self.log = log or (lambda _msg: None)
        self.shared = shared
        self._lock_held: Lock | None = None
        self.removed: list[Path] = []

    def __enter__(self) -> OutputFolder:
        p = self.path
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"--out {p} is a file; give a folder for the outputs (it is created)")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {p}: cannot create the output folder ({e.strerror or e})") from e
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"--out {p}: the output folder is not writable")
        self._lock()
        self.removed = self._clean_stale_parts()
        if self.removed:
            self.log(f"removed {len(self.removed)} temporary file(s) an interrupted run left in {p}")
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_held is not None:
            self._lock_held.release()
            self._lock_held = None

    def _lock(self) -> None:
        """Lock the folder: exclusively, or shared in per-file mode (see the class docstring)."""
        wait = SHARED_LOCK_WAIT_S if self.shared else 0.0
        try:
            self._lock_held = Lock.acquire(self.path, shared=self.shared, wait=wait, poll=0.1)
        except LockBusy:
            raise ValueError(
                f"--out {self.path}: another mtaffect predict is writing into this folder; wait for it to "
                "finish or choose another --out (per-file runs, --per-file/--workers/--shard, share a "
                "folder with each other only)"
            ) from None
        if not self._lock_held.supported:
            self.log(f"cannot lock {self.path}; a second run into it would not be noticed")

    def _clean_stale_parts(self) -> list[Path]:
        """The hidden ``.part`` files of killed runs; in a folder per-file runs share, only those
        untouched for ``STALE_PART_AGE_S`` (another live run may be writing the others)."""
        removed = []
        now = time.time()
        for entry in self.path.iterdir():
            if STALE_PART.match(entry.name) and entry.is_file() and not entry.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    if self.shared and now - entry.stat().st_mtime < STALE_PART_AGE_S:
                        continue
                    entry.unlink()
                    removed.append(entry)
        return removed


__all__ = ["OutputFolder", "PartialTable", "info_from_dict", "info_to_dict", "partial_dir", "predict_to_file"]
