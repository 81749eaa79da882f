"""Per-face summary of a prediction table: what the HTML report shows, as a DataFrame.

``mtaffect.summarize(df)`` (this module's :func:`summarize`) gives one row per (file, face id) with:

- ``file``, ``face_id``, ``frames`` (analysed frames with this face), ``first_frame``, ``last_frame``,
  ``first_time``, ``last_time`` (seconds; NaN for stills), ``confidence`` (mean detector probability);
- ``valence_mean``, ``valence_sd``, ``arousal_mean``, ``arousal_sd`` (population standard deviation);
- ``expression``: the most frequent expression label; ``<Expression>_share``: the share of the face's
  frames where that class is the most probable; ``<Expression>_p_mean``: its mean probability;
- ``<AU>_active``: the share of frames where the AU is active (probability >= its threshold, the table's
  ``AUxx_c``); ``<AU>_p_mean``: its mean probability;
- ``pose_Rx_mean``, ``pose_Ry_mean``, ``pose_Rz_mean``: mean head pose (radians, as in the table).

Facial geometry (MediaPipe Face Landmarker; see docs/formats.md):

- ``geometry_frames``: frames of this face where the landmarker measured it (its blendshapes are
  there); the statistics below are over the frames where their column is measured;
- ``pose_Rx_deg_mean``, ``pose_Rx_deg_sd``, and the same for ``pose_Ry`` and ``pose_Rz``: head pitch,
  yaw and roll in **degrees** (mean and population sd);
- ``gaze_angle_x_deg_mean``, ``gaze_angle_x_deg_sd``, ``gaze_angle_y_deg_mean``, ``gaze_angle_y_deg_sd``:
  gaze in degrees;
- ``AU01_r_mean`` .. ``AU26_r_mean``: mean AU intensity (0-5) of the AUs that have one
  (:data:`mtaffect.schema.AU_INTENSITY_NAMES`);
- ``bs_<name>_mean``: mean of each of the 52 blendshapes (``bs__neutral_mean`` first, then the schema's
  order); :func:`top_blendshapes` names a face's most active ones.

Every column is always there: a table without the geometry columns (written before they existed, or with
``--landmarks none``) gives NaN in them (and 0 ``geometry_frames``). Rows are in the table's order of
first appearance. A table without any face gives an empty frame with these columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np
import pandas as pd

from mtaffect.schema import (
    AU_DECISION_COLUMNS,
    AU_INTENSITY_COLUMNS,
    AU_OPENFACE_NAMES,
    AU_PROB_COLUMNS,
    BLENDSHAPE_COLUMNS,
    EXPR_NAMES,
    EXPR_PROB_COLUMNS,
    GAZE_COLUMNS,
    POSE_COLUMNS,
)

EXPR_SHARE_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_share" for n in EXPR_NAMES)
EXPR_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in EXPR_PROB_COLUMNS)
AU_ACTIVE_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_active" for n in AU_OPENFACE_NAMES)
AU_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in AU_PROB_COLUMNS)
POSE_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in POSE_COLUMNS)
#: The table's angle columns (radians) that the summary gives in degrees.
ANGLE_COLUMNS: Final[tuple[str, ...]] = (*POSE_COLUMNS, *GAZE_COLUMNS)
ANGLE_DEG_COLUMNS: Final[tuple[str, ...]] = tuple(
    f"{c}_deg_{stat}" for c in ANGLE_COLUMNS for stat in ("mean", "sd")
)
POSE_DEG_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_deg_mean" for c in POSE_COLUMNS)
POSE_DEG_SD_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_deg_sd" for c in POSE_COLUMNS)
GAZE_DEG_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_deg_mean" for c in GAZE_COLUMNS)
GAZE_DEG_SD_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_deg_sd" for c in GAZE_COLUMNS)
AU_INTENSITY_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in AU_INTENSITY_COLUMNS)
BLENDSHAPE_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in BLENDSHAPE_COLUMNS)
GEOMETRY_SUMMARY_COLUMNS: Final[tuple[str, ...]] = (
    "geometry_frames",
    *ANGLE_DEG_COLUMNS,
    *AU_INTENSITY_MEAN_COLUMNS,
    *BLENDSHAPE_MEAN_COLUMNS,
)
SUMMARY_COLUMNS: Final[tuple[str, ...]] = (
    "file",
    "face_id",
    "frames",
    "first_frame",
    "last_frame",
    "first_time",
    "last_time",
    "confidence",
    "valence_mean",
    "valence_sd",
    "arousal_mean",
    "arousal_sd",
    "expression",
    *EXPR_SHARE_COLUMNS,
    *EXPR_MEAN_COLUMNS,
    *AU_ACTIVE_COLUMNS,
    *AU_MEAN_COLUMNS,
    *POSE_MEAN_COLUMNS,
    *GEOMETRY_SUMMARY_COLUMNS,
)


def _numeric(ok: pd.DataFrame, columns) -> pd.DataFrame:
    """``columns`` of ``ok`` as float64; a column the table lacks is NaN."""
    return pd.DataFrame(
        {c: ok[c].astype("float64") if c in ok else np.full(len(ok), np.nan) for c in columns},
        index=ok.index,
    )


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (file, face_id) of ``table`` (a prediction table from ``Predictor.predict`` or
    ``mtaffect.predict.read_table``); see the module docstring for the columns."""
    missing = [c for c in ("file", "face_id", "success", "frame", "expression") if c not in table.columns]
    if missing:
        raise ValueError(f"not a prediction table (missing {missing}); pass what Predictor.predict returns")
    read = (
        "file",
        "face_id",
        "frame",
        "time",
        "confidence",
        "valence",
        "arousal",
        "expression",
        *AU_DECISION_COLUMNS,
        *EXPR_PROB_COLUMNS,
        *AU_PROB_COLUMNS,
        *POSE_COLUMNS,
        *GAZE_COLUMNS,
        *AU_INTENSITY_COLUMNS,
        *BLENDSHAPE_COLUMNS,
    )
    ok = table.loc[table["success"] == 1, [c for c in read if c in table.columns]]  # no landmark columns
    if not len(ok):
        text = ("file", "expression")
        return pd.DataFrame({c: pd.Series(dtype=object if c in text else float) for c in SUMMARY_COLUMNS})
    g = ok.groupby(["file", "face_id"], sort=False)
    out = g.agg(
        frames=("frame", "size"),
        first_frame=("frame", "min"),
        last_frame=("frame", "max"),
        first_time=("time", "min"),
        last_time=("time", "max"),
        confidence=("confidence", "mean"),
        valence_mean=("valence", "mean"),
        valence_sd=("valence", lambda s: s.std(ddof=0)),
        arousal_mean=("arousal", "mean"),
        arousal_sd=("arousal", lambda s: s.std(ddof=0)),
    )
    labels = ok["expression"].to_numpy(dtype=object)
    onehot = pd.DataFrame(
        (labels[:, None] == np.array(EXPR_NAMES, dtype=object)[None]).astype(np.float64),
        columns=list(EXPR_SHARE_COLUMNS),
        index=ok.index,
    )
    keys = [ok["file"], ok["face_id"]]
    shares = onehot.groupby(keys, sort=False).mean()
    # Most frequent label; ties go to the class listed first in the schema.
    out["expression"] = np.array(EXPR_NAMES, dtype=object)[shares.to_numpy().argmax(1)]
    active = ok[list(AU_DECISION_COLUMNS)].astype("float64").groupby(keys, sort=False).mean()
    active.columns = list(AU_ACTIVE_COLUMNS)
    means = _numeric(ok, [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, *POSE_COLUMNS]).groupby(keys, sort=False)
    means = means.mean()
    means.columns = [*EXPR_MEAN_COLUMNS, *AU_MEAN_COLUMNS, *POSE_MEAN_COLUMNS]
    out = pd.concat([out, shares, active, means, _geometry(ok, keys)], axis=1).reset_index()
    return out[list(SUMMARY_COLUMNS)]


def _geometry(ok: pd.DataFrame, keys) -> pd.DataFrame:
    """The geometry columns of the summary (NaN where the table lacks or never measured a column)."""
    measured = _numeric(ok, [BLENDSHAPE_COLUMNS[0]]).notna().iloc[:, 0].astype(np.int64)
    parts = [measured.groupby(keys, sort=False).sum().rename("geometry_frames")]
    deg = np.degrees(_numeric(ok, ANGLE_COLUMNS)).groupby(keys, sort=False)
    mean, sd = deg.mean(), deg.std(ddof=0)
    angles = pd.concat([mean.add_suffix("_deg_mean"), sd.add_suffix("_deg_sd")], axis=1)
    parts.append(angles[list(ANGLE_DEG_COLUMNS)])
    rest = _numeric(ok, [*AU_INTENSITY_COLUMNS, *BLENDSHAPE_COLUMNS]).groupby(keys, sort=False).mean()
    parts.append(rest.add_suffix("_mean"))
    return pd.concat(parts, axis=1)


def top_blendshapes(summary_row: Mapping, k: int = 5, min_mean: float = 0.05) -> list[tuple[str, float]]:
    """A face's ``k`` most active blendshapes, as (name without ``bs_``, mean), by mean value over its
    measured frames; ``_neutral`` (the absence of expression) is left out, and so are means below
    ``min_mean``. Empty for a face (or table) without blendshapes."""
    found = []
    for c in BLENDSHAPE_COLUMNS[1:]:
        v = float(summary_row.get(f"{c}_mean", math.nan))
        if math.isfinite(v) and v >= min_mean:
            found.append((c[3:], v))
    return sorted(found, key=lambda kv: -kv[1])[:k]


__all__ = ["GEOMETRY_SUMMARY_COLUMNS", "SUMMARY_COLUMNS", "summarize", "top_blendshapes"]
