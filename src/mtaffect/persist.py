"""The persistence layer: one header, one ownership rule, one folder swap and one lock for every format.

Every file or folder mtaffect writes for later reading (a feature store, a checkpoint, an ensemble, an
export, a training run and its state, a pipeline, a predict job, a per-file job record, a
post-processing config) is one :class:`Format` of :data:`FORMATS`, and carries the same JSON header::

    {"format": "mtaffect-feature-store", "format_version": 1, "mtaffect_version": "0.1.0", ...}

written by :func:`header` and checked by :func:`check_header`, which names the file, refuses another
format and a newer version ("upgrade mtaffect"), and reads files written before the header was one
(``version`` instead of ``format_version``).

**The ownership rule.** A folder is *ours* when its marker file (``meta.json``, ``config.json``, ...)
holds a header of the expected format that validates, and everything else in it is a name that format
writes. Only such a folder is replaced (:func:`atomic_folder`) or deleted (:func:`remove_ours`), and
only when the user asked (``--overwrite``); anything else in the way (a user's folder that happens to
hold a ``meta.json``, a folder of ours with a user's file added) is refused even with ``--overwrite``,
naming what is there. An empty folder holds nothing to lose and is used as it is. An output path that
is a symbolic link is resolved: the link keeps pointing at the new folder; a dangling link is refused.

**The swap.** A new folder is built beside its target under a hidden name and renamed onto it in one
step; an old folder is first moved aside into a hidden folder of this call's own and deleted only after
the new one is in place, so at every moment the target is the complete old folder or the complete new
one (:func:`previous_dir` finds the old one when a crash fell between the two renames).

**The lock.** :class:`Lock` is an advisory ``flock`` on a file or folder. It belongs to the process that
took it: a forked child (a DataLoader worker) closes its inherited copy at once, so a killed parent's
lock is free as soon as the parent is gone, whatever its children are still doing.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mtaffect import __version__
from mtaffect.io import PART_FILE, OutputExistsError, atomic_open, current_umask

try:  # advisory locks are POSIX; without them only the "two live runs" guards are lost
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FormatError(ValueError):
    """A file is not the format expected, is damaged, or was written by a newer mtaffect."""


class NotOursError(OutputExistsError):
    """Something mtaffect did not write (or a user changed) is where an output goes: never replaced."""


@dataclass(frozen=True)
class Format:
    """One on-disk format: its header name and version, and for a folder format the marker file that
    holds the header and the names (glob patterns) the folder may hold."""

    name: str
    version: int
    what: str
    marker: str | None = None
    members: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return self.what


FEATURE_STORE: Final = Format(
    "mtaffect-feature-store",
    1,
    "feature store",
    "meta.json",
    ("meta.json", "images.txt", "failed.csv", "*.npy", ".mtaffect-extract"),
)
CHECKPOINT: Final = Format(
    "mtaffect-checkpoint", 1, "checkpoint", "config.json", ("config.json", "model.safetensors", "backbone")
)
ENSEMBLE: Final = Format(
    "mtaffect-ensemble", 1, "ensemble", "ensemble.json", ("ensemble.json", "members", "sources")
)
EXPORT: Final = Format(
    "mtaffect-export", 1, "export", "export.json", ("export.json", "*.onnx", "*.onnx.data")
)
RUN: Final = Format("mtaffect-run", 1, "training run", "run.json")
TRAIN_STATE: Final = Format(
    "mtaffect-train-state", 1, "training state", "state.json", ("state.json", "state.safetensors")
)
PIPELINE: Final = Format("mtaffect-pipeline", 1, "pipeline run", "pipeline.json")
#: version 2: frames of a numbered frame folder count from 0 (rows of version 1 jobs are not resumed)
PREDICT_JOB: Final = Format(
    "mtaffect-predict-job", 2, "unfinished predict table", "job.json", ("job.json", "rows.csv")
)
JOB_RECORD: Final = Format("mtaffect-predict-record", 1, "per-file job record")
POSTPROC: Final = Format("mtaffect-postproc", 1, "post-processing config")
CONVERTED: Final = Format(
    "mtaffect-converted-weights",
    1,
    "converted weights folder",
    "mtaffect.json",
    ("mtaffect.json", "model.safetensors", "config.json", "preprocessor_config.json"),
)
#: Every format mtaffect writes, by header name (docs/formats.md describes each).
FORMATS: Final[dict[str, Format]] = {
    f.name: f
    for f in (
        FEATURE_STORE,
        CHECKPOINT,
        ENSEMBLE,
        EXPORT,
        RUN,
        TRAIN_STATE,
        PIPELINE,
        PREDICT_JOB,
        JOB_RECORD,
        POSTPROC,
        CONVERTED,
    )
}


# ---- the header -------------------------------------------------------------------------------------


def header(fmt: Format, **fields: Any) -> dict[str, Any]:
    """The header every file of ``fmt`` starts with, followed by ``fields``."""
    return {"format": fmt.name, "format_version": fmt.version, "mtaffect_version": __version__, **fields}


def check_header(
    obj: Any, fmt: Format, where: str | os.PathLike, error: type[ValueError] = FormatError
) -> int:
    """Check that ``obj`` (read from ``where``) is a ``fmt`` this mtaffect reads; return its version.

    Raises ``error`` (a ValueError) naming ``where`` and what is wrong.
    """
    if not isinstance(obj, dict):
        raise error(f"{where}: not an mtaffect {fmt.what} (not a JSON object)")
    if obj.get("format") != fmt.name:
        raise error(
            f"{where}: not an mtaffect {fmt.what} (format {_short(obj.get('format'))}, expected {fmt.name!r})"
        )
    # files written before the one header carried "version"
    version = obj.get("format_version", obj.get("version"))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{where}: format_version must be a positive integer, got {_short(version)}")
    if version > fmt.version:
        raise error(
            f"{where}: {fmt.what} format version {version} is newer than this mtaffect "
            f"(reads up to {fmt.version}); upgrade mtaffect"
        )
    return version


def read_json(path: str | os.PathLike, what: str, error: type[ValueError] = FormatError) -> dict[str, Any]:
    """A JSON object from ``path``; ``error`` naming the file when it cannot be read or is no object."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"{p}: cannot read the {what} ({exc})") from exc
    if not isinstance(obj, dict):
        raise error(f"{p}: the {what} is not a JSON object")
    return obj


def read_header_file(
    path: str | os.PathLike, fmt: Format, error: type[ValueError] = FormatError
) -> dict[str, Any]:
    """The JSON object of a ``fmt`` file, its header checked."""
    obj = read_json(path, fmt.what, error)
    check_header(obj, fmt, path, error)
    return obj


def write_json(path: str | os.PathLike, obj: Mapping[str, Any], *, overwrite: bool = True) -> Path:
    """Write ``obj`` as JSON atomically and durably (fsync before the rename); the one JSON writer.

    ``overwrite=False`` refuses an existing file (a user's result); numpy scalars are written as numbers.
    """
    p = Path(path)
    with atomic_open(p, "w", overwrite=overwrite, encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, default=_plain)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return p


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the ownership rule -----------------------------------------------------------------------------


def folder_format(path: str | os.PathLike, formats: Sequence[Format]) -> Format | None:
    """The format of ``formats`` whose marker in the folder ``path`` holds a valid header, else None."""
    p = Path(path)
    for fmt in formats:
        marker = p / str(fmt.marker)
        if fmt.marker and marker.is_file() and not marker.is_symlink():
            try:
                check_header(read_json(marker, fmt.what), fmt, marker)
            except FormatError:
                continue
            return fmt
    return None


def foreign_entries(path: str | os.PathLike, fmt: Format) -> list[str]:
    """Names in the folder ``path`` that ``fmt`` never writes. The temporary file an interrupted atomic
    write of one of its names left behind (:data:`mtaffect.io.PART_FILE`) is ours too."""
    if fmt.members is None:
        return []

    def member(name: str) -> bool:
        part = PART_FILE.match(name)
        name = part["target"] if part else name
        return any(fnmatch.fnmatchcase(name, m) for m in fmt.members or ())

    return sorted(e.name for e in Path(path).iterdir() if not member(e.name))


def _listing(path: Path, limit: int = 5) -> str:
    try:
        names = sorted(e.name for e in path.iterdir())
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return shown or "nothing"


def resolve_output(path: str | os.PathLike) -> Path:
    """Where an output named ``path`` goes: a symbolic link is followed (the link keeps pointing at the
    new output); a dangling link is refused."""
    p = Path(path)
    if p.is_symlink():
        real = p.resolve()
        if not real.exists():
            raise NotOursError(f"{p} is a symbolic link to {real}, which does not exist; give a real folder")
        return real
    return p


def check_replaceable(path: str | os.PathLike, formats: Format | Sequence[Format], overwrite: bool) -> Path:
    """Check, before any work, that a folder output of ``formats`` may be written at ``path``; return
    the real path to write (a symbolic link resolved).

    Nothing there, or an empty folder: fine. A folder of ours (see the module docstring): only with
    ``overwrite``. Anything else: :class:`NotOursError`, even with ``overwrite``, naming what is there.
    """
    fmts = (formats,) if isinstance(formats, Format) else tuple(formats)
    kinds = " or ".join(f.what for f in fmts)
    target = resolve_output(path)
    if not target.exists():
        return target
    if not target.is_dir():
        raise NotOursError(f"{target} exists and is not a folder; give the path of a folder for the {kinds}")
    if not any(target.iterdir()):
        return target
    fmt = folder_format(target, fmts)
    if fmt is None:
        raise NotOursError(
            f"{target} is not a {kinds} written by mtaffect (it holds {_listing(target)}); refusing to "
            "replace it, even with --overwrite: move it away or choose another output"
        )
    foreign = foreign_entries(target, fmt)
    if foreign:
        raise NotOursError(
            f"{target} is a {fmt.what} but also holds {', '.join(foreign[:5])}, which mtaffect did not "
            "write; refusing to replace it, even with --overwrite: move those away first"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{target} is already a {fmt.what}; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    return target


def remove_ours(path: str | os.PathLike, formats: Format | Sequence[Format]) -> bool:
    """Delete the folder ``path`` if it is ours (see :func:`check_replaceable`); True if deleted.

    A symbolic link is removed, never followed; anything not ours raises :class:`NotOursError`.
    """
    p = Path(path)
    if p.is_symlink():
        p.unlink()
        return True
    if not p.exists():
        return False
    check_replaceable(p, formats, overwrite=True)
    shutil.rmtree(p)
    return True


@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike, formats: Format | Sequence[Format], overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (:func:`replace_dir`).

    What is at ``path`` is checked first (:func:`check_replaceable`, before any work): only a folder of
    ours is replaced, only with ``overwrite``, and only once the new one is complete.
    """
    target = check_replaceable(path, formats, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes owner-only folders
        check_replaceable(target, formats, overwrite)  # still ours after the work (a user may have acted)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` onto ``target`` (made beside it), replacing an old ``target``.

    The caller has checked the old folder is ours. It is first moved into a fresh hidden folder of this
    call's own (never a name a user's folder could have) and deleted only once the new one is in place.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def previous_dir(target: str | os.PathLike) -> Path | None:
    """The folder :func:`replace_dir` was swapping out of ``target`` when a crash left ``target`` missing
    (the newest such), or None."""
    target = Path(target)
    found = sorted(
        (p / target.name for p in target.parent.glob(f".{target.name}.*.old") if (p / target.name).is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


# ---- the lock ---------------------------------------------------------------------------------------

_held: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)
_held_guard = threading.Lock()


def _close_inherited() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


class LockBusy(OSError):
    """Another process holds the lock."""


class Lock:
    """An advisory lock (``flock``) on a file (created if missing) or a folder, held until
    :meth:`release` (or the end of a ``with`` block) or this process's end.

    ``supported`` is False on a file system without locks (e.g. NFS without a lock service) or on
    Windows: nothing is held, and callers say what goes unguarded.
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @property
    def supported(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(
        cls, path: str | os.PathLike, *, shared: bool = False, wait: float | None = 0.0, poll: float = 0.05
    ) -> Lock:
        """Take the lock on ``path``: waiting up to ``wait`` seconds (None: as long as it takes) for
        another holder; :class:`LockBusy` if it is still held then."""
        p = Path(path)
        fd = os.open(p, os.O_RDONLY) if p.is_dir() else os.open(p, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:  # pragma: no cover - Windows
            os.close(fd)
            return cls(p, None)
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait is None else fcntl.LOCK_NB)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)  # e.g. ENOLCK: this file system has no locks
                    return cls(p, None)
                if deadline is None or time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockBusy(errno.EAGAIN, "held by another process", str(p)) from None
            time.sleep(poll)
        with _held_guard:
            _held.add(fd)
        return cls(p, fd)

    @classmethod
    def try_acquire(cls, path: str | os.PathLike, *, shared: bool = False, wait: float = 0.0) -> Lock | None:
        """:meth:`acquire`, or None when another process holds the lock."""
        try:
            return cls.acquire(path, shared=shared, wait=wait)
        except LockBusy:
            return None

    @property
    def fd(self) -> int | None:
        return self._fd

    def release(self) -> None:
        with _held_guard:
            if self._fd is not None:
                _held.discard(self._fd)
                os.close(self._fd)  # closing the descriptor releases the lock
                self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "CHECKPOINT",
    "CONVERTED",
    "ENSEMBLE",
    "EXPORT",
    "FEATURE_STORE",
    "FORMATS",
    "JOB_RECORD",
    "PIPELINE",
    "POSTPROC",
    "PREDICT_JOB",
    "RUN",
    "TRAIN_STATE",
    "Format",
    "FormatError",
    "Lock",
    "LockBusy",
    "NotOursError",
    "atomic_folder",
    "check_header",
    "check_replaceable",
    "folder_format",
    "foreign_entries",
    "header",
    "previous_dir",
    "read_header_file",
    "read_json",
    "remove_ours",
    "replace_dir",
    "resolve_output",
    "write_json",
]
