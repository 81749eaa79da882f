"""Timeline figure per face track: valence/arousal curves, expression probabilities, AU heat map, and the
facial geometry where the table has it.

The geometry panels appear only for a face with measured values in their columns (a table of an earlier
version, or made with ``--landmarks none``, gives the three panels it always gave): AU intensities
(``AUxx_r``, 0-5), head pose and gaze in degrees (the table holds radians), and the
:data:`TOP_BLENDSHAPES` blendshapes that vary most over the face's frames (not all 52).

Matplotlib with the Agg backend (no display needed). Frames where the face is absent stay blank (the
curves break, the heat map shows the background), so gaps are visible rather than interpolated over.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mtaffect.io import atomic_path
from mtaffect.predict.outputs import AU_P_COLUMNS, EXPR_P_COLUMNS
from mtaffect.schema import (
    AU_INTENSITY_COLUMNS,
    AU_INTENSITY_NAMES,
    AU_OPENFACE_NAMES,
    BLENDSHAPE_COLUMNS,
    EXPR_NAMES,
    GAZE_COLUMNS,
    POSE_ANGLE_NAMES,
    POSE_COLUMNS,
)

#: One colour per expression class (schema order), chosen to be told apart and to read as the emotion.
EXPR_COLOURS: dict[str, str] = {
    "Neutral": "#9e9e9e",
    "Anger": "#d62728",
    "Disgust": "#8c564b",
    "Fear": "#9467bd",
    "Happiness": "#f2b705",
    "Sadness": "#1f77b4",
    "Surprise": "#17becf",
    "Other": "#c7c7c7",
}

#: Blendshape rows of a timeline: the ones with the largest variance over the face's frames.
TOP_BLENDSHAPES = 8
#: (column, legend label, colour, line style) of the angle panel: head pose solid, gaze dashed.
ANGLE_LINES: tuple[tuple[str, str, str, str], ...] = (
    (POSE_COLUMNS[0], POSE_ANGLE_NAMES[0], "#1f77b4", "-"),
    (POSE_COLUMNS[1], POSE_ANGLE_NAMES[1], "#d62728", "-"),
    (POSE_COLUMNS[2], POSE_ANGLE_NAMES[2], "#2ca02c", "-"),
    (GAZE_COLUMNS[0], "gaze x", "#9467bd", "--"),
    (GAZE_COLUMNS[1], "gaze y", "#8c564b", "--"),
)
ANGLE_COLUMNS: tuple[str, ...] = tuple(c for c, *_ in ANGLE_LINES)
#: The columns a timeline reads.
_TIMELINE_COLUMNS: tuple[str, ...] = (
    "file",
    "frame",
    "time",
    "face_id",
    "success",
    "valence",
    "arousal",
    *EXPR_P_COLUMNS,
    *AU_P_COLUMNS,
    *AU_INTENSITY_COLUMNS,
    *ANGLE_COLUMNS,
    *BLENDSHAPE_COLUMNS,
)
#: Relative height of each panel kind.
_HEIGHTS = {"va": 1.1, "expr": 1.0, "au": 1.5, "au_r": 1.0, "angles": 1.1, "bs": 1.3}


def _figure_lib():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def face_timeline(table: pd.DataFrame, file: str, face_id: int):
    """(x, x_label, rows) for one face: x over all analysed frames of ``file``; rows reindexed (NaN gaps)."""
    cols = [c for c in _TIMELINE_COLUMNS if c in table.columns]  # not the dense landmarks: no copy of them
    rows_file = table.loc[table["file"] == file, cols]
    frames = np.unique(rows_file["frame"].to_numpy())
    times = rows_file.groupby("frame")["time"].first().reindex(frames).to_numpy(np.float64)
    face = (
        rows_file[rows_file["face_id"] == face_id].drop_duplicates("frame").set_index("frame").reindex(frames)
    )
    if np.isfinite(times).all() and len(times):
        return times, "time (s)", face
    return frames.astype(np.float64), "frame", face


def _values(face: pd.DataFrame, columns) -> np.ndarray:
    """(len(face), len(columns)) float64; a column the table lacks is NaN."""
    out = np.full((len(face), len(columns)), np.nan)
    for j, c in enumerate(columns):
        if c in face.columns:
            out[:, j] = pd.to_numeric(face[c], errors="coerce").to_numpy(np.float64)
    return out


def varying_blendshapes(face: pd.DataFrame, k: int = TOP_BLENDSHAPES) -> list[str]:
    """The ``k`` blendshape columns of ``face`` (rows of one face) with the largest variance over its
    measured frames, most variable first, ties by the higher mean (``bs__neutral`` left out: it is the
    absence of the others); empty when none is measured."""
    cols = [c for c in BLENDSHAPE_COLUMNS[1:] if c in face.columns]
    if not cols:
        return []
    v = _values(face, cols)
    measured = np.isfinite(v).any(0)
    if not measured.any():
        return []
    filled = np.where(measured, v, 0.0)  # an unmeasured column: no all-NaN warning, then left out
    var = np.where(measured, np.round(np.nanvar(filled, axis=0), 12), -np.inf)
    mean = np.nanmean(filled, axis=0)
    order = np.lexsort((-mean, -var))  # most varying first; equal variance: the more active first
    return [cols[i] for i in order[:k] if measured[i]]


def _panels(face: pd.DataFrame) -> list[str]:
    """The panels of a face's timeline: the three of every table, then the geometry ones it has."""
    panels = ["va", "expr", "au"]

    def has(columns) -> bool:
        return bool(np.isfinite(_values(face, columns)).any())

    if has(AU_INTENSITY_COLUMNS):
        panels.append("au_r")
    if has(ANGLE_COLUMNS):
        panels.append("angles")
    if varying_blendshapes(face, 1):
        panels.append("bs")
    return panels


def timeline_figure(table: pd.DataFrame, file: str, face_id: int):
    """A matplotlib Figure: VA (top), expression probabilities, AU probabilities, and where the table
    has them, AU intensities, head pose and gaze (degrees) and the most varying blendshapes."""
    plt = _figure_lib()
    x, xlabel, face = face_timeline(table, file, face_id)
    panels = _panels(face)
    heights = [_HEIGHTS[p] for p in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 2.0 * sum(heights)),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    ax = dict(zip(panels, axes, strict=True))
    present = face["success"].to_numpy(np.float64) == 1
    share = present.mean() if len(present) else 0.0
    fig.suptitle(
        f"{Path(file).name} — face {face_id}  ({present.sum()} of {len(x)} analysed frames, "
        f"{100 * share:.0f}%)",
        fontsize=12,
    )

    ax_va = ax["va"]
    ax_va.axhline(0, color="#888", lw=0.8)
    ax_va.plot(x, face["valence"].to_numpy(np.float64), color="#2ca02c", lw=1.6, label="valence")
    ax_va.plot(x, face["arousal"].to_numpy(np.float64), color="#ff7f0e", lw=1.6, ls="--", label="arousal")
    ax_va.set_ylim(-1.05, 1.05)
    ax_va.set_ylabel("valence / arousal")
    ax_va.legend(loc="upper left", ncols=2, fontsize=9, frameon=False)
    ax_va.grid(alpha=0.3)

    ax_ex = ax["expr"]
    probs = face[list(EXPR_P_COLUMNS)].to_numpy(np.float64)
    colours = [EXPR_COLOURS[n] for n in EXPR_NAMES]
    for k, (a, b) in enumerate(_segments(present)):  # one stack per stretch in view: gaps stay empty
        seg_x = x[a:b] if b - a > 1 else np.array([x[a] - 0.5 * _step(x), x[a] + 0.5 * _step(x)])
        seg_p = probs[a:b] if b - a > 1 else np.repeat(probs[a:b], 2, axis=0)
        ax_ex.stackplot(seg_x, seg_p.T, colors=colours, labels=list(EXPR_NAMES) if k == 0 else ())
    ax_ex.set_facecolor("#f0f0f0")  # as the AU panel: grey where the face is not in view
    ax_ex.set_ylim(0, 1)
    ax_ex.set_ylabel("expression\nprobability")
    ax_ex.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=len(EXPR_NAMES),
        fontsize=8,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.0,
    )

    edges = _edges(x)
    au = face[list(AU_P_COLUMNS)].to_numpy(np.float64).T  # (12, T)
    _heatmap(fig, ax["au"], edges, au, AU_OPENFACE_NAMES, 1.0, "action unit", "P(AU)")
    if "au_r" in ax:
        au_r = _values(face, AU_INTENSITY_COLUMNS).T  # (7, T)
        _heatmap(
            fig,
            ax["au_r"],
            edges,
            au_r,
            AU_INTENSITY_NAMES,
            5.0,
            "AU intensity",
            "intensity (0–5)",
            cmap="magma",
        )
    if "angles" in ax:
        ax_an = ax["angles"]
        ax_an.axhline(0, color="#888", lw=0.8)
        for col, label, colour, style in ANGLE_LINES:
            if col in face.columns:
                deg = np.degrees(pd.to_numeric(face[col], errors="coerce").to_numpy(np.float64))
                if np.isfinite(deg).any():
                    ax_an.plot(x, deg, color=colour, ls=style, lw=1.4, label=label)
        ax_an.set_ylabel("head pose / gaze\n(degrees)")
        ax_an.legend(loc="upper left", ncols=5, fontsize=9, frameon=False)
        ax_an.grid(alpha=0.3)
    if "bs" in ax:
        cols = varying_blendshapes(face)
        _heatmap(
            fig,
            ax["bs"],
            edges,
            _values(face, cols).T,
            [c[3:] for c in cols],
            1.0,
            "blendshapes\n(most varying)",
            "blendshape",
            cmap="cividis",
        )
    axes[-1].set_xlabel(xlabel)
    axes[-1].set_xlim(edges[0], edges[-1])
    return fig


def _heatmap(fig, ax, edges, values, labels, vmax: float, ylabel: str, bar: str, cmap: str = "viridis"):
    """Rows of ``values`` (k, T) as a heat map over the cell ``edges``; NaN shows the grey background."""
    mesh = ax.pcolormesh(
        edges,
        np.arange(len(labels) + 1),
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=0,
        vmax=vmax,
        shading="flat",
    )
    ax.set_facecolor("#f0f0f0")
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_ylabel(ylabel)
    fig.colorbar(mesh, ax=ax, label=bar, pad=0.01, fraction=0.03)


def _segments(present: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive True values."""
    d = np.diff(np.concatenate([[0], present.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def _step(x: np.ndarray) -> float:
    return float(np.median(np.diff(x))) if len(x) > 1 else 1.0


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sample positions (midpoints; half a step beyond the ends)."""
    x = np.asarray(x, np.float64)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = _figure_lib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def face_ids(table: pd.DataFrame, file: str) -> list[int]:
    ids = table.loc[(table["file"] == file) & (table["success"] == 1), "face_id"].unique()
    return sorted(int(i) for i in ids)


def timeline_pngs(table: pd.DataFrame, file: str, min_frames: int = 2) -> dict[int, bytes]:
    """PNG bytes per face id of one file (faces seen in fewer than ``min_frames`` frames are skipped)."""
    out: dict[int, bytes] = {}
    rows = table.loc[(table["file"] == file) & (table["success"] == 1), "face_id"]
    counts = rows.groupby(rows).size()
    if table.loc[table["file"] == file, "frame"].nunique() < 2:
        return out  # a still image: no timeline
    for fid in face_ids(table, file):
        if counts.get(fid, 0) >= min_frames:
            out[fid] = figure_png(timeline_figure(table, file, fid))
    return out


def write_png(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)
