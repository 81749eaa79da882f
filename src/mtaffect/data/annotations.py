"""s-Aff-Wild2 multi-task annotation files: parse, validate and write them.

An annotation file has a header line (skipped whatever it says) and rows of 16 comma-separated fields
``image,valence,arousal,expression,AU1..AU26`` with the missing codes of :mod:`mtaffect.schema`.
Parsing is vectorised (the training file has ~142k rows): a fast pandas path handles clean files and a
line-by-line diagnostic path takes over as soon as anything is off, so that every error names the file,
the 1-based line, the field and the offending value.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mtaffect.data.units import parse_image_name, split_image_names_arrow, unsafe_name_reason
from mtaffect.io import atomic_open, read_regular
from mtaffect.schema import (
    AU_NAMES,
    CROPPED_DIR,
    LABEL_COLUMNS,
    MISSING_AU,
    MISSING_EXPR,
    MISSING_VA,
    NUM_EXPR,
    NUM_FIELDS,
    OFFICIAL_HEADER,
    SPLIT_FILES,
)
from mtaffect.textfiles import normalise_newlines

#: The 15 numeric fields of a row, in file order (valence, arousal, expression, 12 AUs).
_NUMERIC_FIELDS: tuple[str, ...] = ("valence", "arousal", "expression", *AU_NAMES)
_GOT_MAX = 80


class AnnotationError(ValueError):
    """A malformed annotation row: carries the file and the 1-based line number."""

    def __init__(self, path: str, line: int, what: str, got: object) -> None:
        self.path = path
        self.line = line
        self.what = what
        self.got = got
        super().__init__(f"{path}:{line}: {what} (got: {_show(got)})")


@dataclass(frozen=True)
class RowProblem:
    """A row skipped by a lenient read; ``message`` is the strict error's text (it starts with FILE:LINE)."""

    path: str
    line: int
    message: str


def _show(value: object) -> str:
    """Render an offending value for a message: quoted, and truncated when long."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > _GOT_MAX:
        text = text[: _GOT_MAX - 3] + "..."
    return repr(text) if isinstance(value, str) else text


# ---------------------------------------------------------------------------------------------------
# LabelTable
# ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)  # DataFrames have no single truth value: compare .frame explicitly
class LabelTable:
    """One row per annotated image with its labels; missing labels hold the schema's missing codes.

    ``duplicates`` and ``skipped`` describe how the table was read from ``source``; they are not carried
    into :meth:`subset` results (a subset has no file of its own).
    """

    frame: pd.DataFrame
    source: str | None = None
    duplicates: int = 0
    skipped: list[RowProblem] = field(default_factory=list)

    def __post_init__(self) -> None:
        if tuple(self.frame.columns) != LABEL_COLUMNS:
            raise ValueError(
                f"LabelTable needs exactly the columns {list(LABEL_COLUMNS)}, "
                f"got {list(self.frame.columns)}; build it with LabelTable.from_frame to validate and convert"
            )

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        return (
            f"LabelTable(rows={len(self)}, videos={self.frame['video'].nunique()}, source={self.source!r}, "
            f"duplicates={self.duplicates}, skipped={len(self.skipped)})"
        )

    # ---- column views ----------------------------------------------------------------------------
    @property
    def images(self) -> np.ndarray:
        return self.frame["image"].to_numpy(dtype=object)

    @property
    def valence(self) -> np.ndarray:
        return self.frame["valence"].to_numpy(dtype=np.float32)

    @property
    def arousal(self) -> np.ndarray:
        return self.frame["arousal"].to_numpy(dtype=np.float32)

    @property
    def expression(self) -> np.ndarray:
        return self.frame["expression"].to_numpy(dtype=np.int64)

    @property
    def aus(self) -> np.ndarray:
        return self.frame[list(AU_NAMES)].to_numpy(dtype=np.int8).reshape(len(self), len(AU_NAMES))

    # ---- validity masks --------------------------------------------------------------------------
    @property
    def valence_mask(self) -> np.ndarray:
        return self.valence != MISSING_VA

    @property
    def arousal_mask(self) -> np.ndarray:
        return self.arousal != MISSING_VA

    @property
    def expr_mask(self) -> np.ndarray:
        return self.expression != MISSING_EXPR

    @property
    def au_mask(self) -> np.ndarray:
        """Per-AU validity, shape (n, 12): a row may carry some AUs and not others."""
        return self.aus != MISSING_AU

    @property
    def any_label_mask(self) -> np.ndarray:
        return self.valence_mask | self.arousal_mask | self.expr_mask | self.au_mask.any(axis=1)

    @property
    def videos(self) -> list[str]:
        return sorted(self.frame["video"].unique().tolist())

    # ---- selection -------------------------------------------------------------------------------
    def subset(self, mask_or_indices: Sequence[bool] | Sequence[int] | np.ndarray) -> LabelTable:
        """Rows picked by a boolean mask (length n) or by integer positions (order kept, repeats allowed)."""
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {sel.shape}, expected ({len(self)},)")
            sel = np.flatnonzero(sel)
        elif sel.size == 0:
            sel = sel.astype(np.int64)
        elif not np.issubdtype(sel.dtype, np.integer):
            raise TypeError(f"subset() takes a boolean mask or integer positions, got dtype {sel.dtype}")
        return LabelTable(self.frame.iloc[sel].reset_index(drop=True), source=self.source)

    def select_videos(self, videos: Iterable[str], *, strict: bool = True) -> LabelTable:
        """Rows of the given videos, in table order. Unknown videos are an error unless ``strict=False``."""
        wanted = list(dict.fromkeys(videos))
        if strict:
            present = set(self.frame["video"].unique().tolist())
            unknown = [v for v in wanted if v not in present]
            if unknown:
                raise ValueError(
                    f"{len(unknown)} video(s) not in {self.source or 'the table'}: {unknown[:5]}"
                    + (" ..." if len(unknown) > 5 else "")
                )
        return self.subset(self.frame["video"].isin(wanted).to_numpy())

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_frame(cls, df: pd.DataFrame, source: str | None = None) -> LabelTable:
        """Validate and convert a DataFrame with the label columns (extra columns are ignored).

        ``video`` and ``frame`` are derived from ``image`` when absent and must agree with it when given.
        Errors use the annotation-file rules; the "line" is the row position + 2 (as if a header preceded).
        """
        where = source or "<DataFrame>"
        needed = ("image", *_NUMERIC_FIELDS)
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise ValueError(f"{where}: missing label column(s) {missing}; expected {list(LABEL_COLUMNS)}")
        n = len(df)
        lines = np.arange(2, n + 2, dtype=np.int64)
        images = np.array([("" if v is None else str(v)).strip() for v in df["image"].tolist()], dtype=object)
        raw = [df[c].to_numpy(dtype=object) for c in _NUMERIC_FIELDS]
        values = np.empty((n, len(_NUMERIC_FIELDS)), dtype=np.float64)
        for j, col in enumerate(_NUMERIC_FIELDS):
            values[:, j] = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        rows = _Rows(images, values, lines, raw)
        problems = rows.validate(where)
        if problems:
            raise problems[0]
        for col, derived in (("video", rows.video), ("frame", rows.frame)):
            if col in df.columns:
                given = df[col].to_numpy()
                if col == "frame":
                    given = pd.to_numeric(df[col], errors="coerce").to_numpy(
                        dtype=np.float64, na_value=np.nan
                    )
                    bad = np.flatnonzero(given != derived)
                else:
                    bad = np.flatnonzero(np.array([str(g) for g in given], dtype=object) != derived)
                if bad.size:
                    i = int(bad[0])
                    raise AnnotationError(
                        where,
                        int(lines[i]),
                        f"{col} column disagrees with image {images[i]!r} (expected {derived[i]!r})",
                        given[i],
                    )
        return cls(rows.to_frame(), source=source)

    @classmethod
    def concat(cls, tables: Sequence[LabelTable]) -> LabelTable:
        """Stack tables (e.g. train + val); provenance counts add up, sources are joined with ``+``."""
        tables = list(tables)
        if not tables:
            return cls(_empty_frame())
        frame = pd.concat([t.frame for t in tables], ignore_index=True)
        sources = list(dict.fromkeys(t.source for t in tables if t.source))
        return cls(
            frame,
            source="+".join(sources) if sources else None,
            duplicates=sum(t.duplicates for t in tables),
            skipped=[p for t in tables for p in t.skipped],
        )


def _empty_frame() -> pd.DataFrame:
    return _Rows(
        np.empty(0, dtype=object), np.empty((0, len(_NUMERIC_FIELDS))), np.empty(0, np.int64)
    ).to_frame()


# ---------------------------------------------------------------------------------------------------
# Row validation shared by the file parser and LabelTable.from_frame
# ---------------------------------------------------------------------------------------------------


class _Rows:
    """Candidate rows: stripped image names, numeric fields as float64 (NaN = not a number), line numbers."""

    def __init__(
        self,
        images: np.ndarray,
        values: np.ndarray,
        lines: np.ndarray,
        raw: list[np.ndarray] | None = None,
        video_frame: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.images = images
        self.values = values
        self.lines = lines
        self.raw = raw  # the numeric fields as written, for messages (None: use the parsed value)
        self.bad_image = np.zeros(len(images), dtype=bool)
        self.unsafe: dict[int, str] = {}  # row -> why its name could leave the dataset folder
        if video_frame is not None:  # already split (and known valid) by the fast path
            self.video, self.frame = video_frame
            return
        self.video = np.empty(len(images), dtype=object)
        self.frame = np.zeros(len(images), dtype=np.int64)
        for i, name in enumerate(images.tolist()):
            reason = unsafe_name_reason(name)
            if reason is not None:
                self.bad_image[i] = True
                self.unsafe[i] = reason
                continue
            parsed = parse_image_name(name)
            if parsed is None:
                self.bad_image[i] = True
                continue
            self.video[i], self.frame[i] = parsed

    def __len__(self) -> int:
        return len(self.images)

    def field_failures(self) -> list[tuple[int, np.ndarray, str]]:
        """(field index, failing-row mask, what is wrong) per numeric field, in file order."""
        v = self.values
        out = []
        finite = np.isfinite(v)
        for j, name in enumerate(_NUMERIC_FIELDS):
            col = v[:, j]
            if j < 2:
                ok = finite[:, j] & (((col >= -1.0) & (col <= 1.0)) | (col == MISSING_VA))
                what = f"{name} must be a number in [-1, 1] or {MISSING_VA:g} for missing"
            elif j == 2:
                ok = finite[:, j] & (col == np.round(col)) & (col >= MISSING_EXPR) & (col <= NUM_EXPR - 1)
                what = f"expression must be a class index 0..{NUM_EXPR - 1} or {MISSING_EXPR} for missing"
            else:
                ok = finite[:, j] & ((col == 0) | (col == 1) | (col == MISSING_AU))
                what = f"{name} must be 0, 1 or {MISSING_AU} for missing"
            out.append((j, ~ok, what))
        return out

    def problem_mask(self, failures: list[tuple[int, np.ndarray, str]] | None = None) -> np.ndarray:
        """Rows with anything wrong (image name or any numeric field)."""
        bad = self.bad_image.copy()
        for _, fail, _ in self.field_failures() if failures is None else failures:
            bad |= fail
        return bad

    def problem_for(self, i: int, path: str, failures: list[tuple[int, np.ndarray, str]]) -> AnnotationError:
        """The first thing wrong with row ``i``, in field order."""
        if i in self.unsafe:
            return AnnotationError(
                path,
                int(self.lines[i]),
                f"image name {self.unsafe[i]}; names are relative to the dataset's {CROPPED_DIR}/ folder "
                "('<video>/<frame>.jpg') and may not leave it",
                self.images[i],
            )
        if self.bad_image[i]:
            return AnnotationError(
                path,
                int(self.lines[i]),
                "image name must be '<video>/<frame number>.jpg' with an integer frame number",
                self.images[i],
            )
        for j, fail, what in failures:
            if fail[i]:
                got = self.raw[j][i] if self.raw is not None else self.values[i, j]
                return AnnotationError(path, int(self.lines[i]), what, got)
        raise AssertionError("row has no problem")  # pragma: no cover

    def validate(self, path: str) -> list[AnnotationError]:
        """Problems of all failing rows, in line order."""
        failures = self.field_failures()
        return [self.problem_for(int(i), path, failures) for i in np.flatnonzero(self.problem_mask(failures))]

    def take(self, idx: np.ndarray) -> _Rows:
        sub = object.__new__(_Rows)
        sub.images, sub.values, sub.lines = self.images[idx], self.values[idx], self.lines[idx]
        sub.raw = None if self.raw is None else [r[idx] for r in self.raw]
        sub.video, sub.frame, sub.bad_image = self.video[idx], self.frame[idx], self.bad_image[idx]
        sub.unsafe = {}
        if self.unsafe:  # usually empty: map the old rows to their new positions only when needed
            pos = {int(old): new for new, old in enumerate(np.arange(len(self.images))[idx].tolist())}
            sub.unsafe = {pos[i]: r for i, r in self.unsafe.items() if i in pos}
        return sub

    def to_frame(self) -> pd.DataFrame:
        v = self.values
        data: dict[str, object] = {
            # dtype=str: pandas' own string dtype (object in pandas 2, "str" in pandas 3), also when empty
            "image": pd.Series(self.images.tolist(), dtype=str),
            "video": pd.Series(self.video.tolist(), dtype=str),
            "frame": self.frame.astype(np.int64),
            "valence": v[:, 0].astype(np.float32),
            "arousal": v[:, 1].astype(np.float32),
            "expression": v[:, 2].astype(np.int64),
        }
        for j, au in enumerate(AU_NAMES):
            data[au] = v[:, 3 + j].astype(np.int8)
        frame = pd.DataFrame(data, columns=list(LABEL_COLUMNS))
        return frame


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def _fast_rows(raw: bytes) -> _Rows | None:
    """Parse a clean file with pandas' C reader; None when anything needs the diagnostic path."""
    try:
        df = pd.read_csv(
            io.BytesIO(raw),
            header=None,
            skiprows=1,
            names=list(range(NUM_FIELDS)),
            dtype={0: str, **{k: np.float64 for k in range(1, NUM_FIELDS)}},
            quoting=csv.QUOTE_NONE,
            skip_blank_lines=True,
            encoding="utf-8",
            engine="c",
        )
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    # Every data row has exactly 15 commas: a cheap byte count catches extra (e.g. trailing) fields,
    # which the C reader would otherwise drop or pad silently; missing fields show up as NaN below.
    header_end = raw.find(b"\n")
    if raw.count(b",") - raw[: max(header_end, 0)].count(b",") != (NUM_FIELDS - 1) * len(df):
        return None
    if df[0].isna().any():
        return None
    values = df[list(range(1, NUM_FIELDS))].to_numpy(dtype=np.float64)
    split = _split_images_arrow(df[0])
    if split is None:
        return None
    images, video, frame = split
    rows = _Rows(images, values, np.zeros(len(df), dtype=np.int64), video_frame=(video, frame))  # no lines
    if rows.problem_mask().any():
        return None
    return rows


def _split_images_arrow(names: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Strip image names and split them into video and frame in Arrow (vectorised); None if any is odd."""
    arr = pc.utf8_trim_whitespace(pa.array(names, type=pa.string()))
    split = split_image_names_arrow(arr)
    if split is None:
        return None
    video, frame = split
    # The rest of a name is '<digits>[.<ext>]', so a name leaves the dataset folder exactly when its
    # video does; an unsafe one goes to the diagnostic path, which names its line.
    if any(unsafe_name_reason(v) is not None for v in pd.unique(video)):
        return None
    return arr.to_numpy(zero_copy_only=False).astype(object), video, frame


def _slow_rows(raw_bytes: bytes, where: str) -> tuple[_Rows, list[AnnotationError]]:
    """Line-by-line parse that keeps line numbers and explains every malformed row."""
    nul = raw_bytes.find(b"\0")
    if nul >= 0:
        bad_line = raw_bytes[:nul].count(b"\n") + 1
        raise AnnotationError(
            where, bad_line, "a binary file (NUL byte), not a text annotation file", raw_bytes[nul : nul + 8]
        )
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw_bytes[: exc.start].count(b"\n") + 1
        raise AnnotationError(
            where, bad_line, "file is not UTF-8 text", raw_bytes[exc.start : exc.start + 8]
        ) from None
    lines = text.split("\n")
    if not lines[0].strip() and len(lines) == 1:
        raise AnnotationError(where, 1, f"file is empty; expected the header {OFFICIAL_HEADER!r}", "")
    problems: list[AnnotationError] = []
    good_parts: list[list[str]] = []
    good_lines: list[int] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != NUM_FIELDS:
            problems.append(
                AnnotationError(
                    where,
                    lineno,
                    f"expected {NUM_FIELDS} comma-separated fields (image,valence,arousal,expression,"
                    f"{len(AU_NAMES)} AUs), found {len(parts)}",
                    line.strip(),
                )
            )
            continue
        good_parts.append(parts)
        good_lines.append(lineno)
    n = len(good_parts)
    cols = list(zip(*good_parts, strict=True)) if n else [() for _ in range(NUM_FIELDS)]
    images = np.array([s.strip() for s in cols[0]], dtype=object)
    raw = [np.array([s.strip() for s in c], dtype=object) for c in cols[1:]]
    values = np.empty((n, len(_NUMERIC_FIELDS)), dtype=np.float64)
    for j, col in enumerate(raw):
        try:
            values[:, j] = col.astype(np.float64)
        except ValueError:
            values[:, j] = pd.to_numeric(pd.Series(col, dtype=object), errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
    rows = _Rows(images, values, np.asarray(good_lines, dtype=np.int64), raw)
    row_problems = rows.validate(where)
    if row_problems:
        bad_lines = {p.line for p in row_problems}
        keep = np.array([ln not in bad_lines for ln in rows.lines.tolist()], dtype=bool)
        rows = rows.take(np.flatnonzero(keep))
    return rows, sorted(problems + row_problems, key=lambda p: p.line)


def _duplicate_analysis(rows: _Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: index of the first row with the same image, exact-duplicate flag, conflict flag."""
    n = len(rows)
    if n == 0:
        z = np.zeros(0, dtype=bool)
        return np.zeros(0, dtype=np.int64), z, z
    codes, uniques = pd.factorize(rows.images)
    first_of_code = np.full(len(uniques), n, dtype=np.int64)
    np.minimum.at(first_of_code, codes, np.arange(n, dtype=np.int64))
    first = first_of_code[codes]
    later = first != np.arange(n)
    same = np.ones(n, dtype=bool)
    if later.any():
        idx = np.flatnonzero(later)
        same[idx] = (rows.values[idx] == rows.values[first[idx]]).all(axis=1)
    return first, later & same, later & ~same


def _conflict_error(rows: _Rows, i: int, j: int, where: str) -> AnnotationError:
    """Row ``i`` labels the same image as earlier row ``j`` differently."""
    diffs = [
        f"{name}={_fmt_num(rows.values[i, k])} here, {_fmt_num(rows.values[j, k])} on line {rows.lines[j]}"
        for k, name in enumerate(_NUMERIC_FIELDS)
        if rows.values[i, k] != rows.values[j, k]
    ]
    return AnnotationError(
        where,
        int(rows.lines[i]),
        f"image {rows.images[i]!r} is labelled differently on lines {rows.lines[j]} and {rows.lines[i]}; "
        "fix or remove one of them (or read with lenient=True to keep the first)",
        "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else ""),
    )


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def read_annotations(
    path: str | os.PathLike, *, keep_duplicates: bool = False, lenient: bool = False
) -> LabelTable:
    """Read an s-Aff-Wild2 multi-task annotation file into a :class:`LabelTable`.

    Strict by default: the first malformed row raises :class:`AnnotationError` naming file, line, field
    and value. ``lenient=True`` skips such rows and lists them in ``table.skipped``. Exact duplicate rows
    are dropped (first kept) unless ``keep_duplicates``; either way ``table.duplicates`` counts them. The
    same image with different labels is an error (lenient: the later row is skipped and recorded).

    Args:
        path: the annotation file (``image,valence,arousal,expression,AU1,...`` with the official header).
        keep_duplicates: keep exact duplicate rows instead of dropping all but the first.
        lenient: skip malformed rows (listed in ``table.skipped``) instead of raising on the first.

    Returns:
        The rows as a :class:`LabelTable`, in file order, with validity masks from the missing codes.

    Raises:
        AnnotationError: a malformed row (strict mode) or conflicting labels for one image.
        FileNotFoundError: no such file (a folder or a FIFO: the matching ``OSError``).
    """
    path = Path(path)
    where = str(path)
    raw = normalise_newlines(read_regular(path, "annotation file"))
    _warn_if_headerless(raw, where)
    rows = _fast_rows(raw)
    problems: list[AnnotationError] = []
    if rows is not None:
        first, dup, conflict = _duplicate_analysis(rows)
        if conflict.any():
            rows = None  # need line numbers to report the conflict
    if rows is None:
        rows, problems = _slow_rows(raw, where)
        first, dup, conflict = _duplicate_analysis(rows)
        problems = sorted(
            problems
            + [_conflict_error(rows, int(i), int(first[i]), where) for i in np.flatnonzero(conflict)],
            key=lambda p: p.line,
        )
    if problems and not lenient:
        raise problems[0]
    drop = conflict if keep_duplicates else (conflict | dup)
    if drop.any():
        rows = rows.take(np.flatnonzero(~drop))
    skipped = [RowProblem(where, p.line, str(p)) for p in problems]
    return LabelTable(rows.to_frame(), source=where, duplicates=int(dup.sum()), skipped=skipped)


def _warn_if_headerless(raw: bytes, where: str) -> None:
    """Line 1 is the header and is never read: say so when it looks like a data row instead."""
    first = raw.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    parts = first.split(",")
    if len(parts) != NUM_FIELDS:
        return
    values = pd.to_numeric(pd.Series([p.strip() for p in parts[1:]]), errors="coerce")
    rows = _Rows(np.array([parts[0].strip()], dtype=object), values.to_numpy()[None, :], np.ones(1, np.int64))
    if not rows.problem_mask()[0]:
        warnings.warn(
            f"{where}:1: line 1 is a data row ({_show(first)}), but line 1 of an annotation file is its "
            f"header and is not read; if the file has no header, add {OFFICIAL_HEADER!r} as line 1",
            stacklevel=3,
        )


def load_split(root: str | os.PathLike, split: str, **kw) -> LabelTable:
    """Read the annotations of one split of a dataset root, by the official file names.

    Args:
        root: the dataset root (it holds the annotation files and ``cropped_aligned/``).
        split: "train" or "val".
        **kw: passed to :func:`read_annotations` (``lenient``, ``keep_duplicates``).

    Returns:
        The split's :class:`LabelTable`.

    Raises:
        ValueError: an unknown split.
        FileNotFoundError: the split's file is missing (the message lists what the root holds).
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root {root} is not a directory")
    path = root / SPLIT_FILES[split]
    if not path.is_file():
        present = [name for name in SPLIT_FILES.values() if (root / name).is_file()]
        raise FileNotFoundError(
            f"{path} not found: a dataset root holds {', '.join(SPLIT_FILES.values())} and {CROPPED_DIR}/; "
            f"found {present or 'none of the annotation files'} in {root}"
        )
    return read_annotations(path, **kw)


def image_path(root: str | os.PathLike, image: str) -> Path:
    """Where the aligned face crop of ``image`` (``<video>/<frame>.jpg``) lives under a dataset root."""
    return Path(root) / CROPPED_DIR / image


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def write_annotations(table: LabelTable, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``table`` in the official format (header, 16 fields); VA round-trips exactly, ints as ints.

    Args:
        table: the labels to write.
        path: the file to write (atomically).
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    cols = ["image", *_NUMERIC_FIELDS]
    out = Path(path)
    with atomic_open(out, "w", overwrite=overwrite, newline="", encoding="utf-8") as fh:
        fh.write(OFFICIAL_HEADER + "\n")
        table.frame[cols].to_csv(fh, header=False, index=False, lineterminator="\n", quoting=csv.QUOTE_NONE)
    return out
