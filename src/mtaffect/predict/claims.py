"""Per-file ownership in an output folder that many ``predict`` processes share.

In per-file mode (:mod:`mtaffect.predict.archive`) every table has a *job record*, written by whoever
processes it, in ``OUT/.mtaffect-jobs/``::

    OUT/.mtaffect-jobs/
        clip.csv.json   {"format": "mtaffect-predict-record", "status": "running" | "done" | "failed",
                         "host", "pid", "started", "heartbeat", "finished", "signature", ...}
        clip.csv.lock   empty; held locked (``flock``) by the process running the file

Claiming a file is taking the lock of its lock file without waiting. The kernel (or the file server)
drops the lock when the holder dies, however it dies, so a record that says ``running`` but whose lock
is free belongs to a killed process: it is taken over, and the partial rows of the killed run resume
(:class:`mtaffect.predict.job.PartialTable`). A held lock means the file is being processed elsewhere:
it is skipped. Lock files are never removed (removing one while a process waits on it would let two
processes hold "the" lock of the same file).

Where locks do not reach other machines (an NFS mount with ``nolock``), a record that says ``running``
on another host is trusted while its heartbeat is younger than ``stale_after`` seconds: a thread of the
holder refreshes it every ``HEARTBEAT_S`` for as long as it holds the file (table, extras and all).
Such file systems are better served by ``--shard K/N``, whose shards never share a file.

A record says what happened and with which settings (``signature``): a later run skips a file that is
``done`` with the same signature (its table is there), retries one that ``failed`` before the run
started (a file that another process failed during this run is not retried: each file is processed once
a run), and redoes a file whose signature changed only with ``--overwrite`` (without it, the record of
the other settings is left as it is and the file is reported, not claimed).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mtaffect.persist import JOB_RECORD, Lock, header, read_header_file, write_json

RECORDS_DIR: Final[str] = ".mtaffect-jobs"
#: How often a running file's record is refreshed (seconds), and when a silent one on another host is
#: taken to be dead (only where locks do not reach other hosts; see the module docstring).
HEARTBEAT_S: Final[float] = 20.0
STALE_AFTER_S: Final[float] = 90.0
#: How long a held lock is tried again before the file is taken to be running elsewhere (a collect
#: probing the lock holds it for an instant).
LOCK_WAIT_S: Final[float] = 0.1
HOST: Final[str] = socket.gethostname()


def records_dir(out: str | os.PathLike) -> Path:
    """The hidden folder of job records in output folder ``out``."""
    return Path(out) / RECORDS_DIR


def read_record(path: Path) -> dict | None:
    """A job record, or None when missing, unreadable or not ours."""
    try:
        return read_header_file(path, JOB_RECORD)
    except ValueError:
        return None


def _write_record(path: Path, rec: dict) -> None:
    write_json(path, rec)


@dataclass(frozen=True)
class Skip:
    """A file this process does not run: ``why`` is "done" (same settings, table present), "running"
    (another process holds it), "failed" (another process failed it during this run) or "settings"
    (done with other settings, and replacing it was not asked for)."""

    why: str
    record: dict | None


class Claim:
    """This process's hold on one file: its record says ``running`` until :meth:`finish`, its heartbeat
    refreshed by a thread; the lock is held until :meth:`release` (or until the process dies)."""

    def __init__(self, lock: Lock, path: Path, record: dict, previous: dict | None) -> None:
        self._lock, self.path, self.record, self.previous = lock, path, record, previous
        self._write = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beating, name="mtaffect-heartbeat", daemon=True)
        self._beat.start()

    def _beating(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._write:
                if self._stop.is_set():
                    return
                self.record["heartbeat"] = time.time()
                with contextlib.suppress(OSError):  # a full disk now shows where it matters: at finish
                    _write_record(self.path, self.record)

    def finish(self, status: str, **fields) -> None:
        """Record the outcome ("done" or "failed") with what the run produced."""
        if status not in ("done", "failed"):
            raise ValueError(f"a finished file is 'done' or 'failed', not {status!r}")
        with self._write:
            self._stop.set()
            self.record.update(fields, status=status, finished=time.time(), heartbeat=time.time())
            _write_record(self.path, self.record)

    def release(self) -> None:
        """Stop the heartbeat and let go of the lock (a record still ``running`` then reads as a killed
        run: resumable)."""
        with self._write:
            self._stop.set()
        self._beat.join()
        self._lock.release()


class JobRecords:
    """The job records of one output folder (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, stale_after: float = STALE_AFTER_S) -> None:
        self.folder = records_dir(out)
        self.stale_after = float(stale_after)

    def record_path(self, table_name: str) -> Path:
        return self.folder / f"{table_name}.json"

    def read(self, table_name: str) -> dict | None:
        return read_record(self.record_path(table_name))

    def all(self) -> dict[str, dict]:
        """Every valid record in the folder, by table name."""
        if not self.folder.is_dir():
            return {}
        found = {}
        for p in sorted(self.folder.glob("*.json")):
            rec = read_record(p)
            if rec is not None and rec.get("table") == p.name[: -len(".json")]:
                found[rec["table"]] = rec
        return found

    def is_running(self, table_name: str) -> bool:
        """Whether a live process holds this file now (its lock is taken; where locks do not work, its
        record says running with a fresh heartbeat)."""
        lock = self.folder / f"{table_name}.lock"
        if not lock.exists():
            return False
        held = _lock(lock)
        if held is None:
            return True
        locked = held.supported
        held.release()
        if locked:
            return False
        rec = self.read(table_name) or {}
        fresh = time.time() - float(rec.get("heartbeat") or 0) < self.stale_after
        return rec.get("status") == "running" and fresh

    def claim(
        self,
        table_name: str,
        signature: dict,
        run_started: float,
        source: str,
        replace: bool = False,
        incomplete: Callable[[dict], bool] | None = None,
    ) -> Claim | Skip:
        """Take the file whose table is ``table_name``, or say why not (:class:`Skip`). ``replace``:
        a table done with other settings may be made again (``--overwrite``). ``incomplete(record)``:
        whether a file done with the same settings still needs work (outputs asked for since)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(self.folder / f"{table_name}.lock", LOCK_WAIT_S)
        if lock is None:
            return Skip("running", self.read(table_name))
        rec_path = self.record_path(table_name)
        prev = read_record(rec_path)
        try:
            why = self._why_skip(prev, signature, run_started, table_name, replace)
            if why == "done" and incomplete is not None and prev is not None and incomplete(prev):
                why = None
        except (TypeError, ValueError, AttributeError):  # a damaged record (edited by hand): not trusted
            prev, why = None, None
        except BaseException:
            lock.release()
            raise
        if why is not None:
            lock.release()
            return Skip(why, prev)
        now = time.time()
        record = {
            **header(JOB_RECORD),
            "table": table_name,
            "source": source,
            "path": os.path.realpath(source),
            "status": "running",
            "host": HOST,
            "pid": os.getpid(),
            "started": now,
            "heartbeat": now,
            "finished": None,
            "signature": signature,
            # the files earlier runs wrote for this stem stay listed as ours until this run says otherwise
            "outputs": list((prev or {}).get("outputs") or []),
        }
        try:
            _write_record(rec_path, record)
        except BaseException:
            lock.release()
            raise
        return Claim(lock, rec_path, record, prev)

    def _why_skip(
        self, prev: dict | None, signature: dict, run_started: float, table_name: str, replace: bool
    ) -> str | None:
        if prev is None:
            return None
        same = prev.get("signature") == signature
        status = prev.get("status")
        table = (self.folder.parent / table_name).is_file()
        if status == "done" and same and table:
            return "done"
        if status == "done" and table and not replace:
            return "settings"  # another run's table: its record is left alone
        if status == "failed" and same and float(prev.get("finished") or 0) >= run_started:
            return "failed"
        # the lock was free: only a process on a host our locks may not reach can still be alive
        remote = prev.get("host") != HOST or _locks_unsupported()
        silent = time.time() - float(prev.get("heartbeat") or 0)
        if status == "running" and remote and silent < self.stale_after:
            return "running"
        return None


_NO_LOCKS: list[bool] = []  # set once a file system refused locking


def _locks_unsupported() -> bool:
    return bool(_NO_LOCKS)


def _lock(path: Path, wait: float = 0.0) -> Lock | None:
    """The exclusive lock of one file's job (:class:`mtaffect.persist.Lock`, waiting up to ``wait``
    seconds: a probe holds it for an instant), or None when another process holds it."""
    lock = Lock.try_acquire(path, wait=wait)
    if lock is not None and not lock.supported:
        _NO_LOCKS.append(True)  # e.g. NFS without a lock service: records and heartbeats only
    return lock


def describe_holder(record: dict | None) -> str:
    """Who holds or held a file, for messages: ``host pid N since HH:MM:SS``."""
    if not record:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(float(record.get("started") or 0)))
    return f"{record.get('host', '?')} pid {record.get('pid', '?')} since {since}"


__all__ = ["RECORDS_DIR", "Claim", "JobRecords", "Skip", "describe_holder", "read_record", "records_dir"]
