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
from mtaffect.persist import Lock, write_json
from mtaffect.predict.claims import JobRecords, records_dir
from mtaffect.predict.outputs import check_format, read_table, write_table
from mtaffect.predict.report import CSS
from mtaffect.predict.summary import summarize
from mtaffect.schema import EXPR_NAMES

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
    superseded: list[str] = field(default_factory=list)  # older done tables of a file combined once
    settings: int = 0  # distinct settings among the combined files (1: one run's settings)
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
    (``combine``) and the index page (``report``). No finished file is an error.

    Two collects of one folder (two shards finishing together) take turns (a lock). A file with done
    tables under two names (renamed, or written as CSV and Parquet) is combined once, from the newest.
    """
    out = Path(out)
    fmt = check_format(fmt)
    if not out.is_dir():
        raise NotADirectoryError(f"{out}: not a folder of predict outputs")
    records = JobRecords(out)
    if not records.folder.is_dir():
        raise ValueError(
            f"{out}: no finished file to combine (no job records: not the --out of a per-file run); run "
            "`mtaffect predict ... --per-file --out` into it first"
        )
    with Lock.acquire(records.folder / "collect.lock", wait=None):  # collects take turns
        return _collect(out, fmt, report, overwrite, combine, records)


def _collect(
    out: Path, fmt: str, report: bool, overwrite: bool, combine: bool, records: JobRecords
) -> Collected:
    check_collect_outputs(out, fmt, report, overwrite, combine)
    found = Collected()
    newest: dict[str, dict] = {}
    for name, rec in records.all().items():
        status = rec.get("status")
        if status == "done" and (out / name).is_file():
            key = str(rec.get("path") or rec.get("source"))
            if key in newest:
                found.superseded.append(min(rec, newest[key], key=_finished)["table"])
            newest[key] = max(rec, newest.get(key, rec), key=_finished)
        elif status == "failed":
            found.failed[name] = str(rec.get("error") or "failed")
        elif status == "running":
            (found.running if records.is_running(name) else found.unfinished).append(name)
        else:  # done, but its table has gone: rerun to make it again
            found.unfinished.append(name)
    if not newest:
        raise ValueError(
            f"{out}: no finished file to combine (no job record of a per-file run says done); run "
            "`mtaffect predict ... --per-file --out` into it first"
        )
    done = sorted(newest.values(), key=lambda r: (str(r.get("source", "")), r["table"]))
    found.done = [r["table"] for r in done]
    found.settings = len({json.dumps(_settings(r), sort_keys=True) for r in done})
    tables = [read_table(out / r["table"]) for r in done]
    found.rows = sum(len(t) for t in tables)
    names = combined_names(fmt, report, combine)
    ours = _ours(out)
    replace = {name: overwrite or name in ours for name in names}
    # written first: a collect killed half-way, or another checking the folder meanwhile, sees them as ours
    _write_ours(out, ours | set(names))
    if combine:
        combined = pd.concat(tables, ignore_index=True)
        name = f"combined.{fmt}"
        found.written.append(write_table(combined, out / name, fmt, overwrite=replace[name]))
        summary_path = out / SUMMARY_NAME
        keep = replace[SUMMARY_NAME]
        with atomic_open(summary_path, "w", overwrite=keep, encoding="utf-8", newline="") as fh:
            summarize(combined).to_csv(fh, index=False)
        found.written.append(summary_path)
    if report:
        page = out / INDEX_NAME
        with atomic_open(page, "w", overwrite=replace[INDEX_NAME], encoding="utf-8") as fh:
            others = {n: r for n, r in records.all().items() if n not in set(found.superseded)}
            fh.write(render_index(done, tables, others))
        found.written.append(page)
    return found


def _finished(rec: dict) -> float:
    return float(rec.get("finished") or 0)


def _settings(rec: dict) -> dict:
    """A done record's signature without what names the file itself."""
    return {k: v for k, v in (rec.get("signature") or {}).items() if k != "input"}


def _write_ours(out: Path, names: set[str]) -> None:
    write_json(records_dir(out) / COLLECT_RECORD, {"written": sorted(names)})


def render_index(done: Sequence[dict], tables: Sequence[pd.DataFrame], records: dict[str, dict]) -> str:
    """The archive's index page: one row per file (finished ones with their figures, then the others)."""
    e = html.escape
    rows = []
    for rec, table in zip(done, tables, strict=True):
        faces = table.loc[table["success"] == 1]
        counts = faces["expression"].value_counts()
        order = {name: i for i, name in enumerate(EXPR_NAMES)}  # ties: the official order, as summarize
        expr = min(counts.index, key=lambda x: (-counts[x], order.get(x, len(order)))) if len(counts) else ""
        va = (f"{faces['valence'].mean():.2f}", f"{faces['arousal'].mean():.2f}") if len(faces) else ("", "")
        page = str(rec.get("report") or "")
        name = e(Path(str(rec.get("source", ""))).name)
        # a record is data: only a page of this folder (a plain name) becomes a link, never a URL
        local = page.endswith(".html") and Path(page).name == page and ":" not in page
        link = f'<a href="{e(page)}">{name}</a>' if local else name
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
        status = "done, table missing (rerun)" if status == "done" else status
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
    "COLLECT_RECORD",
    "Collected",
    "check_collect_outputs",
    "collect",
    "combined_names",
    "render_index",
]
