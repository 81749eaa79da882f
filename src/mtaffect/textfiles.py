"""Reading the text files people hand us: bytes to lines or YAML, with errors that name FILE[:LINE].

One place for what every parser of a user's text file needs:

- :func:`read_text`: UTF-8 (a BOM is dropped); a binary file (a NUL byte) or a non-UTF-8 byte is an
  error naming the file and the line, never a ``UnicodeDecodeError``;
- :func:`split_lines`: LF, CRLF and old-Mac CR-only line ends are all line ends;
- :func:`read_yaml`: ``yaml.safe_load`` (plain data, never Python objects) with the same errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, AnyStr

from mtaffect.io import read_regular


class TextFileError(ValueError):
    """A file that is not readable text (or YAML); the message names the file and, when known, the line."""


def read_text(path: str | os.PathLike, what: str, *, error: type[ValueError] = TextFileError) -> str:
    """The file's text (UTF-8, BOM dropped). ``what`` names the expected kind of file in messages.

    Raises ``error`` (a ValueError subclass) for a binary file or invalid UTF-8, FileNotFoundError when
    there is no such file and IsADirectoryError for a folder.
    """
    p = Path(path)
    data = read_regular(p, what)
    nul = data.find(b"\0")
    if nul >= 0:
        line = data[:nul].count(b"\n") + 1
        raise error(f"{p}:{line}: a binary file (NUL byte at offset {nul}), not text; expected a {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        bad = data[exc.start : exc.start + 4]
        raise error(
            f"{p}:{line}: not UTF-8 text (bytes {bad!r} at offset {exc.start}); expected a {what}"
        ) from None


def normalise_newlines(text: AnyStr) -> AnyStr:
    """CRLF and CR-only line ends (old Mac files) as LF, in text or bytes."""
    cr, crlf, lf = ("\r", "\r\n", "\n") if isinstance(text, str) else (b"\r", b"\r\n", b"\n")
    if cr not in text:
        return text
    return text.replace(crlf, lf).replace(cr, lf)


def split_lines(text: str) -> list[str]:
    """Lines without their line ends (LF, CRLF or CR); a final line end adds no empty line."""
    lines = normalise_newlines(text).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_yaml(path: str | os.PathLike, what: str, *, error: type[ValueError] = TextFileError) -> Any:
    """``yaml.safe_load`` of a file: plain data only (no tags that build Python objects)."""
    import yaml

    p = Path(path)
    text = read_text(p, what, error=error)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise error(f"{where}: not valid YAML ({exc.problem}); expected a {what}") from None
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML ({' '.join(str(exc).split())}); expected a {what}") from None


__all__ = ["TextFileError", "normalise_newlines", "read_text", "read_yaml", "split_lines"]
