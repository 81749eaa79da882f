"""One table, one summary and one index page over every file a per-file run finished in a folder.

``mtaffect collect OUT`` (and ``predict --combine`` / ``--report`` when the last file of a run is done)
reads the job records of ``OUT`` (:mod:`mtaffect.predict.claims`), whatever number of processes or
machines wrote them, and writes:

- ``OUT/combined.<fmt>``: the tables of the files that are ``done``, in the order of their source paths
  (so the same files give the same bytes however the work was split);
- ``OUT/combined_summary.csv``: :func:`mtaffect.summarize` of it (one row per file and face);
- with ``report``: ``OUT/report.html``, an index with one row per file (its status, frames, faces,
  dominant expression, mean valence/arousal, and a link to its own page when it has one).

These names are never a file's (:data:`mtaffect.predict.archive.RESERVED_STEMS`). They are replaced
only when the folder's ``OUT/.mtaffect-jobs/collect.json`` says a collect wrote them (or with
``overwrite``): a user's file of the same name is never replaced silently.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pandas as pd

from mtaffect.io import atomic_open
from mtaffect.predict.claims import JobRecords, records_dir
from mtaffect.predict.outputs import check_format, read_table, write_table
from mtaffect.predict.report import CSS
from mtaffect.predict.summary import summarize

COLLECT_RECORD: Final[str] = "collect.json"
SUMMARY_NAME: Final[str] = "combined_summary.csv"
INDEX_NAME: Final[str] = "report.html"


def combined_names(fmt: str, report: bool, combine: bool = True) -> list[str]:
    """The files a collect writes in the folder: the combined table and summary, the index page."""
    table = [f"combined.{check_format(fmt)}", SUMMARY_NAME] if combine else []
    return [*table, *([INDEX_NAME] if report else [])]


def _ours(out: Path) -> set[str]:
    try:
        rec = json.loads((records_dir(out) / COLLECT_RECORD).read_text(encoding="utf-8"))
        return set(rec.get("written", []))
    except (OSError, ValueError, AttributeError):
        return set()


def check_collect_outputs(
    out: str | os.PathLike, fmt: str, report: bool, overwrite: bool, combine: bool = True
) -> None:
    """Refuse (before any work) combined outputs that would replace a file no collect wrote."""
    out = Path(out)
    ours = _ours(out)
    for name in combined_names(fmt, report, combine):
        p = out / name
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a folder where the combined output goes; move it away")
        if p.exists() and name not in ours and not overwrite:
            raise FileExistsError(
                f"{p} already exists and no collect wrote it; pass --overwrite to replace it"
            )


@dataclass
class Collected:
    """What a collect found and wrote."""

    done: list[str] = field(default_factory=list)  # table names, in the combined order
    failed: dict[str, str] = field(default_factory=dict)  # table name -> error
    running: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # killed runs: rerun to resume
    rows: int = 0
    written: list[Path] = field(default_factory=list)


def collect(
    out: str | os.PathLike,
    fmt: str = "csv",
    report: bool = False,
    overwrite: bool = False,
    combine: bool = True,
) -> Collected:
    """Combine every finished file of ``out`` (see the module docstring): the combined table and summary
    (``combine``) and the index page (``report``). No finished file is an error."""
    out = Path(out)
    fmt = check_format(fmt)
    if not out.is_dir():
        raise NotADirectoryError(f"{out}: not a folder of predict outputs")
    check_collect_outputs(out, fmt, report, overwrite, combine)
    records = JobRecords(out)
    found = Collected()
    done = []
    for name, rec in records.all().items():
        status = rec.get("status")
        if status == "done" and (out / name).is_file():
            done.append(rec)
        elif status == "failed":
            found.failed[name] = str(rec.get("error") or "failed")
        elif status == "running":
            (found.running if records.is_running(name) else found.unfinished).append(name)
        else:  # done, but its table has gone: rerun to make it again
            found.unfinished.append(name)
    if not done:
        raise ValueError(
            f"{out}: no finished file to combine (no job record of a per-file run says done); run "
            "`mtaffect predict ... --per-file --out` into it first"
        )
    done.sort(key=lambda r: (str(r.get("source", "")), r["table"]))
    found.done = [r["table"] for r in done]
    tables = [read_table(out / r["table"]) for r in done]
    found.rows = sum(len(t) for t in tables)
    ours = _ours(out)

    def replace(name: str) -> bool:
        return overwrite or name in ours

    if combine:
        combined = pd.concat(tables, ignore_index=True)
        name = f"combined.{fmt}"
        found.written.append(write_table(combined, out / name, fmt, overwrite=replace(name)))
        summary_path = out / SUMMARY_NAME
        keep = replace(SUMMARY_NAME)
        with atomic_open(summary_path, "w", overwrite=keep, encoding="utf-8", newline="") as fh:
            summarize(combined).to_csv(fh, index=False)
        found.written.append(summary_path)
    if report:
        page = out / INDEX_NAME
        with atomic_open(page, "w", overwrite=replace(INDEX_NAME), encoding="utf-8") as fh:
            fh.write(render_index(done, tables, records.all()))
        found.written.append(page)
    with atomic_open(records_dir(out) / COLLECT_RECORD, "w", overwrite=True, encoding="utf-8") as fh:
        json.dump({"written": sorted(ours | {p.name for p in found.written})}, fh)
    return found


def render_index(done: Sequence[dict], tables: Sequence[pd.DataFrame], records: dict[str, dict]) -> str:
    """The archive's index page: one row per file (finished ones with their figures, then the others)."""
    e = html.escape
    rows = []
    for rec, table in zip(done, tables, strict=True):
        faces = table.loc[table["success"] == 1]
        expr = faces["expression"].mode().iloc[0] if len(faces) else ""
        va = (f"{faces['valence'].mean():.2f}", f"{faces['arousal'].mean():.2f}") if len(faces) else ("", "")
        page = rec.get("report")
        name = e(Path(str(rec.get("source", ""))).name)
        link = f'<a href="{e(page)}">{name}</a>' if page else name
        rows.append(
            f"<tr><td>{link}</td><td>done</td><td class=num>{int(rec.get('frames') or 0)}</td>"
            f"<td class=num>{int(rec.get('faces') or 0)}</td><td>{e(str(expr))}</td>"
            f"<td class=num>{va[0]}</td><td class=num>{va[1]}</td><td class=muted>{e(rec['table'])}</td></tr>"
        )
    listed = {r["table"] for r in done}
    for name, rec in records.items():
        if name in listed:
            continue
        status = str(rec.get("status"))
        detail = e(str(rec.get("error") or ""))
        source = e(Path(str(rec.get("source", ""))).name)
        rows.append(
            f"<tr><td>{source}</td><td class=err>{e(status)}</td><td colspan=6 class=err>{detail}</td></tr>"
        )
    head = (
        "<tr><th>file</th><th>status</th><th>frames</th><th>faces</th><th>main expression</th>"
        "<th>valence</th><th>arousal</th><th>table</th></tr>"
    )
    return "\n".join(
        [
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
            f"<title>mtaffect archive report</title><style>{CSS}</style></head><body>",
            "<h1>mtaffect archive report</h1>",
            f'<p class="muted">{len(done)} file(s) done, {len(records) - len(done)} not '
            "(failed, running or unfinished). Valence and arousal are means over every detected face; the "
            "main expression is the most frequent one. Each file's page has its faces and timelines.</p>",
            f"<table>{head}{''.join(rows)}</table>",
            "</body></html>",
        ]
    )


__all__ = [
    "COLLECT_RECORD", "Collected", "check_collect_outputs", "collect", "combined_names", "render_index",
]
