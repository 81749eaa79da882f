"""Challenge test lists and submissions: read the list, write the predictions file, check it line by line.

A submission has the header ``image,valence,arousal,expression,aus`` and then, for every line of the
test list and in its order (repeats repeated), ``name,V,A,expression_index,AU1,...,AU26`` with VA in
[-1, 1], the expression an integer 0..7 and each AU 0 or 1.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mtaffect.data.predictions import PredictionTable
from mtaffect.data.units import unsafe_name_reason
from mtaffect.io import atomic_open, check_writable, open_regular
from mtaffect.schema import (
    AU_NAMES,
    AU_OPENFACE_NAMES,
    DEFAULT_AU_THRESHOLD,
    NUM_AUS,
    NUM_EXPR,
    NUM_FIELDS,
    OFFICIAL_HEADER,
    TEST_LIST_NAMES,
)
from mtaffect.textfiles import read_text, split_lines

#: ``<video>/<frame number>[.ext]``: what a test-list entry looks like (a header line does not).
_IMAGE_RE = re.compile(r"^[^\s,]+/[0-9]+(\.[A-Za-z0-9]+)?$")
_AU_INDEX = {**{n: i for i, n in enumerate(AU_NAMES)}, **{n: i for i, n in enumerate(AU_OPENFACE_NAMES)}}


class SubmissionError(ValueError):
    """A test list, submission or threshold file that cannot be used."""


#: The two kinds of image-list file (what :func:`list_kind` returns).
ANNOTATIONS = "annotation file"
TEST_LIST = "test list"
_KINDS_HINT = (
    f"an annotation file (the header {OFFICIAL_HEADER!r}, then rows of {NUM_FIELDS} comma-separated "
    "fields) or a test list (one '<video>/<frame>.jpg' per line)"
)
_HEAD_BYTES = 1 << 16


def _read_text(path: Path, what: str) -> str:
    return read_text(path, what, error=SubmissionError)


def _lines(text: str) -> list[str]:
    """Lines without line endings (LF, CRLF or CR), trailing blank lines dropped."""
    lines = split_lines(text)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _is_image_line(fields: list[str]) -> bool:
    """A test-list line: one image name, optionally followed by an empty field (ABAW7's trailing comma)."""
    return len(fields) <= 2 and bool(_IMAGE_RE.match(fields[0])) and (len(fields) == 1 or not fields[1])


def find_test_list(root: str | os.PathLike) -> Path | None:
    """The official test list in a dataset root (ABAW7 ``MTL.txt``, then ABAW4's name), or None."""
    for name in TEST_LIST_NAMES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    return None


def list_kind(path: str | os.PathLike) -> str:
    """:data:`ANNOTATIONS` or :data:`TEST_LIST`, decided from the file's first (header) line.

    A first line of 16 fields (the long header, or a data row) means annotations; one field (a header
    such as ``image``, or an image name with its optional trailing comma) a test list. The official
    header ``image,valence,arousal,expression,aus`` may head either, so then (and for any other header)
    the majority of the next 20 lines decides: one malformed line does not change the verdict.
    An empty or binary file is an error that says what was expected.
    """
    p = Path(path)
    with open_regular(p, "image list") as fh:
        head = fh.read(_HEAD_BYTES)
    if b"\0" in head:
        raise SubmissionError(f"{p}: a binary file, not text; expected {_KINDS_HINT}")
    lines = [ln for ln in split_lines(head.decode("utf-8-sig", errors="replace")) if ln.strip()]
    if not lines:
        raise SubmissionError(f"{p}: the file is empty; expected {_KINDS_HINT}")
    fields = [f.strip() for f in lines[0].split(",")]
    if len(fields) == NUM_FIELDS:
        return ANNOTATIONS
    if len(fields) == 1 or _is_image_line(fields):
        return TEST_LIST
    data = lines[1:21]
    rows = sum(ln.count(",") == NUM_FIELDS - 1 for ln in data)
    names = sum(_is_image_line([f.strip() for f in ln.split(",")]) for ln in data)
    return TEST_LIST if names > rows else ANNOTATIONS


def read_image_names(path: str | os.PathLike) -> list[str]:
    """Image names, in file order, of an annotation file or a test list (whichever ``path`` is)."""
    from mtaffect.data.annotations import AnnotationError, read_annotations

    if list_kind(path) == ANNOTATIONS:
        try:
            names = [str(n) for n in read_annotations(path, keep_duplicates=True).images]
        except AnnotationError as exc:  # say why the file was read as annotations
            raise AnnotationError(
                exc.path, exc.line, f"{exc.what} [read as an annotation file, from its first line]", exc.got
            ) from None
        if not names:
            raise SubmissionError(f"{path}: the annotation file has no data rows after its header line")
        return names
    return read_test_list(path)


def read_test_list(path: str | os.PathLike) -> list[str]:
    """Image names of a test list, one per line, in order, repeats kept.

    An optional header (a first line that is not an image name) is skipped; anything after the first
    comma of a line is ignored (ABAW7 lines end with a trailing comma). Blank lines inside are an error.

    Args:
        path: the challenge's test list file.

    Returns:
        The image names, in file order.

    Raises:
        SubmissionError: an empty file, a blank line inside, or a line that is not an image name.
    """
    p = Path(path)
    lines = _lines(_read_text(p, "test list"))
    if not lines:
        raise SubmissionError(f"{p}: the file is empty; expected a test list (one image name per line)")
    names: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        name = line.split(",", 1)[0].strip()
        if lineno == 1 and not _IMAGE_RE.match(name):
            continue  # header
        if not name:
            raise SubmissionError(f"{p}:{lineno}: blank line inside the test list; every line names an image")
        if not _IMAGE_RE.match(name):
            raise SubmissionError(
                f"{p}:{lineno}: {name!r} is not an image name like 'video1/00001.jpg'; "
                "a test list holds one <video>/<frame>.jpg per line"
            )
        unsafe = unsafe_name_reason(name)
        if unsafe is not None:
            raise SubmissionError(
                f"{p}:{lineno}: image name {name!r} {unsafe}; names are relative to the dataset's image "
                "folder and may not leave it"
            )
        names.append(name)
    if not names:
        raise SubmissionError(f"{p}: the test list names no images (only a header line)")
    return names


def _as_thresholds(au_thresholds: Sequence[float] | np.ndarray | None) -> np.ndarray:
    if au_thresholds is None:
        return np.full(NUM_AUS, DEFAULT_AU_THRESHOLD, dtype=np.float64)
    thr = np.asarray(au_thresholds, dtype=np.float64)
    if thr.shape != (NUM_AUS,):
        raise SubmissionError(
            f"au_thresholds needs {NUM_AUS} values (order {list(AU_NAMES)}), got {thr.shape}"
        )
    if not (np.isfinite(thr) & (thr >= 0) & (thr <= 1)).all():
        raise SubmissionError(f"au_thresholds must lie in [0, 1], got {thr.tolist()}")
    return thr


def write_submission(
    pred: PredictionTable,
    test_list: Sequence[str],
    out: str | os.PathLike,
    *,
    au_thresholds: Sequence[float] | np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the challenge file: one line per test-list entry, in order, hard labels from probabilities.

    VA is clipped to [-1, 1]; the expression is the most probable class; AU k is 1 iff its probability
    is >= ``au_thresholds[k]`` (default :data:`~mtaffect.schema.DEFAULT_AU_THRESHOLD`).

    Args:
        pred: predictions covering every image of ``test_list``.
        test_list: the image names the file must list, in order (:func:`read_test_list`).
        out: the file to write (atomically).
        au_thresholds: 12 per-AU thresholds; None: the default for each.
        overwrite: replace an existing file.

    Returns:
        The path written (it passes :func:`validate_submission`).
    """
    names = list(test_list)
    if not names:
        raise SubmissionError("the test list is empty: nothing to write")
    thr = _as_thresholds(au_thresholds)
    target = check_writable(out, overwrite)  # fail before aligning a large table
    aligned = pred.align_to(names)
    table = pd.DataFrame(
        {
            "image": names,
            "valence": np.clip(aligned.valence, -1.0, 1.0),
            "arousal": np.clip(aligned.arousal, -1.0, 1.0),
            "expression": aligned.expr_labels,
        }
    )
    aus = (aligned.au_probs >= thr).astype(np.int64)
    for j, au in enumerate(AU_NAMES):
        table[au] = aus[:, j]
    with atomic_open(target, "w", overwrite=overwrite, newline="", encoding="utf-8") as fh:
        fh.write(OFFICIAL_HEADER + "\n")
        table.to_csv(fh, header=False, index=False, lineterminator="\n")
    return target


def _field_problems(fields: list[str], lineno: int, expected: str) -> list[str]:
    """What is wrong with one 16-field submission line."""
    out = []
    name = fields[0].strip()
    if name != expected:
        out.append(f"line {lineno}: expected image {expected!r}, found {name!r}")
    for k, label in ((1, "valence"), (2, "arousal")):
        raw = fields[k].strip()
        try:
            x = float(raw)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and -1.0 <= x <= 1.0):
            out.append(f"line {lineno}: {label} must be a number in [-1, 1], found {raw!r}")
    raw = fields[3].strip()
    if not (raw.isascii() and raw.isdigit() and int(raw) < NUM_EXPR):
        out.append(f"line {lineno}: expression must be an integer 0..{NUM_EXPR - 1}, found {raw!r}")
    for k, au in enumerate(AU_NAMES, start=4):
        raw = fields[k].strip()
        if raw not in ("0", "1"):
            out.append(f"line {lineno}: {au} must be 0 or 1, found {raw!r}")
    return out


def validate_submission(
    path: str | os.PathLike, test_list: Sequence[str], *, max_problems: int = 20
) -> list[str]:
    """Problems of a submission against its test list, each naming its line; an empty list means valid.

    Checks the header, the line count, each line's image (order included) and the value ranges. At most
    ``max_problems`` are listed, followed by a count of the rest. A missing or unreadable file is
    reported as a problem rather than raised, so callers can print the list either way.

    Args:
        path: the submission file.
        test_list: the image names it must list, in order.
        max_problems: how many problems to list before summarising the rest.

    Returns:
        The problems as messages naming their line; empty when the file is valid.
    """
    p = Path(path)
    expected = list(test_list)
    try:
        lines = _lines(_read_text(p, "submission"))
    except (FileNotFoundError, SubmissionError) as exc:
        return [str(exc)]
    if not lines:
        return [f"{p}: the file is empty; expected the header {OFFICIAL_HEADER!r} and {len(expected)} lines"]
    problems: list[str] = []
    header = lines[0].strip()
    start = 1
    if header.replace(" ", "") != OFFICIAL_HEADER:
        first = header.split(",", 1)[0].strip()
        if _IMAGE_RE.match(first) or (expected and first == expected[0]):
            problems.append(f"line 1: the header {OFFICIAL_HEADER!r} is missing (found an image line)")
            start = 0
        else:
            problems.append(f"line 1: expected the header {OFFICIAL_HEADER!r}, found {header!r}")
    data = lines[start:]
    if len(data) != len(expected):
        problems.append(
            f"expected {len(expected)} prediction lines after the header (one per test-list line), "
            f"found {len(data)}"
        )
    for k, (line, name) in enumerate(zip(data, expected, strict=False)):
        lineno = start + k + 1
        fields = line.split(",")
        if len(fields) != NUM_FIELDS:
            what = "blank line" if not line.strip() else f"found {len(fields)}"
            problems.append(f"line {lineno}: expected {NUM_FIELDS} comma-separated fields, {what}")
            continue
        problems.extend(_field_problems(fields, lineno, name))
    if len(problems) > max_problems:
        rest = len(problems) - max_problems
        problems = [*problems[:max_problems], f"... and {rest} more problem(s)"]
    return problems


def thresholds_from_json(path_or_obj: str | os.PathLike | Mapping | Sequence[float]) -> np.ndarray:
    """Per-AU decision thresholds (official AU order) from JSON or an already loaded object.

    Accepts ``{"AU1": 0.4, ...}`` (missing AUs keep the default; ``AU01`` spellings work too; a
    ``{"au_thresholds": {...}}`` wrapper is unwrapped) or a list of 12 numbers. Unknown names are an error.
    """
    where = "thresholds"
    obj: object = path_or_obj
    if isinstance(path_or_obj, (str, os.PathLike)):
        p = Path(path_or_obj)
        where = str(p)
        text = _read_text(p, "threshold file")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SubmissionError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(obj, Mapping) and set(obj) == {"au_thresholds"}:
        obj = obj["au_thresholds"]
    thr = np.full(NUM_AUS, DEFAULT_AU_THRESHOLD, dtype=np.float64)
    if isinstance(obj, Mapping):
        unknown = [k for k in obj if k not in _AU_INDEX]
        if unknown:
            raise SubmissionError(f"{where}: unknown AU name(s) {unknown}; expected some of {list(AU_NAMES)}")
        items = [(_AU_INDEX[k], k, v) for k, v in obj.items()]
    elif isinstance(obj, (Sequence, np.ndarray)) and not isinstance(obj, (str, bytes)):
        values = list(obj)
        if len(values) != NUM_AUS:
            raise SubmissionError(
                f"{where}: a threshold list needs {NUM_AUS} values (order {list(AU_NAMES)}), "
                f"got {len(values)}"
            )
        items = [(i, AU_NAMES[i], v) for i, v in enumerate(values)]
    else:
        raise SubmissionError(
            f"{where}: expected a mapping AU name -> threshold or a list of {NUM_AUS} numbers"
        )
    for i, name, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise SubmissionError(f"{where}: threshold of {name} must be a number in [0, 1], got {v!r}")
        if not (math.isfinite(float(v)) and 0.0 <= float(v) <= 1.0):
            raise SubmissionError(f"{where}: threshold of {name} must lie in [0, 1], got {v!r}")
        thr[i] = float(v)
    return thr
