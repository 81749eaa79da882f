"""What every ``mtaffect`` command shares: consoles, the user-error wrapper, common options.

Each area keeps its commands beside its code (``train/cli.py``, ``post/cli.py``, ``predict/cli.py``)
and registers them on the one app in :mod:`mtaffect.cli`; this module keeps their behaviour identical.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mtaffect.io import error_message
from mtaffect.persist import write_json

console = Console()
err_console = Console(stderr=True)
P = ParamSpec("P")
R = TypeVar("R")

#: Errors that are the user's to fix: reported in one line, exit code 2. ``OSError`` covers what the
#: machine refuses (read-only or full disk, permissions, a directory where a file was expected).
USER_ERRORS = (ValueError, KeyError, OSError)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let an hf:<model> backbone run the Python code its hub repository or folder ships "
        "(transformers' trust_remote_code). That code runs with your permissions: use it only for "
        "sources you trust. Never read from checkpoints or config files.",
    ),
]


def warn(msg: str) -> None:
    """Print one ``warning: ...`` line on stderr (the text is escaped: brackets in it are not markup)."""
    err_console.print(f"[bold yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Library warnings (``warnings.warn``) shown as one ``warning: ...`` line each, not Python's two."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        warn(str(message))

    before = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Report expected errors (they name the file, line and what to do) as one line and exit code 2.

    This is the one place that turns a user-fixable error or an OS error into ``error: ...``; commands
    raise, they do not print and exit themselves.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with _one_line_warnings():
                return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            # escaped: a message's own brackets ("[read as ...]", "['a', 'b']") are text, not markup
            err_console.print(
                f"[bold red]error:[/] {escape(error_message(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from exc

    return wrapper


def write_result(obj: dict, path: Path, overwrite: bool) -> None:
    """Write a command's JSON result (:func:`mtaffect.persist.write_json`: atomic, refusing to replace a
    file unless ``overwrite``) and say so."""
    write_json(path, obj, overwrite=overwrite)
    console.print(f"wrote {path}")
