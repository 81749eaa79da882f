"""Safe file output: atomic writes that never overwrite a user's file unless asked."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """Raised instead of silently overwriting an existing output."""


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path, refusing an existing file unless ``overwrite``."""
    p = Path(path)
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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes ``path``'s place.

    An existing folder is replaced only with ``overwrite``: it is renamed aside, the new one renamed
    in, the old one removed, so a crash leaves the old folder, the new one, or the old one under
    :func:`replaced_name` (which readers may fall back to), never a half-written folder.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = replaced_name(target)
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replaced_name(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_dir` keeps the previous folder while it swaps in the new one."""
    p = Path(path)
    return p.with_name(f".{p.name}.replaced")
