"""Safe file output: atomic writes that never overwrite a user's file unless asked; and the one check
that a path to read is a regular file (:func:`open_regular`: a FIFO never blocks a reader).

Folders (formats, ownership, swaps, locks) are :mod:`mtaffect.persist`'s."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: The hidden temporary file :func:`atomic_path` writes beside its target (``.<target>.<mkstemp's 8
#: characters>.part``); a crash mid-write leaves it behind.
PART_FILE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.part$")


class NotRegularFileError(OSError):
    """A path where a file is expected names a FIFO, socket or device: reading it could block forever.

    ``kind`` says what it is ("a FIFO (named pipe)"); the text reads ``PATH: <kind>, not a regular file``.
    """

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", os.fspath(path))
        self.kind = kind


def _file_kind(mode: int) -> str:
    """What a non-regular file is, for messages and failed.csv."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def open_regular(path: str | os.PathLike, what: str | None = None) -> BinaryIO:
    """``path`` opened for binary reading, only when it is a regular file: the one such check.

    Opened non-blocking and checked on the open descriptor (no check-then-open race), so a FIFO
    never blocks.

    Args:
        path: the file to read.
        what: the kind of file expected ("annotation file"), for the messages of a missing path or a
            folder; None: the operating system's messages.

    Returns:
        The open binary file (blocking reads, as usual).

    Raises:
        FileNotFoundError: nothing at ``path``.
        IsADirectoryError: ``path`` is a folder.
        NotRegularFileError: a FIFO, socket or device.
    """
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX: opening a FIFO never waits for a writer
    flags = os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if what is None:
            raise
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)}") from None
    except IsADirectoryError:  # Windows; POSIX opens a folder read-only and fstat tells below
        raise _folder_error(path, what) from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket (or a device without its driver) cannot be opened
            try:
                kind = _file_kind(os.stat(path).st_mode)
            except OSError:
                kind = "a special file"
            raise NotRegularFileError(path, kind) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _folder_error(path, what)
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, _file_kind(mode))
        if nonblock:
            os.set_blocking(fd, True)  # reads of a regular file as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _folder_error(path: str | os.PathLike, what: str | None) -> IsADirectoryError:
    if what is None:
        return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    return IsADirectoryError(f"{os.fspath(path)} is a folder; expected a {what}")


def read_regular(path: str | os.PathLike, what: str | None = None) -> bytes:
    """The bytes of a regular file.

    Args:
        path: the file to read.
        what: the kind of file expected, for messages (see :func:`open_regular`).

    Returns:
        Its whole content.

    Raises:
        OSError: as :func:`open_regular` (missing, a folder, a FIFO/socket/device) or a failed read.
    """
    with open_regular(path, what) as fh:
        return fh.read()


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
