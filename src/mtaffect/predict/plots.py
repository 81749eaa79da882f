"""Timeline figure per face track: valence/arousal curves, expression probabilities, AU heat map.

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
from mtaffect.schema import AU_OPENFACE_NAMES, EXPR_NAMES

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


def _figure_lib():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def face_timeline(table: pd.DataFrame, file: str, face_id: int):
    """(x, x_label, rows) for one face: x over all analysed frames of ``file``; rows reindexed (NaN gaps)."""
    rows_file = table[table["file"] == file]
    frames = np.unique(rows_file["frame"].to_numpy())
    times = rows_file.groupby("frame")["time"].first().reindex(frames).to_numpy(np.float64)
    face = (
        rows_file[rows_file["face_id"] == face_id].drop_duplicates("frame").set_index("frame").reindex(frames)
    )
    if np.isfinite(times).all() and len(times):
        return times, "time (s)", face
    return frames.astype(np.float64), "frame", face


def timeline_figure(table: pd.DataFrame, file: str, face_id: int):
    """A matplotlib Figure: VA (top), expression probabilities (middle), AU probabilities (bottom)."""
    plt = _figure_lib()
    x, xlabel, face = face_timeline(table, file, face_id)
    fig, axes = plt.subplots(
        3,
        1,
        figsize=(11, 7.2),
        sharex=True,
        gridspec_kw={"height_ratios": [1.1, 1.0, 1.5]},
        layout="constrained",
    )
    ax_va, ax_ex, ax_au = axes
    present = face["success"].to_numpy(np.float64) == 1
    share = present.mean() if len(present) else 0.0
    fig.suptitle(
        f"{Path(file).name} — face {face_id}  ({present.sum()} of {len(x)} analysed frames, "
        f"{100 * share:.0f}%)",
        fontsize=12,
    )

    ax_va.axhline(0, color="#888", lw=0.8)
    ax_va.plot(x, face["valence"].to_numpy(np.float64), color="#2ca02c", lw=1.6, label="valence")
    ax_va.plot(x, face["arousal"].to_numpy(np.float64), color="#ff7f0e", lw=1.6, ls="--", label="arousal")
    ax_va.set_ylim(-1.05, 1.05)
    ax_va.set_ylabel("valence / arousal")
    ax_va.legend(loc="upper left", ncols=2, fontsize=9, frameon=False)
    ax_va.grid(alpha=0.3)

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

    au = face[list(AU_P_COLUMNS)].to_numpy(np.float64).T  # (12, T)
    edges = _edges(x)
    mesh = ax_au.pcolormesh(
        edges,
        np.arange(len(AU_OPENFACE_NAMES) + 1),
        np.ma.masked_invalid(au),
        cmap="viridis",
        vmin=0,
        vmax=1,
        shading="flat",
    )
    ax_au.set_facecolor("#f0f0f0")
    ax_au.set_yticks(np.arange(len(AU_OPENFACE_NAMES)) + 0.5, AU_OPENFACE_NAMES, fontsize=8)
    ax_au.invert_yaxis()
    ax_au.set_ylabel("action unit")
    ax_au.set_xlabel(xlabel)
    fig.colorbar(mesh, ax=ax_au, label="P(AU)", pad=0.01, fraction=0.03)
    ax_au.set_xlim(edges[0], edges[-1])
    return fig


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
    out = {}
    rows = table[(table["file"] == file) & (table["success"] == 1)]
    counts = rows.groupby("face_id").size()
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
