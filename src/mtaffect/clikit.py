"""What every ``mtaffect`` command shares: consoles, the user-error wrapper, common options.

Each area keeps its commands beside its code (``train/cli.py``, ``post/cli.py``, ``predict/cli.py``)
and registers them on the one app in :mod:`mtaffect.cli`; this module keeps their behaviour identical.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from mtaffect.io import atomic_open

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable)

#: Errors that are the user's to fix: reported in one line, exit code 2.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]


def user_errors(fn: F) -> F:
    """Report expected errors (they name the file, line and what to do) as one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


def write_json(obj: dict, path: Path, overwrite: bool) -> None:
    """Write a JSON result atomically, refusing to replace a file unless ``overwrite``."""
    with atomic_open(path, "w", overwrite=overwrite) as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    console.print(f"wrote {path}")
