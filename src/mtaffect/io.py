"""Safe file output: atomic writes that never overwrite a user's file unless asked.

Folders (formats, ownership, swaps, locks) are :mod:`mtaffect.persist`'s."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: The hidden temporary file :func:`atomic_path` writes beside its target (``.<target>.<mkstemp's 8
#: characters>.part``); a crash mid-write leaves it behind.
PART_FILE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.part$")


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


def current_umask() -> int:
    """The process's umask (read by setting and restoring it): the mode temporary files are given."""
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
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes owner-only files; outputs get the usual mode
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
