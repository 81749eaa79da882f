"""Per-face summary of a prediction table: what the HTML report shows, as a DataFrame.

``mtaffect.summarize(df)`` (this module's :func:`summarize`) gives one row per (file, face id) with:

- ``file``, ``face_id``, ``frames`` (analysed frames with this face), ``first_frame``, ``last_frame``,
  ``first_time``, ``last_time`` (seconds; NaN for stills), ``confidence`` (mean detector probability);
- ``valence_mean``, ``valence_sd``, ``arousal_mean``, ``arousal_sd`` (population standard deviation);
- ``expression``: the most frequent expression label; ``<Expression>_share``: the share of the face's
  frames where that class is the most probable; ``<Expression>_p_mean``: its mean probability;
- ``<AU>_active``: the share of frames where the AU is active (probability >= its threshold, the table's
  ``AUxx_c``); ``<AU>_p_mean``: its mean probability;
- ``pose_Rx_mean``, ``pose_Ry_mean``, ``pose_Rz_mean``: mean head pose (radians).

Rows are in the table's order of first appearance. A table without any face gives an empty frame with
these columns.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pandas as pd

from mtaffect.schema import (
    AU_DECISION_COLUMNS,
    AU_OPENFACE_NAMES,
    AU_PROB_COLUMNS,
    EXPR_NAMES,
    EXPR_PROB_COLUMNS,
    POSE_COLUMNS,
)

EXPR_SHARE_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_share" for n in EXPR_NAMES)
EXPR_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in EXPR_PROB_COLUMNS)
AU_ACTIVE_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_active" for n in AU_OPENFACE_NAMES)
AU_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in AU_PROB_COLUMNS)
POSE_MEAN_COLUMNS: Final[tuple[str, ...]] = tuple(f"{c}_mean" for c in POSE_COLUMNS)
SUMMARY_COLUMNS: Final[tuple[str, ...]] = (
    "file", "face_id", "frames", "first_frame", "last_frame", "first_time", "last_time", "confidence",
    "valence_mean", "valence_sd", "arousal_mean", "arousal_sd", "expression",
    *EXPR_SHARE_COLUMNS, *EXPR_MEAN_COLUMNS, *AU_ACTIVE_COLUMNS, *AU_MEAN_COLUMNS, *POSE_MEAN_COLUMNS,
)  # fmt: skip


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (file, face_id) of ``table`` (a prediction table from ``Predictor.predict`` or
    ``mtaffect.predict.read_table``); see the module docstring for the columns."""
    missing = [c for c in ("file", "face_id", "success", "frame", "expression") if c not in table.columns]
    if missing:
        raise ValueError(f"not a prediction table (missing {missing}); pass what Predictor.predict returns")
    ok = table[table["success"] == 1]
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
    onehot = pd.DataFrame((labels[:, None] == np.array(EXPR_NAMES, dtype=object)[None]).astype(np.float64),
                          columns=list(EXPR_SHARE_COLUMNS), index=ok.index)  # fmt: skip
    keys = [ok["file"], ok["face_id"]]
    shares = onehot.groupby(keys, sort=False).mean()
    # Most frequent label; ties go to the class listed first in the schema.
    out["expression"] = np.array(EXPR_NAMES, dtype=object)[shares.to_numpy().argmax(1)]
    active = ok[list(AU_DECISION_COLUMNS)].astype("float64").groupby(keys, sort=False).mean()
    active.columns = list(AU_ACTIVE_COLUMNS)
    means = ok[[*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, *POSE_COLUMNS]].groupby(keys, sort=False).mean()
    means.columns = [*EXPR_MEAN_COLUMNS, *AU_MEAN_COLUMNS, *POSE_MEAN_COLUMNS]
    out = pd.concat([out, shares, active, means], axis=1).reset_index()
    return out[list(SUMMARY_COLUMNS)]


__all__ = ["SUMMARY_COLUMNS", "summarize"]
