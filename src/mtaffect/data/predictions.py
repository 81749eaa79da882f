"""PredictionTable: the per-image predictions every model, post-processor, metric and writer exchanges.

One row per image with valence, arousal, 8 expression probabilities and 12 AU probabilities (column
names in :data:`mtaffect.schema.PREDICTION_COLUMNS`); any extra columns (video, frame, face_id, time...)
travel along untouched. Hard decisions are only taken when writing a submission.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from mtaffect.data.units import first_unsafe_name
from mtaffect.io import atomic_path, open_regular
from mtaffect.schema import (
    AU_NAMES,
    AU_PROB_COLUMNS,
    CROPPED_DIR,
    EXPR_PROB_COLUMNS,
    NUM_AUS,
    NUM_EXPR,
    NUM_FIELDS,
    OFFICIAL_HEADER,
    PREDICTION_COLUMNS,
    VA_NAMES,
)
from mtaffect.textfiles import normalise_newlines, read_text

#: Suffixes read and written as CSV / Parquet; ``.txt`` is read as CSV (submissions are .txt files).
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
_READ_SUFFIXES = (*CSV_SUFFIXES, ".txt", *PARQUET_SUFFIXES)
#: Probabilities may overshoot [0, 1] by float rounding (e.g. a float32 softmax); they are not clipped.
_PROB_TOL = 1e-6
_SUBMISSION_COLUMNS = ("image", *VA_NAMES, "expression", *AU_NAMES)


class PredictionError(ValueError):
    """A prediction table (or file) that cannot be used as is."""


class MissingPredictionsError(PredictionError):
    """Some requested images have no prediction; ``missing`` lists them (distinct, in request order)."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


class PredictionTable:
    """Validated predictions; see the module docstring for the columns."""

    def __init__(self, frame: pd.DataFrame, source: str | None = None) -> None:
        self.source = source
        self.frame = _validate(frame, source or "<predictions>", None)

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        extra = [c for c in self.frame.columns if c not in PREDICTION_COLUMNS]
        return f"PredictionTable(rows={len(self)}, source={self.source!r}, extra_columns={extra})"

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        images: Sequence[str] | np.ndarray,
        valence: Sequence[float] | np.ndarray,
        arousal: Sequence[float] | np.ndarray,
        expr_probs: np.ndarray,
        au_probs: np.ndarray,
        **extra_columns: Sequence | np.ndarray,
    ) -> PredictionTable:
        """Build a table from arrays (validated like a file).

        Args:
            images: n image names (``<video>/<frame>.jpg``).
            valence: n values in [-1, 1].
            arousal: n values in [-1, 1].
            expr_probs: (n, 8) probabilities in class-index order (:data:`~mtaffect.schema.EXPR_NAMES`).
            au_probs: (n, 12) probabilities in official AU order (:data:`~mtaffect.schema.AU_NAMES`).
            **extra_columns: more columns of n values each (``video``, ``frame``, ``face_id``, ...),
                carried along.

        Returns:
            The table.

        Raises:
            PredictionError: a wrong shape, a value out of range or not finite.
        """
        names = [str(x) for x in images]
        n = len(names)
        expr = np.asarray(expr_probs, dtype=np.float64)
        aus = np.asarray(au_probs, dtype=np.float64)
        if expr.shape != (n, NUM_EXPR):
            raise PredictionError(f"expr_probs has shape {expr.shape}, expected ({n}, {NUM_EXPR})")
        if aus.shape != (n, NUM_AUS):
            raise PredictionError(f"au_probs has shape {aus.shape}, expected ({n}, {NUM_AUS})")
        data: dict[str, object] = {"image": names}
        for name, arr in (("valence", valence), ("arousal", arousal)):
            a = np.asarray(arr, dtype=np.float64)
            if a.shape != (n,):
                raise PredictionError(f"{name} has shape {a.shape}, expected ({n},)")
            data[name] = a
        data.update({c: expr[:, j] for j, c in enumerate(EXPR_PROB_COLUMNS)})
        data.update({c: aus[:, j] for j, c in enumerate(AU_PROB_COLUMNS)})
        for name, values in extra_columns.items():
            if name in data:
                raise PredictionError(f"extra column {name!r} clashes with a prediction column")
            if len(values) != n:
                raise PredictionError(f"extra column {name!r} has {len(values)} values, expected {n}")
            data[name] = values
        return cls(pd.DataFrame(data))

    @classmethod
    def read(cls, path: str | os.PathLike) -> PredictionTable:
        """Read a CSV or Parquet table, or a challenge submission (hard labels become 0/1 probabilities).

        Args:
            path: a ``.csv``, ``.parquet``/``.pq`` table or a ``.txt`` submission.

        Returns:
            The table (its ``source`` is the path, for messages).

        Raises:
            PredictionError: an unsupported suffix, missing columns or values out of range, each naming
                the file (and the line of a CSV).
            FileNotFoundError: no such file (a folder or a FIFO: the matching ``OSError``).
        """
        p = Path(path)
        where = str(p)
        open_regular(p, "prediction file").close()  # a missing path, folder or FIFO: said before reading
        suffix = p.suffix.lower()
        if suffix not in _READ_SUFFIXES:
            raise PredictionError(
                f"{where}: unsupported suffix {p.suffix!r}; use one of {list(_READ_SUFFIXES)}"
            )
        if suffix in PARQUET_SUFFIXES:
            try:
                df = pd.read_parquet(p)
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise PredictionError(f"{where}: not a readable Parquet file ({exc})") from exc
            table = cls(df, source=where)
            _refuse_unsafe_names(table.frame["image"], lambda i: f"{where}: row {i}")
            return table
        text = normalise_newlines(read_text(p, "prediction table (CSV) or submission", error=PredictionError))
        first = _first_nonblank_line(text)
        if not first:
            raise PredictionError(
                f"{where}: the file is empty; expected a prediction table (CSV with the columns "
                f"{', '.join(PREDICTION_COLUMNS[:3])}, ...) or a submission"
            )
        kind = _submission_kind(first)
        if kind is not None:
            return cls(_read_submission(text, where, has_header=kind == "header"), source=where)
        try:  # video ids like "341" stay text
            df = pd.read_csv(io.StringIO(text), dtype={"image": str, "video": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise PredictionError(_csv_error(where, exc)) from None
        frame = _validate(df, where, 2)  # CSV rows are reported by line number
        _refuse_unsafe_names(frame["image"], lambda i: f"{where}:{i + 2}")
        return _trusted(frame, where)

    # ---- output ----------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write CSV (exact float round-trip) or Parquet by suffix, atomically; no overwrite unless asked.

        Args:
            path: a ``.csv``, ``.parquet`` or ``.pq`` file.
            overwrite: replace an existing file.

        Returns:
            The path written.

        Raises:
            PredictionError: another suffix.
            OutputExistsError: the file exists and ``overwrite`` is false.
        """
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (*CSV_SUFFIXES, *PARQUET_SUFFIXES):
            hint = "; write challenge submissions with mtaffect.data.submission.write_submission"
            raise PredictionError(
                f"{p}: unsupported suffix {p.suffix!r} for a prediction table; use .csv, .parquet or .pq"
                + (hint if suffix == ".txt" else "")
            )
        with atomic_path(p, overwrite=overwrite) as tmp:
            if suffix in PARQUET_SUFFIXES:
                self.frame.to_parquet(tmp, index=False)
            else:
                _write_csv(self.frame, tmp)
        return p

    # ---- column views ----------------------------------------------------------------------------
    @property
    def images(self) -> np.ndarray:
        return self.frame["image"].to_numpy(dtype=object)

    @property
    def valence(self) -> np.ndarray:
        return self.frame["valence"].to_numpy(dtype=np.float64)

    @property
    def arousal(self) -> np.ndarray:
        return self.frame["arousal"].to_numpy(dtype=np.float64)

    @property
    def expr_probs(self) -> np.ndarray:
        return self.frame[list(EXPR_PROB_COLUMNS)].to_numpy(dtype=np.float64).reshape(len(self), NUM_EXPR)

    @property
    def au_probs(self) -> np.ndarray:
        return self.frame[list(AU_PROB_COLUMNS)].to_numpy(dtype=np.float64).reshape(len(self), NUM_AUS)

    @property
    def expr_labels(self) -> np.ndarray:
        """Most probable class per row (ties go to the lower index)."""
        return self.expr_probs.argmax(axis=1).astype(np.int64)

    # ---- selection -------------------------------------------------------------------------------
    def take(self, indices: Sequence[int] | np.ndarray) -> PredictionTable:
        """Rows at integer positions (order kept, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64)
        return _trusted(self.frame.iloc[idx].reset_index(drop=True), self.source)

    def with_columns(self, columns: Mapping[str, np.ndarray]) -> PredictionTable:
        """A new table with some columns replaced or added, same rows.

        For values derived from this (validated) table, e.g. by post-processing: they are not
        validated again, which keeps 1M-row pipelines fast.
        """
        frame = self.frame.copy(deep=False)
        for name, values in columns.items():
            frame[name] = values
        return _trusted(frame, self.source)

    def align_to(self, images: Sequence[str] | np.ndarray) -> PredictionTable:
        """Rows reordered (and repeated) to match ``images`` one to one.

        Raises :class:`MissingPredictionsError` when an image has no prediction, and
        :class:`PredictionError` when an image has several different predictions (ambiguous).
        """
        wanted = pd.Index(np.asarray(images, dtype=object))
        where = self.source or "<predictions>"
        frame = self.frame
        if frame["image"].duplicated().any():
            frame = frame.drop_duplicates(ignore_index=True)  # identical repeats are harmless
            ambiguous = frame["image"][frame["image"].duplicated()].unique().tolist()
            if ambiguous:
                raise PredictionError(
                    f"{where}: {len(ambiguous)} image(s) have several different predictions, so which one "
                    f"to use is ambiguous, e.g. {ambiguous[:5]}; keep one row per image (one face per frame)"
                )
        pos = pd.Index(frame["image"].to_numpy(dtype=object)).get_indexer(wanted)
        absent = pos < 0
        if absent.any():
            missing = list(dict.fromkeys(wanted[absent].tolist()))
            lines = int(absent.sum())
            also = f" ({lines} requested rows)" if lines != len(missing) else ""
            raise MissingPredictionsError(
                f"{where}: {len(missing)} of {wanted.nunique()} requested image(s) have no prediction{also}, "
                f"e.g. {missing[:5]}; predict every image of the test list / annotation file",
                missing,
            )
        return _trusted(frame.iloc[pos].reset_index(drop=True), self.source)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """CSV with shortest round-trip floats, via Arrow (~10x faster than pandas on wide float tables).

    Falls back to pandas (which quotes as needed) when a column has no Arrow type or a text value holds
    a comma or quote.
    """
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow([str(c) for c in frame.columns])
        with open(path, "wb") as fh:
            fh.write(header.getvalue().encode("utf-8"))
            options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
            pa_csv.write_csv(table, fh, write_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        frame.to_csv(path, index=False, lineterminator="\n")


def _refuse_unsafe_names(images: pd.Series, at: Callable[[int], str]) -> None:
    """Refuse a prediction file naming an image outside the dataset's image folder (``..``, absolute).

    Such a name never matches an annotation, yet its folder part would be taken as a video (smoothing,
    tuning splits): a file from elsewhere is refused as the annotation reader refuses it. ``at(i)``
    says where row ``i`` is (``FILE:LINE``).
    """
    found = first_unsafe_name(images)
    if found is not None:
        i, reason = found
        raise PredictionError(
            f"{at(i)}: image name {images.iloc[i]!r} {reason}; image names are relative to the dataset's "
            f"{CROPPED_DIR}/ folder ('<video>/<frame>.jpg') and may not leave it"
        )


def _trusted(frame: pd.DataFrame, source: str | None) -> PredictionTable:
    """Wrap rows taken from an already validated table without validating them again."""
    table = object.__new__(PredictionTable)
    table.frame = frame
    table.source = source
    return table


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _where_row(i: int, line_offset: int | None) -> str:
    return f"line {i + line_offset}" if line_offset is not None else f"row {i}"


def _validate(frame: pd.DataFrame, where: str, line_offset: int | None) -> pd.DataFrame:
    """Check and normalise a prediction frame: required columns first (float64), extras kept after."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"a PredictionTable needs a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise PredictionError(
            f"{where}: missing column(s) {missing}; a prediction table needs image, valence, arousal, "
            f"{', '.join(EXPR_PROB_COLUMNS)} and {', '.join(AU_PROB_COLUMNS)}"
        )
    dup_cols = frame.columns[frame.columns.duplicated()].unique().tolist()
    if dup_cols:
        raise PredictionError(f"{where}: duplicate column name(s) {dup_cols}")
    extras = [c for c in frame.columns if c not in PREDICTION_COLUMNS]
    out = frame.reset_index(drop=True)[[*PREDICTION_COLUMNS, *extras]].copy()
    image = out["image"]
    bad = image.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PredictionError(f"{where}: {_where_row(i, line_offset)}: image name is empty")
    names = np.array([str(x).strip() for x in image.tolist()], dtype=object)
    empty = np.array([not x for x in names], dtype=bool)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise PredictionError(f"{where}: {_where_row(i, line_offset)}: image name is empty")
    out["image"] = pd.Series(names.tolist(), dtype=str)
    for col in PREDICTION_COLUMNS[1:]:
        raw = out[col]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        if col in VA_NAMES:
            ok = np.isfinite(values)
            what = "must be a finite number"
        else:
            ok = np.isfinite(values) & (values >= -_PROB_TOL) & (values <= 1 + _PROB_TOL)
            what = "must be a probability in [0, 1]"
        if not ok.all():
            fails = np.flatnonzero(~ok)
            i = int(fails[0])
            raise PredictionError(
                f"{where}: column {col!r} {what}; {len(fails)} value(s) are not, first at "
                f"{_where_row(i, line_offset)} (got: {raw.iloc[i]!r})"
            )
        out[col] = values
    return out


# ---------------------------------------------------------------------------------------------------
# Submission files read as predictions
# ---------------------------------------------------------------------------------------------------


def _csv_error(where: str, exc: Exception) -> str:
    """pandas' parser message as ``FILE:LINE: ...`` on one line."""
    text = " ".join(str(exc).split())
    found = re.search(r"line (\d+)", text)
    prefix = f"{where}:{found.group(1)}" if found else where
    return f"{prefix}: not a readable CSV table ({text})"


_NON_SPACE = re.compile(r"\S")  # \S and str.strip agree on what whitespace is


def _first_nonblank_line(text: str) -> str:
    """The first line (lines end at LF) that is not all whitespace, stripped; "" when none.

    What ``next((ln.strip() for ln in text.split("\\n") if ln.strip()), "")`` gives, without splitting
    the whole file.
    """
    found = _NON_SPACE.search(text)
    if found is None:
        return ""
    end = text.find("\n", found.start())
    return text[found.start() : end if end >= 0 else len(text)].strip()


def _submission_kind(first_line: str) -> str | None:
    """``"header"`` / ``"bare"`` when the file holds hard labels in the challenge format, else None."""
    fields = [f.strip() for f in first_line.split(",")]
    if first_line.replace(" ", "").lower() == OFFICIAL_HEADER or tuple(fields) == _SUBMISSION_COLUMNS:
        return "header"
    if len(fields) == NUM_FIELDS and fields[0] != "image":
        try:
            [float(f) for f in fields[1:]]
        except ValueError:
            return None
        return "bare"
    return None


def _read_submission(text: str, where: str, *, has_header: bool) -> pd.DataFrame:
    """Hard labels -> probabilities: expression index -> one-hot, AU 0/1 -> 0.0/1.0."""
    rows: list[list[str]] = []
    lines: list[int] = []
    header_pending = has_header
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if header_pending:  # the first non-blank line
            header_pending = False
            continue
        parts = line.split(",")
        if len(parts) != NUM_FIELDS:
            raise PredictionError(
                f"{where}:{lineno}: expected {NUM_FIELDS} comma-separated fields "
                f"({OFFICIAL_HEADER} with {NUM_AUS} AUs), found {len(parts)}"
            )
        rows.append([p.strip() for p in parts])
        lines.append(lineno)
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in range(NUM_FIELDS)]
    values = np.empty((len(rows), NUM_FIELDS - 1), dtype=np.float64)
    for j, col in enumerate(cols[1:]):
        try:
            values[:, j] = np.array(col, dtype=object).astype(np.float64)
        except ValueError:  # locate the bad values below
            values[:, j] = pd.to_numeric(pd.Series(col, dtype=object), errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
    ok = np.isfinite(values)
    ok[:, 2] &= np.isin(values[:, 2], np.arange(NUM_EXPR))
    ok[:, 3:] &= (values[:, 3:] == 0) | (values[:, 3:] == 1)
    if not ok.all():
        i, j = (int(x[0]) for x in np.nonzero(~ok))  # first bad row, then its first bad field
        rule = {0: "a finite number", 1: "a finite number", 2: f"an integer 0..{NUM_EXPR - 1}"}.get(
            j, "0 or 1"
        )
        raise PredictionError(
            f"{where}:{lines[i]}: {_SUBMISSION_COLUMNS[j + 1]} must be {rule} (got: {rows[i][j + 1]!r})"
        )
    _refuse_unsafe_names(pd.Series(list(cols[0]), dtype=object), lambda i: f"{where}:{lines[i]}")
    expr = values[:, 2].astype(np.int64)
    data: dict[str, object] = {"image": list(cols[0]), "valence": values[:, 0], "arousal": values[:, 1]}
    onehot = np.eye(NUM_EXPR)[expr] if len(expr) else np.zeros((0, NUM_EXPR))
    data.update({c: onehot[:, j] for j, c in enumerate(EXPR_PROB_COLUMNS)})
    data.update({c: values[:, 3 + j] for j, c in enumerate(AU_PROB_COLUMNS)})
    return pd.DataFrame(data)


__all__ = ["MissingPredictionsError", "PredictionError", "PredictionTable"]
