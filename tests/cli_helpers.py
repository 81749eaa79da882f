"""Test helper: the ``mtaffect`` command line run in this process, as a user types it."""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from mtaffect.cli import app
from mtaffect.clikit import console, err_console


def invoke(*args) -> Result:
    """``mtaffect ARGS`` (each argument ``str()``-ed), whatever its exit: typer's result. The terminal is
    wide, so rich never wraps a message (a long temporary path would otherwise break inside a word)."""
    widths = console.width, err_console.width
    console.width = err_console.width = 2000
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        console.width, err_console.width = widths


def run(*args, code: int = 0) -> str:
    """``mtaffect ARGS``, which must exit with ``code``: its output (standard output and error)."""
    result = invoke(*args)
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    return result.output
