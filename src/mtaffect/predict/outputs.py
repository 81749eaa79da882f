"""The prediction table: one row per analysed frame and face, the same from the CLI and the Python API.

Columns, in order (names from :mod:`mtaffect.schema`; documented in docs/formats.md):

- ``file`` (input path), ``frame`` (0-based decoded-frame number; 0 for a still image), ``time``
  (seconds from the stream start, from the frame's own timestamp; NaN for still images);
- ``face_id`` (stable over a shot within one file; -1 on a row without a face), ``success`` (1 when a
  face was found, 0 on the one row of a frame without any face: frames are never silently missing),
  ``confidence`` (the detector's face probability; 0 when no face);
- ``x1, y1, x2, y2``: the face box in pixels (edge coordinates);
- five landmarks ``eye_l_x, eye_l_y, eye_r_x, eye_r_y, nose_x, nose_y, mouth_l_x, mouth_l_y, mouth_r_x,
  mouth_r_y`` (left/right as seen in the image);
- ``pose_Rx, pose_Ry, pose_Rz``: head pitch, yaw and roll in radians, OpenFace's convention: a rigid fit
  of the 478 landmarks to MediaPipe's canonical face (:mod:`mtaffect.geometry.headpose`; expression
  does not move it), or with ``landmarks="none"`` from the five landmarks (:mod:`mtaffect.faces.pose`);
- ``gaze_angle_x, gaze_angle_y``: gaze in radians, OpenFace's convention (:mod:`mtaffect.geometry.gaze`);
- ``AU01_p`` .. ``AU26_p``: AU probabilities (OpenFace-style names); ``AU01_c`` .. ``AU26_c``: 0/1
  decisions at the model's (or the post-processing config's) per-AU thresholds; ``AU01_r`` ..: AU
  intensities on OpenFace's 0-5 scale for the AUs the facial evidence supports
  (:data:`mtaffect.schema.AU_INTENSITY_COLUMNS`, :mod:`mtaffect.geometry.au_evidence`);
- ``Neutral_p`` .. ``Other_p``: the 8 expression probabilities (sum to 1) and ``expression``: the most
  probable class name;
- ``valence``, ``arousal`` in [-1, 1];
- ``bs__neutral`` .. ``bs_noseSneerRight``: MediaPipe's 52 blendshapes in [0, 1];
- ``ended_early``: 1 on every row of an input that stopped before the length its container declares
  (a cut file, a dropped stream) or whose decoder failed part-way; its rows are what was decoded;
- with ``landmarks="dense"``: ``x_0`` .. ``x_477``, ``y_0`` .. ``y_477`` (image pixels) and ``z_0`` ..
  ``z_477`` (relative depth scaled like x).

The gaze, intensity and blendshape columns are the landmarker's (:mod:`mtaffect.geometry.landmarker`):
absent with ``landmarks="none"``, NaN on a face it could not measure (too small, cut by the border).
Rows without a face carry NaN in every measured column (and ``expression`` is empty).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from mtaffect.io import atomic_path
from mtaffect.schema import (
    AU_DECISION_COLUMNS,
    AU_INTENSITY_COLUMNS,
    AU_NAMES,
    AU_PROB_COLUMNS,
    BLENDSHAPE_COLUMNS,
    BOX_COLUMNS,
    DENSE_LANDMARK_COLUMNS,
    EXPR_NAMES,
    EXPR_PROB_COLUMNS,
    GAZE_COLUMNS,
    LANDMARK_COLUMNS,
    LANDMARK_NAMES,  # noqa: F401  (re-exported)
    POSE_COLUMNS,
    VA_NAMES,
)

ID_COLUMNS: Final[tuple[str, ...]] = ("file", "frame", "time", "face_id", "success", "confidence")
# The probability/decision names are the schema's (one convention for every table); these aliases keep
# the application's short names.
AU_P_COLUMNS: Final[tuple[str, ...]] = AU_PROB_COLUMNS
AU_C_COLUMNS: Final[tuple[str, ...]] = AU_DECISION_COLUMNS
EXPR_P_COLUMNS: Final[tuple[str, ...]] = EXPR_PROB_COLUMNS
VA_COLUMNS: Final[tuple[str, str]] = VA_NAMES
COLUMNS: Final[tuple[str, ...]] = (
    *ID_COLUMNS,
    *BOX_COLUMNS,
    *LANDMARK_COLUMNS,
    *POSE_COLUMNS,
    *AU_P_COLUMNS,
    *AU_C_COLUMNS,
    *EXPR_P_COLUMNS,
    "expression",
    *VA_COLUMNS,
    "ended_early",
)
#: Columns of the landmarker's measures, by the block key that carries them (absent: not measured).
MEASURE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "gaze": GAZE_COLUMNS,
    "au_r": AU_INTENSITY_COLUMNS,
    "bs": BLENDSHAPE_COLUMNS,
    "dense": DENSE_LANDMARK_COLUMNS,
}
#: Every column a table may have, in order: the landmarker's next to their kin, dense points last.
ALL_COLUMNS: Final[tuple[str, ...]] = (
    *ID_COLUMNS,
    *BOX_COLUMNS,
    *LANDMARK_COLUMNS,
    *POSE_COLUMNS,
    *GAZE_COLUMNS,
    *AU_P_COLUMNS,
    *AU_C_COLUMNS,
    *AU_INTENSITY_COLUMNS,
    *EXPR_P_COLUMNS,
    "expression",
    *VA_COLUMNS,
    *BLENDSHAPE_COLUMNS,
    "ended_early",
    *DENSE_LANDMARK_COLUMNS,
)
FORMATS: Final[tuple[str, ...]] = ("csv", "parquet")


class TableBuilder:
    """Accumulates rows as numpy blocks (no per-row Python objects) and builds the DataFrame once.

    ``measures``: the :data:`MEASURE_COLUMNS` keys every row has (NaN on rows without a face), so a file
    without any face still has the landmarker's columns."""

    def __init__(self, measures: Sequence[str] = ()) -> None:
        self.measures = tuple(measures)
        self._blocks: list[dict[str, np.ndarray]] = []
        self._files: list[tuple[str, int]] = []  # (file, rows) per block

    def add(
        self,
        file: str,
        frame: np.ndarray,
        time: np.ndarray,
        face_id: np.ndarray,
        confidence: np.ndarray,
        boxes: np.ndarray,
        landmarks: np.ndarray,
        expr: np.ndarray,
        au: np.ndarray,
        va: np.ndarray,
        pose: np.ndarray | None = None,
        measures: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Rows of faces: arrays of length n (boxes (n, 4), landmarks (n, 5, 2), expr (n, 8), au (n, 12),
        pose (n, 3) radians or None: NaN); ``measures``: the landmarker's, by :data:`MEASURE_COLUMNS` key
        ((n, k) arrays in that order of columns)."""
        n = len(frame)
        if n == 0:
            return
        pose = np.full((n, 3), np.nan, np.float32) if pose is None else pose
        extra = {
            k: np.asarray(v, np.float32).reshape(n, len(MEASURE_COLUMNS[k]))
            for k, v in (measures or {}).items()
        }
        self._blocks.append(
            {
                **extra,
                "frame": np.asarray(frame, np.int64),
                "time": np.asarray(time, np.float64),
                "face_id": np.asarray(face_id, np.int64),
                "success": np.ones(n, np.int8),
                "confidence": np.asarray(confidence, np.float32),
                "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
                "landmarks": np.asarray(landmarks, np.float32).reshape(n, 10),
                "expr": np.asarray(expr, np.float32).reshape(n, len(EXPR_NAMES)),
                "au": np.asarray(au, np.float32).reshape(n, len(AU_NAMES)),
                "va": np.asarray(va, np.float32).reshape(n, 2),
                "pose": np.asarray(pose, np.float32).reshape(n, 3),
            }
        )
        self._files.append((file, n))

    def add_empty(self, file: str, frame: np.ndarray, time: np.ndarray) -> None:
        """Rows of frames without a face (success=0)."""
        n = len(frame)
        if n == 0:
            return
        nan = np.float32("nan")
        self._blocks.append(
            {
                "frame": np.asarray(frame, np.int64),
                "time": np.asarray(time, np.float64),
                "face_id": np.full(n, -1, np.int64),
                "success": np.zeros(n, np.int8),
                "confidence": np.zeros(n, np.float32),
                "boxes": np.full((n, 4), nan, np.float32),
                "landmarks": np.full((n, 10), nan, np.float32),
                "expr": np.full((n, len(EXPR_NAMES)), nan, np.float32),
                "au": np.full((n, len(AU_NAMES)), nan, np.float32),
                "va": np.full((n, 2), nan, np.float32),
                "pose": np.full((n, 3), nan, np.float32),
                **{k: np.full((n, len(MEASURE_COLUMNS[k])), nan, np.float32) for k in self.measures},
            }
        )
        self._files.append((file, n))

    def __len__(self) -> int:
        return sum(n for _, n in self._files)

    def extend(self, other: TableBuilder) -> TableBuilder:
        """Append ``other``'s rows (no copy); returns self."""
        self._blocks.extend(other._blocks)
        self._files.extend(other._files)
        return self

    def split(self, last_frame: int) -> tuple[TableBuilder, TableBuilder]:
        """(rows of frames up to ``last_frame``, the later rows), as two builders: streaming hands out
        rows in frame order while later ones wait (building a DataFrame per chunk would cost more than
        the chunk's model)."""
        early, late = TableBuilder(self.measures), TableBuilder(self.measures)
        for block, (file, _) in zip(self._blocks, self._files, strict=True):
            keep = block["frame"] <= last_frame
            for dst, mask in ((early, keep), (late, ~keep)):
                n = int(mask.sum())
                if n:
                    dst._blocks.append({k: v[mask] for k, v in block.items()})
                    dst._files.append((file, n))
        return early, late

    def faces_at(self, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (k, 4) and face ids (k,) of the face rows of ``frame``."""
        boxes, ids = [np.zeros((0, 4), np.float32)], [np.zeros(0, np.int64)]
        for b in self._blocks:
            sel = (b["frame"] == frame) & (b["success"] == 1)
            boxes.append(b["boxes"][sel])
            ids.append(b["face_id"][sel])
        return np.concatenate(boxes), np.concatenate(ids)

    def build(self, au_thresholds: Sequence[float] | np.ndarray) -> pd.DataFrame:
        """The table, sorted by file order, frame and face id."""
        if not self._blocks:
            return empty_table()
        cat = {k: np.concatenate([b[k] for b in self._blocks]) for k in self._blocks[0]}
        files = np.concatenate([np.full(n, i, np.int64) for i, (_, n) in enumerate(self._files)])
        names = [f for f, _ in self._files]
        data: dict[str, np.ndarray] = {"file": np.array(names, dtype=object)[files]}
        for k in ("frame", "time", "face_id", "success", "confidence"):
            data[k] = cat[k]
        data.update(zip(BOX_COLUMNS, cat["boxes"].T, strict=True))
        data.update(zip(LANDMARK_COLUMNS, cat["landmarks"].T, strict=True))
        data.update(zip(POSE_COLUMNS, cat["pose"].T, strict=True))
        data.update(zip(AU_P_COLUMNS, cat["au"].T, strict=True))
        data.update(zip(EXPR_P_COLUMNS, cat["expr"].T, strict=True))
        data.update(zip(VA_COLUMNS, cat["va"].T, strict=True))
        for key, columns in MEASURE_COLUMNS.items():
            if key in cat:
                data.update(zip(columns, cat[key].T, strict=True))
        data["ended_early"] = np.zeros(len(data["frame"]), np.int8)
        df = pd.DataFrame(data)
        # Stable order: files as added (first appearance), then frame, then face id.
        first = {f: i for i, f in reversed(list(enumerate(names)))}
        df["_order"] = df["file"].map(first)
        df = df.sort_values(["_order", "frame", "face_id"], kind="stable").drop(columns="_order")
        return finalize(df.reset_index(drop=True), au_thresholds)


def empty_table() -> pd.DataFrame:
    """A table with every column and no row."""
    df = pd.DataFrame({c: pd.Series(dtype="float32") for c in COLUMNS})
    df = df.astype(
        {
            "file": object,
            "frame": "int64",
            "face_id": "int64",
            "success": "int8",
            "expression": object,
            "ended_early": "int8",
        }
    )
    return df


def finalize(df: pd.DataFrame, au_thresholds: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """(Re)compute the derived columns — AU decisions and the expression label — and order the columns.

    Call it again after changing probabilities (smoothing, post-processing) so the labels follow.
    """
    th = np.asarray(au_thresholds, np.float64).reshape(-1)
    if th.shape != (len(AU_NAMES),):
        raise ValueError(f"au_thresholds must have {len(AU_NAMES)} values, got {th.shape}")
    df = df.copy()
    p = df[list(AU_P_COLUMNS)].to_numpy(np.float64)
    ok = df["success"].to_numpy() == 1
    dec = np.where(ok[:, None], (p >= th).astype(np.float64), np.nan)
    for i, c in enumerate(AU_C_COLUMNS):
        df[c] = pd.array(np.where(np.isnan(dec[:, i]), pd.NA, dec[:, i]), dtype="Int8")
    e = df[list(EXPR_P_COLUMNS)].to_numpy(np.float64)
    label = np.array(EXPR_NAMES, dtype=object)[np.nan_to_num(e, nan=-1).argmax(1)] if len(e) else []
    df["expression"] = np.where(ok, label, "") if len(e) else pd.Series(dtype=object)
    if "ended_early" not in df.columns:
        df["ended_early"] = np.int8(0)
    return df[table_columns(df)]


def table_columns(df: pd.DataFrame) -> list[str]:
    """The table's columns in order: every base column, then the landmarker's that ``df`` has, each
    next to its kin (:data:`ALL_COLUMNS`)."""
    have = set(df.columns)
    return [c for c in ALL_COLUMNS if c in COLUMNS or c in have]


def check_format(fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def write_table(
    df: pd.DataFrame, path: str | os.PathLike, fmt: str | None = None, overwrite: bool = False
) -> Path:
    """Write atomically as CSV or Parquet (by ``fmt`` or the suffix); never overwrites unless asked."""
    path = Path(path)
    fmt = check_format(fmt or path.suffix or "csv")
    with atomic_path(path, overwrite=overwrite) as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=False, float_format="%.6g")
        else:
            df.to_parquet(tmp, index=False)
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_table` (CSV or Parquet), with the same dtypes.

    A table without the pose columns gets them as NaN.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"file": str, "expression": str}, keep_default_na=False, na_values=[""])
        if "expression" in df:
            df["expression"] = df["expression"].fillna("")
        for c in AU_C_COLUMNS:
            if c in df:
                df[c] = df[c].astype("Int8")
    for c in POSE_COLUMNS:  # tables written before these columns existed
        if c not in df:
            df[c] = np.float32("nan")
    if "ended_early" not in df.columns:
        df["ended_early"] = np.int8(0)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not an mtaffect prediction table (missing {missing[:4]})")
    ordered = table_columns(df)
    return df[[*ordered, *(c for c in df.columns if c not in set(ordered))]]


def to_prediction_table(df: pd.DataFrame) -> pd.DataFrame:
    """The rows with a face as a PredictionTable frame (see :mod:`mtaffect.data.predictions`; the
    probability columns have the same names in both tables), plus ``file``, ``frame``, ``time`` and
    ``face_id``; ``image`` is ``<file>:<frame>:<face_id>``. This is what post-processing, blending and
    the metric read."""
    ok = df[df["success"] == 1]
    out = pd.DataFrame(
        {
            "image": ok["file"].astype(str) + ":" + ok["frame"].astype(str) + ":" + ok["face_id"].astype(str),
            "valence": ok["valence"].to_numpy(np.float64),
            "arousal": ok["arousal"].to_numpy(np.float64),
        }
    )
    for c in (*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS):
        out[c] = ok[c].to_numpy(np.float64)
    for c in ("file", "frame", "time", "face_id"):
        out[c] = ok[c].to_numpy()
    return out.reset_index(drop=True)
