"""Summary statistics of label tables and dataset folders (JSON-serialisable, for ``mtaffect data stats``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mtaffect.data.annotations import LabelTable, read_annotations
from mtaffect.data.submission import TEST_LIST, list_kind, read_test_list
from mtaffect.schema import AU_NAMES, EXPR_NAMES, SPLIT_FILES, TEST_ANNOTATIONS, TEST_LIST_NAMES

#: Frame-gap buckets (inclusive bounds) of the histogram summary.
_GAP_BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-5", 3, 5),
    ("6-10", 6, 10),
    ("11-100", 11, 100),
    (">100", 101, np.inf),
)


def _frame_gaps(table: LabelTable) -> dict:
    """How far apart consecutive annotated frames of a video are (frames are sparse, not consecutive)."""
    pairs = table.frame[["video", "frame"]].drop_duplicates().sort_values(["video", "frame"], kind="stable")
    frames = pairs["frame"].to_numpy(dtype=np.int64)
    same_video = pairs["video"].to_numpy(dtype=object)
    same = same_video[1:] == same_video[:-1] if len(frames) > 1 else np.zeros(0, dtype=bool)
    gaps = np.diff(frames)[same] if len(frames) > 1 else np.zeros(0, dtype=np.int64)
    hist = {name: int(((gaps >= lo) & (gaps <= hi)).sum()) for name, lo, hi in _GAP_BUCKETS}
    return {
        "pairs": int(gaps.size),
        "median": float(np.median(gaps)) if gaps.size else None,
        "max": int(gaps.max()) if gaps.size else None,
        "share_consecutive": round(float((gaps == 1).mean()), 6) if gaps.size else None,
        "histogram": hist,
    }


def _summary(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    v = values.astype(np.float64)
    return {
        "mean": round(float(v.mean()), 6),
        "std": round(float(v.std()), 6),
        "min": round(float(v.min()), 6),
        "max": round(float(v.max()), 6),
    }


def dataset_stats(table: LabelTable) -> dict:
    """Counts, label validity per task and per AU, class balance, AU prevalence and frame spacing."""
    vm, am, em, aum = table.valence_mask, table.arousal_mask, table.expr_mask, table.au_mask
    expr = table.expression[em]
    aus = table.aus
    per_au_valid = aum.sum(axis=0)
    per_au_pos = ((aus == 1) & aum).sum(axis=0)
    return {
        "source": table.source,
        "rows": len(table),
        "videos": int(table.frame["video"].nunique()),
        "images_unique": int(table.frame["image"].nunique()),
        "duplicates": int(table.duplicates),
        "skipped": len(table.skipped),
        "valid": {
            "valence": int(vm.sum()),
            "arousal": int(am.sum()),
            "va": int((vm & am).sum()),
            "expression": int(em.sum()),
            "au_any": int(aum.any(axis=1).sum()),
            "au_all": int(aum.all(axis=1).sum()),
            "per_au": {name: int(per_au_valid[j]) for j, name in enumerate(AU_NAMES)},
        },
        "rows_with_any_label": int(table.any_label_mask.sum()),
        "expression_counts": {name: int((expr == k).sum()) for k, name in enumerate(EXPR_NAMES)},
        "au_prevalence": {
            name: (round(float(per_au_pos[j] / per_au_valid[j]), 6) if per_au_valid[j] else None)
            for j, name in enumerate(AU_NAMES)
        },
        "va_summary": {"valence": _summary(table.valence[vm]), "arousal": _summary(table.arousal[am])},
        "frame_gaps": _frame_gaps(table),
    }


def _test_list_stats(path: Path) -> dict:
    names = read_test_list(path)
    return {
        "file": path.name,
        "lines": len(names),
        "images_unique": len(set(names)),
        "videos": len({n.rpartition("/")[0] for n in names}),
    }


def stats_for_path(path_or_root: str | os.PathLike, *, lenient: bool = False) -> dict:
    """Stats of one file (``{file name: stats}``) or of a dataset root (one entry per split present).

    A root yields ``train`` / ``val`` (and ``test`` for a synthetic set with test labels) plus
    ``test_list`` (line count) when the official test list is there. ``lenient`` is passed on to
    :func:`~mtaffect.data.annotations.read_annotations` (skipped rows are then counted, not raised).
    """
    p = Path(path_or_root)
    if p.is_file():
        if p.name in TEST_LIST_NAMES or list_kind(p) == TEST_LIST:
            return {p.name: _test_list_stats(p)}
        return {p.name: dataset_stats(read_annotations(p, lenient=lenient))}
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or dataset folder: {p}")
    out: dict = {}
    for split, name in (*SPLIT_FILES.items(), ("test", TEST_ANNOTATIONS)):
        if (p / name).is_file():
            out[split] = dataset_stats(read_annotations(p / name, lenient=lenient))
    for name in TEST_LIST_NAMES:
        if (p / name).is_file():
            out["test_list"] = _test_list_stats(p / name)
            break
    if not out:
        expected = [*SPLIT_FILES.values(), TEST_ANNOTATIONS, *TEST_LIST_NAMES]
        raise FileNotFoundError(f"{p} holds none of the dataset files {expected}")
    return out


# ---------------------------------------------------------------------------------------------------
# Text rendering (for the CLI)
# ---------------------------------------------------------------------------------------------------


def _n(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _render_table_stats(name: str, s: dict) -> list[str]:
    v = s["valid"]
    file = Path(s["source"]).name if s.get("source") else None
    source = f" ({file})" if file and file != name else ""
    lines = [
        f"{name}{source}: {_n(s['rows'])} rows, {_n(s['videos'])} videos, "
        f"{_n(s['images_unique'])} unique images, {_n(s['duplicates'])} exact duplicates, "
        f"{_n(s['skipped'])} rows skipped",
        f"  valid labels: valence {_n(v['valence'])} | arousal {_n(v['arousal'])} | both {_n(v['va'])} | "
        f"expression {_n(v['expression'])} | any AU {_n(v['au_any'])} | "
        f"any label {_n(s['rows_with_any_label'])}",
    ]
    total = max(sum(s["expression_counts"].values()), 1)
    lines.append(
        "  expressions: "
        + ", ".join(f"{k} {_n(c)} ({100 * c / total:.1f}%)" for k, c in s["expression_counts"].items())
    )
    lines.append(
        "  AU prevalence: "
        + ", ".join(f"{k} {'-' if p is None else f'{p:.3f}'}" for k, p in s["au_prevalence"].items())
    )
    g = s["frame_gaps"]
    if g["pairs"]:
        lines.append(
            f"  frame gaps: median {g['median']:g}, max {_n(g['max'])}, "
            f"{100 * g['share_consecutive']:.1f}% of consecutive annotated rows are adjacent frames"
        )
    return lines


def render_stats(stats: dict) -> str:
    """Plain-text summary of :func:`stats_for_path` (or one :func:`dataset_stats`) output, one block each."""
    entries = {"table": stats} if "rows" in stats else stats
    lines: list[str] = []
    for name, s in entries.items():
        if "rows" in s:
            lines.extend(_render_table_stats(name, s))
        else:
            lines.append(
                f"{name} ({s['file']}): {_n(s['lines'])} lines, {_n(s['images_unique'])} unique images, "
                f"{_n(s['videos'])} videos"
            )
    return "\n".join(lines)
