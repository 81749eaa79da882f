"""One self-contained HTML page per run: inputs, summary statistics per face, timelines, the model.

Everything is inline (CSS, pictures as base64 data URIs): the file can be mailed or archived and opens
offline. Values are HTML-escaped; nothing is fetched. Each face has a thumbnail (its most confident
detection, :mod:`mtaffect.predict.thumbnails`) so a row can be matched to a person; the per-face
figures are :func:`mtaffect.predict.summary.summarize`'s, the same numbers ``mtaffect.summarize(df)``
returns in Python.

Facial geometry, where the table has it: head pose and gaze in degrees (the table holds radians), mean
AU intensities beside the AU probabilities, the most active blendshapes, and their timelines
(:mod:`mtaffect.predict.plots`). A table without those columns gives the page it always gave.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mtaffect.io import atomic_open
from mtaffect.predict.outputs import AU_C_COLUMNS, EXPR_P_COLUMNS
from mtaffect.predict.plots import EXPR_COLOURS
from mtaffect.predict.sources import SourceInfo
from mtaffect.predict.summary import (
    AU_ACTIVE_COLUMNS,
    AU_MEAN_COLUMNS,
    EXPR_SHARE_COLUMNS,
    GAZE_DEG_MEAN_COLUMNS,
    GAZE_DEG_SD_COLUMNS,
    POSE_DEG_MEAN_COLUMNS,
    POSE_DEG_SD_COLUMNS,
    summarize,
    top_blendshapes,
)
from mtaffect.schema import (
    AU_INTENSITY_NAMES,
    AU_OPENFACE_NAMES,
    BLENDSHAPE_COLUMNS,
    EXPR_NAMES,
    GAZE_COLUMNS,
    POSE_ANGLE_NAMES,
    POSE_COLUMNS,
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1150px;
color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{margin-bottom:.3em}.muted{color:#666;font-size:.92em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.card{background:#fafafa;border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px;margin:10px 0}
.bar{display:inline-block;height:10px;vertical-align:middle;margin-right:1px}
.err{color:#b00020}img{max-width:100%;border:1px solid #eee}
.chip{display:inline-block;padding:1px 7px;border-radius:9px;font-size:.85em;margin:1px;color:#111}
img.thumb{width:72px;height:72px;border-radius:4px;vertical-align:middle;margin-right:8px}
"""


@dataclass
class ReportInput:
    """What the report shows for one input: its description, its rows, its timelines, its output files."""

    info: SourceInfo
    table: pd.DataFrame
    pngs: Mapping[int, bytes] = field(default_factory=dict)
    seconds: float = 0.0
    analysed: int = 0
    outputs: Sequence[str] = ()
    error: str | None = None
    #: {face_id: JPEG bytes}; None: made from the input file when the report is rendered.
    thumbs: Mapping[int, bytes] | None = None


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _deg(x, digits: int = 1) -> str:
    """An angle already in degrees: ``28.6°``, or ``–`` when missing."""
    return f"{float(x):.{digits}f}°" if _finite(x) else "–"


def _angles(s: Mapping, names, means, sds) -> str:
    """``pitch <b>28.6°</b> ± 1.2 · yaw ...``; empty when no angle is measured."""
    if not any(_finite(s.get(c)) for c in means):
        return ""
    return " · ".join(
        f"{n} <b>{_deg(s.get(m))}</b> ± {_fmt(float(s.get(d, math.nan)), 1)}"
        for n, m, d in zip(names, means, sds, strict=True)
    )


def _geometry_card(s: Mapping) -> str:
    """The lines of a face's card about its geometry (head pose, gaze, blendshapes); empty without."""
    lines = []
    pose = _angles(s, POSE_ANGLE_NAMES, POSE_DEG_MEAN_COLUMNS, POSE_DEG_SD_COLUMNS)
    if pose:
        lines.append(f"head pose (degrees, mean ± sd): {pose}")
    gaze = _angles(s, ("x", "y"), GAZE_DEG_MEAN_COLUMNS, GAZE_DEG_SD_COLUMNS)
    if gaze:
        lines.append(f"gaze (degrees): {gaze}")
    measured = s.get("geometry_frames", 0)
    if _finite(measured) and measured > 0:
        top = top_blendshapes(s)
        active = ", ".join(f"{_e(n)} {v:.2f}" for n, v in top) or "none above 0.05"
        lines.append(
            f"facial geometry measured in {int(measured)} of {int(s['frames'])} frames · "
            f"most active blendshapes (mean): {active}"
        )
    return "".join(f"{line}<br>" for line in lines)


def _thumb(inp: ReportInput, fid: int) -> str:
    data = (inp.thumbs or {}).get(fid)
    if not data:
        return ""
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="thumb" alt="face {fid}" src="data:image/jpeg;base64,{b64}">'


def _meta_table(inp: ReportInput) -> str:
    i = inp.info
    t = inp.table
    frames = t["frame"].nunique() if len(t) else 0
    with_face = t.loc[t["success"] == 1, "frame"].nunique() if len(t) else 0
    ids = sorted(int(x) for x in t.loc[t["success"] == 1, "face_id"].unique()) if len(t) else []
    rows = [("kind", i.kind), ("resolution", f"{i.width} x {i.height}" if i.width else "–")]
    if i.kind in ("video", "stream"):
        rows += [
            ("codec", i.codec or "–"),
            ("average frame rate", f"{_fmt(i.fps)} frames/s"),
            ("duration", f"{_fmt(i.duration)} s"),
            ("analysed", "every frame" if i.every == 1 else f"every {i.every}th frame"),
        ]
    if i.ended_early:
        rows.append(("ended early", i.ended_early))
    if i.unreadable:
        rows.append(("unreadable frames", f"{len(i.unreadable)} skipped, e.g. {i.unreadable[0][1]}"))
    rows += [
        ("analysed frames", f"{frames}"),
        ("frames with a face", f"{with_face} ({100 * with_face / frames:.0f}%)" if frames else "0"),
        ("face ids", ", ".join(map(str, ids)) or "none"),
        (
            "processing",
            f"{inp.seconds:.1f} s ({inp.analysed / inp.seconds:.1f} frames/s)" if inp.seconds > 0 else "–",
        ),
    ]
    if inp.outputs:
        rows.append(("outputs", "<br>".join(_e(o) for o in inp.outputs)))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v if k == 'outputs' else _e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _expr_bar(shares: Mapping[str, float]) -> str:
    parts = []
    for n in EXPR_NAMES:
        w = shares.get(n, 0.0)
        if w > 0:
            parts.append(
                f'<span class="bar" title="{_e(n)} {100 * w:.0f}%" '
                f'style="width:{max(1, round(300 * w))}px;background:{EXPR_COLOURS[n]}"></span>'
            )
    chips = "".join(
        f'<span class="chip" style="background:{EXPR_COLOURS[n]}">{_e(n)} {100 * w:.0f}%</span>'
        for n, w in sorted(shares.items(), key=lambda kv: -kv[1])
        if w >= 0.01
    )
    return "".join(parts) + "<br>" + chips


def _span(s: Mapping) -> str:
    """When a face is in view: seconds when the frames have times, else frame numbers."""
    if math.isfinite(s["first_time"]) and math.isfinite(s["last_time"]):
        return f"seen {s['first_time']:.2f}–{s['last_time']:.2f} s"
    return f"seen in frames {s['first_frame']}–{s['last_frame']}"


def _face_block(inp: ReportInput, s: Mapping) -> str:
    fid = int(s["face_id"])
    shares = {n: float(s[c]) for n, c in zip(EXPR_NAMES, EXPR_SHARE_COLUMNS, strict=True)}
    rate = {n: float(s[c]) for n, c in zip(AU_OPENFACE_NAMES, AU_ACTIVE_COLUMNS, strict=True)}
    au_cells = "".join(f"<th>{_e(n)}</th>" for n in AU_OPENFACE_NAMES)
    au_rate = "".join(f'<td class="num">{100 * rate[n]:.0f}%</td>' for n in AU_OPENFACE_NAMES)
    au_p = "".join(f'<td class="num">{float(s[c]):.2f}</td>' for c in AU_MEAN_COLUMNS)
    top = sorted(rate.items(), key=lambda kv: -kv[1])
    active = ", ".join(f"{n} ({100 * r:.0f}%)" for n, r in top if r >= 0.5) or "none above 50% of frames"
    intensity = {n: s.get(f"{n}_r_mean", math.nan) for n in AU_INTENSITY_NAMES}
    au_r = ""
    if any(_finite(v) for v in intensity.values()):
        au_r = (
            "<tr><th>mean intensity (0–5)</th>"
            + "".join(
                f'<td class="num">{_fmt(float(intensity[n])) if n in intensity else "–"}</td>'
                for n in AU_OPENFACE_NAMES
            )
            + "</tr>"
        )
    out = [
        f"<h3>{_thumb(inp, fid)}Face {fid}</h3>",
        '<div class="card">',
        f"<b>{int(s['frames'])}</b> of {inp.table['frame'].nunique()} analysed frames, {_span(s)} · "
        f"mean detection confidence {_fmt(float(s['confidence']), 3)}<br>",
        f"valence <b>{_fmt(float(s['valence_mean']))}</b> ± {_fmt(float(s['valence_sd']))} · "
        f"arousal <b>{_fmt(float(s['arousal_mean']))}</b> ± {_fmt(float(s['arousal_sd']))}<br>",
        f"expression (share of frames): {_expr_bar(shares)}<br>",
        _geometry_card(s),
        f"AUs active in most frames: {_e(active)}</div>",
        f"<table><tr><th></th>{au_cells}</tr><tr><th>active</th>{au_rate}</tr>"
        f"<tr><th>mean P</th>{au_p}</tr>{au_r}</table>",
    ]
    if fid in inp.pngs:
        b64 = base64.b64encode(inp.pngs[fid]).decode("ascii")
        out.append(f'<img alt="timeline of face {fid}" src="data:image/png;base64,{b64}">')
    return "\n".join(part for part in out if part)


def _measured(inputs: Sequence[ReportInput], columns) -> bool:
    """Whether any face row of ``inputs`` has a value in one of ``columns``."""
    for inp in inputs:
        t = inp.table
        cols = [c for c in columns if c in t.columns]
        if cols and len(t) and t.loc[t["success"] == 1, cols].notna().to_numpy().any():
            return True
    return False


def _still_geometry(r: Mapping, pose: bool, gaze: bool, bs: bool) -> str:
    """The geometry cells of one still's face row: pose and gaze in degrees, its top blendshapes."""
    cells = []
    if pose:
        cells.append(" / ".join(_deg(math.degrees(float(r.get(c, math.nan)))) for c in POSE_COLUMNS))
    if gaze:
        cells.append(" / ".join(_deg(math.degrees(float(r.get(c, math.nan)))) for c in GAZE_COLUMNS))
    if bs:
        vals = [(c[3:], float(r.get(c, math.nan))) for c in BLENDSHAPE_COLUMNS[1:]]
        top = sorted(((n, v) for n, v in vals if math.isfinite(v) and v >= 0.05), key=lambda kv: -kv[1])[:3]
        cells.append(", ".join(f"{n} {v:.2f}" for n, v in top) or "–")
    return "".join(f"<td>{_e(c)}</td>" for c in cells)


def _stills_table(inputs: Sequence[ReportInput]) -> str:
    """One line per face of still images (folders can hold hundreds: a table, not sections); head pose,
    gaze and blendshape columns where some table has them."""
    pose, gaze = _measured(inputs, POSE_COLUMNS), _measured(inputs, GAZE_COLUMNS)
    bs = _measured(inputs, BLENDSHAPE_COLUMNS)
    extra = (
        ("<th>head pose (°)<br>pitch / yaw / roll</th>" if pose else "")
        + ("<th>gaze (°)<br>x / y</th>" if gaze else "")
        + ("<th>top blendshapes</th>" if bs else "")
    )
    head = (
        "<tr><th>image</th><th>face</th><th></th><th>confidence</th><th>expression</th><th>valence</th>"
        f"<th>arousal</th><th>active AUs</th>{extra}</tr>"
    )
    lines = []
    for inp in inputs:
        t = inp.table
        if not len(t) or not (t["success"] == 1).any():
            lines.append(
                f"<tr><td>{_e(Path(inp.info.file).name)}</td>"
                f"<td colspan={7 + pose + gaze + bs} class=muted>no face found</td></tr>"
            )
            continue
        for _, r in t[t["success"] == 1].iterrows():
            aus = ", ".join(n for n, c in zip(AU_OPENFACE_NAMES, AU_C_COLUMNS, strict=True) if r[c] == 1)
            p = max(r[c] for c in EXPR_P_COLUMNS)
            lines.append(
                f"<tr><td>{_e(Path(inp.info.file).name)}</td><td>{int(r['face_id'])}</td>"
                f"<td>{_thumb(inp, int(r['face_id']))}</td>"
                f'<td class="num">{r["confidence"]:.3f}</td>'
                f'<td><span class="chip" style="background:{EXPR_COLOURS.get(r["expression"], "#eee")}">'
                f"{_e(r['expression'])}</span> {p:.2f}</td>"
                f'<td class="num">{r["valence"]:.2f}</td><td class="num">{r["arousal"]:.2f}</td>'
                f"<td>{_e(aus) or '–'}</td>{_still_geometry(r, pose, gaze, bs)}</tr>"
            )
    return f"<table>{head}{''.join(lines)}</table>"


def _model_card(card: Mapping[str, str]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in card.items())
    return f"<table>{body}</table>"


def render_report(
    inputs: Sequence[ReportInput],
    model_card: Mapping[str, str],
    settings: Mapping[str, object] | None = None,
    title: str = "mtaffect prediction report",
) -> str:
    """The HTML page as a string."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ok = [i for i in inputs if i.error is None]
    failed = [i for i in inputs if i.error is not None]
    for i in ok:
        if i.thumbs is None:
            from mtaffect.predict.thumbnails import face_thumbnails

            i.thumbs = face_thumbnails(i.info, i.table)
    stills = [i for i in ok if i.info.kind == "image"]
    clips = [i for i in ok if i.info.kind != "image"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{len(inputs)} input(s), {len(failed)} failed · generated {now} by mtaffect</p>',
        "<h2>Model</h2>",
        _model_card(model_card),
    ]
    if settings:
        parts.append(
            '<p class="muted">settings: ' + _e(", ".join(f"{k}={v}" for k, v in settings.items())) + "</p>"
        )
    parts.append(
        '<p class="muted">Columns and conventions: valence/arousal in [-1, 1]; expression shares count the '
        "frames where a class is the most probable; an AU is active where its probability reaches its "
        "threshold. A face keeps its id within a file while it stays in view, and gets it back when it "
        "returns within the re-identification memory (by appearance). Head pose and gaze are shown in "
        "degrees (the table holds radians, OpenFace's convention: pitch &gt; 0 head down, yaw &gt; 0 turned "
        "to the person's right, roll &gt; 0 clockwise in the image); AU intensities are on OpenFace's 0–5 "
        "scale and blendshapes (MediaPipe's) in [0, 1].</p>"
    )
    if failed:
        items = "".join(f"<li class=err>{_e(i.error)}</li>" for i in failed)
        parts.append(f"<h2>Failed inputs ({len(failed)})</h2><ul>{items}</ul>")
    for inp in clips:
        parts.append(f"<h2>{_e(Path(inp.info.file).name)}</h2>")
        if inp.info.ended_early:
            parts.append(f'<p class="err">Ended early: {_e(inp.info.ended_early)}</p>')
        parts.append(f'<p class="muted">{_e(inp.info.file)}</p>')
        parts.append(_meta_table(inp))
        summary = summarize(inp.table).sort_values("face_id", kind="stable")
        if not len(summary):
            parts.append("<p>No face was found in this input.</p>")
        for _, s in summary.iterrows():
            parts.append(_face_block(inp, s))
    if stills:
        parts.append(f"<h2>Images ({len(stills)})</h2>")
        parts.append(_stills_table(stills))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike,
    inputs: Sequence[ReportInput],
    model_card: Mapping[str, str],
    settings: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the page atomically."""
    with atomic_open(path, "w", overwrite=overwrite, encoding="utf-8") as fh:
        fh.write(render_report(inputs, model_card, settings))
    return Path(path)


__all__ = ["ReportInput", "render_report", "write_report"]
