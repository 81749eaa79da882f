"""Safe file output: atomic writes that never overwrite a user's file unless asked."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """Raised instead of silently overwriting an existing output."""


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path; refuse a folder always, and an existing file unless ``overwrite``."""
    p = Path(path)
    if p.is_dir():  # never replaced, even with overwrite: a file output does not take a folder's place
        raise IsADirectoryError(f"{p} is a folder; give the path of a file to write")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` in one step.

    A crash mid-write leaves the old file (or nothing) in place, never a half-written output.
    """
    target = check_writable(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", overwrite: bool = False, **kw) -> Iterator:
    """Open a file for writing atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite) as tmp, open(tmp, mode, **kw) as fh:
        yield fh


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` onto ``target`` (made beside it), replacing an old ``target``.

    The old folder is first moved into a fresh hidden folder of this call's own (never a name a user's
    folder could have) and deleted only once the new one is in place, so at every moment ``target`` is
    either the complete old folder or the complete new one (the old one then found by
    :func:`previous_dir` when a crash fell between the two renames).
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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (:func:`replace_dir`).

    An existing folder at ``path`` is replaced (only with ``overwrite``; otherwise
    :class:`OutputExistsError` before any work) once the new one is complete: a crash leaves the old
    folder, never a half-written one. Anything else at ``path`` (a file) is never replaced.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    if target.exists() and not target.is_dir():  # a folder output does not take a file's place
        raise NotADirectoryError(f"{target} exists and is not a folder; give the path of a folder to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes owner-only folders
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def error_message(exc: BaseException) -> str:
    """The one-line text of a user error: our messages as they are; an OS error as ``PATH: reason``.

    Python's own ``OSError`` text (``[Errno 30] Read-only file system: 'x'``) is turned into the path,
    the reason and a hint for the common cases (read-only or full disk, permissions).
    """
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror and exc.errno is not None:
        where = exc.filename
        hint = _OS_HINTS.get(exc.errno, "")
        text = f"{exc.strerror} (errno {exc.errno}){hint}"
        return f"{where}: {text}" if where is not None else text
    return str(exc)


_OS_HINTS = {
    errno.EROFS: ": the output location is read-only; write somewhere else",
    errno.ENOSPC: ": the disk is full; free space or write somewhere else",
    errno.EDQUOT: ": the disk quota is exhausted; free space or write somewhere else",
    errno.EACCES: ": permission denied; check the file's and folder's permissions",
    errno.EISDIR: ": a folder is where a file was expected; give a file path",
}
